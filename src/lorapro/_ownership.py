"""Which LoRA pairs a lorapro optimizer holds, kept in step with the model.

An optimizer owns a pair when its parameter groups hold the pair's factors (both in one group; a
frozen factor may be left out). Between steps the model may change under it: an adapter switched
or added, factors swapped by a wrapper (Accelerate's FSDP2 ``prepare``), or replaced by DeepSpeed's
flat partitions, or the model attached with ``lorapro.attach``. :class:`PairOwnership` follows
what LoRA-Pro can follow and refuses, before anything is modified, what would silently train
something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._storage import deepspeed_manages
from .backward_hooks import attached_handle
from .errors import LoRAProConfigError
from .pairs import LoRAPair, PairTracker

__all__ = ["PairOwnership", "refuse_engine_managed"]


def _pair_key(pair: LoRAPair) -> tuple[int, str]:
    return (id(pair.layer), pair.adapter)


def refuse_engine_managed(pairs: Sequence[LoRAPair], optimizer_name: str) -> None:
    """Raise if DeepSpeed took the LoRA factors over (ZeRO 1/2 and its bf16/fp16 master weights
    link each parameter to a flat partition; ZeRO-3 partitions it): DeepSpeed's own optimizer,
    not the lorapro one, would update them, with plain AdamW."""
    for pair in pairs:
        if deepspeed_manages(pair.A):
            raise LoRAProConfigError(
                f"{pair.name}: DeepSpeed manages this model's LoRA factors (ZeRO stages 1-3, or its "
                f"bf16/fp16 sections), so the {optimizer_name} built for it cannot update them: DeepSpeed "
                "steps its own optimizer on flat partitions, with plain AdamW (the Trainer even discards "
                "an optimizer passed with optimizers= under DeepSpeed). Use lorapro.attach(model) before "
                "deepspeed.initialize with DeepSpeed's own optimizer, or LoRAProCallback in a Trainer."
            )


class _EngineCheck:
    """Forward pre-hook of a model a lorapro optimizer was built for, until its first step."""

    def __init__(self, pairs: list[LoRAPair], optimizer_name: str) -> None:
        self.pairs = pairs
        self.optimizer_name = optimizer_name

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            refuse_engine_managed(self.pairs, self.optimizer_name)


class PairOwnership:
    """The model's active LoRA pairs that an optimizer's parameter groups hold, by group."""

    def __init__(self, model: nn.Module, optimizer_name: str) -> None:
        self.optimizer_name = optimizer_name
        self._tracker = PairTracker(model)
        self.found: list[LoRAPair] = self._tracker.pairs()[0]
        if not self.found:
            raise LoRAProConfigError(
                "no trainable LoRA layers found in the model: LoRA-Pro adjusts the gradients of PEFT LoRA "
                "factors. Wrap the model first, e.g. model = peft.get_peft_model(model, LoraConfig(...)), "
                "and make sure an adapter is active and trainable."
            )
        self.model = model
        self.started = False  # start() ran: the optimizer's groups exist
        self.by_group: list[list[LoRAPair]] = []
        self.lora_ids: set[int] = set()
        self._excluded: set[tuple[int, str]] = set()
        self._trained: set[tuple[int, str]] = set()
        self._forward_check: Any = None

    def default_params(self, model: nn.Module) -> list[Tensor]:
        """Every trainable parameter, and the frozen partner of a trainable LoRA factor (so that
        unfreezing it later trains it: a frozen factor is skipped until then)."""
        partners = {id(f) for pair in self.found for f in (pair.A, pair.B)}
        return [p for p in model.parameters() if p.requires_grad or id(p) in partners]

    def start(self, param_groups: list[dict[str, Any]]) -> None:
        """Index the pairs the groups hold, once the optimizer's groups exist, and refuse an
        attached model."""
        self.index(param_groups)
        owned = {id(p) for g in param_groups for p in g["params"]}
        # Layers (and adapters) the caller left out on purpose, and those this optimizer trains:
        # a pair that later appears outside its parameters is told apart by these.
        self._excluded = {_pair_key(p) for p in self.found if id(p.A) not in owned and id(p.B) not in owned}
        self._trained = {_pair_key(p) for p in self.pairs}
        self.refuse_attached(self.pairs)
        # An optimizer that is never stepped cannot raise in step(): under DeepSpeed the Trainer
        # discards an optimizer passed with optimizers= and builds its own, which would train
        # plain AdamW. So until the first step the model's forward checks too (a few attribute
        # reads); the hook holds the pairs, not the optimizer, so it works after it was dropped.
        self._forward_check = self.model.register_forward_pre_hook(
            _EngineCheck(self.found, self.optimizer_name)
        )
        self.started = True

    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs the optimizer adjusts, in module order."""
        return [p for group in self.by_group for p in group]

    def stop_checking_forward(self) -> None:
        """From the first step on every step checks (see :meth:`sync`)."""
        if self._forward_check is not None:
            self._forward_check.remove()

    def index(self, param_groups: list[dict[str, Any]]) -> None:
        """Which group holds each pair (both factors in one group, or a frozen one left out)."""
        group_of = {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}
        by_group: list[list[LoRAPair]] = [[] for _ in param_groups]
        lora_ids: set[int] = set()
        for pair in self.found:
            ga, gb = group_of.get(id(pair.A)), group_of.get(id(pair.B))
            if ga is None and gb is None:
                continue
            # A frozen factor left out of the parameters: a one-factor pair (see PairWork).
            if ga is None and not pair.A.requires_grad:
                ga = gb
            elif gb is None and not pair.B.requires_grad:
                gb = ga
            if ga != gb:
                raise LoRAProConfigError(
                    f"{pair.name} (adapter {pair.adapter!r}): lora_A and lora_B must be in the same "
                    f"parameter group (found groups {ga} and {gb}); LoRA-Pro updates them together with "
                    "one learning rate. Put both factors of every layer in one group."
                )
            by_group[ga].append(pair)
            lora_ids.update((id(pair.A), id(pair.B)))
        if not lora_ids:
            raise LoRAProConfigError(
                "none of the model's LoRA factors is among the parameters given to the optimizer; pass "
                "params=None to optimise every trainable parameter of the model"
            )
        self.by_group, self.lora_ids = by_group, lora_ids

    def sync(self, param_groups: list[dict[str, Any]], when: str) -> None:
        """Follow the model's active LoRA pairs, and refuse to step on anything but LoRA-Pro.

        A module walk only when the tracker's cheap check sees a change, and a set of ids. It
        follows factors a wrapper swapped in both the model and the optimizer (Accelerate's FSDP2
        ``prepare``) and adapters that became active (``set_adapter``) or were added to the
        optimizer (``add_param_group``). It raises :class:`LoRAProConfigError` where LoRA-Pro
        would silently not run: factors the optimizer trained that are no longer its parameters
        (DeepSpeed ZeRO 1-3 and its bf16/fp16 sections replace them with flat partitions or
        master copies, which would get plain AdamW), an adapter that became active after the
        optimizer was built and whose factors it does not hold, and an attached model.
        """
        refuse_engine_managed(self.found, self.optimizer_name)
        fresh, _ = self._tracker.pairs()
        owned = {id(p) for g in param_groups for p in g["params"]}
        keep: list[LoRAPair] = []
        lost: list[LoRAPair] = []
        new: list[LoRAPair] = []
        for pair in fresh:
            key = _pair_key(pair)
            a, b = id(pair.A) in owned, id(pair.B) in owned
            if a != b and not (pair.B if a else pair.A).requires_grad:
                a = b = True  # the factor left out is frozen: a one-factor pair
            if a != b:
                raise LoRAProConfigError(
                    f"{pair.name} (adapter {pair.adapter!r}): only lora_{'A' if a else 'B'} is among the "
                    f"optimizer's parameters {when}; LoRA-Pro updates both factors of a layer together, with "
                    "one learning rate. Put both factors of every layer in the same parameter group."
                )
            if a:
                keep.append(pair)
            elif key in self._trained:
                lost.append(pair)
            elif key not in self._excluded:
                new.append(pair)
        if lost:
            shapes = sorted({tuple(p.shape) for g in param_groups for p in g["params"]})[:3]
            raise LoRAProConfigError(
                f"{len(lost)} LoRA layers (e.g. {lost[0].name}) are no longer among the optimizer's "
                f"parameters {when}: something replaced optimizer.param_groups after the lorapro optimizer "
                f"was built (parameter shapes now {shapes}...), and LoRA-Pro would silently not be applied. "
                "DeepSpeed ZeRO stages 1-3 and its bf16/fp16 sections do this: call lorapro.attach(model) "
                "before deepspeed.initialize and use DeepSpeed's own optimizer (or any torch optimizer) "
                "instead of a lorapro optimizer. Under FSDP2 build the lorapro optimizer after fully_shard."
            )
        if new:
            raise LoRAProConfigError(
                f"{new[0].name}: adapter {new[0].adapter!r} is active but its LoRA factors are not among "
                f"this optimizer's parameters ({len(new)} layers): it became active (set_adapter, "
                "add_adapter) after the optimizer was built, and would not be trained. Build the optimizer "
                "after choosing the adapter, add its factors with optimizer.add_param_group, or use "
                "lorapro.attach(model), which follows adapter changes."
            )
        self.refuse_attached(keep)
        if [(id(p.A), id(p.B)) for p in keep] != [(id(p.A), id(p.B)) for p in self.found]:
            self.found = keep
            self.index(param_groups)
            self._trained.update(_pair_key(p) for p in self.pairs)

    def refuse_attached(self, pairs: list[LoRAPair]) -> None:
        for pair in pairs:
            if attached_handle(pair.A) is not None or attached_handle(pair.B) is not None:
                name = self.optimizer_name
                raise LoRAProConfigError(
                    f"{pair.name}: the model is attached with lorapro.attach, so backward already leaves "
                    f"LoRA-Pro's gradients and {name} would adjust them a second time. Use a plain "
                    f"optimizer (e.g. torch.optim.AdamW) with attach, or call handle.remove() to use {name} "
                    "(needed for full mode)."
                )
