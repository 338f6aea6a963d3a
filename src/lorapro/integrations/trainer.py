"""LoRA-Pro in the Hugging Face ``transformers.Trainer`` (and TRL's trainers, which are Trainers).

Efficient mode with the optimizer the script already uses (any ``optim=`` string): add one
callback, ``Trainer(..., callbacks=[LoRAProCallback()])``. It calls :func:`lorapro.attach` on the
model when training begins, so backward leaves LoRA-Pro's gradients and the Trainer's own
optimizer (``adamw_torch_fused``, ``adamw_bnb_8bit``, ``adafactor``, DeepSpeed's...) applies them.
``max_grad_norm`` then clips the adjusted gradients (the logged ``grad_norm`` is theirs).

Full mode (Algorithm 3) needs lorapro's optimizer, built by two equivalent ways in, neither of
which forks the Trainer:

- ``LoRAProTrainer(model=..., args=..., lorapro_kwargs={"mode": "efficient"})``, a
  ``Trainer`` subclass whose only changes are ``create_optimizer`` and, for full mode with
  weight decay, saving/restoring the base weights it decays;
- ``Trainer(..., optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(args))``, the
  Trainer's own optimizer-factory hook, for code that must keep the stock ``Trainer`` class.

Either way the optimizer is built from ``TrainingArguments``: ``learning_rate``,
``weight_decay`` (with the Trainer's own rule that biases and norm weights get no decay),
``adam_beta1``/``adam_beta2``/``adam_epsilon``, plus lorapro's options (``mode``, ``x_mode``,
``nonfinite``, ...). Gradient accumulation, ``max_grad_norm``, the LR scheduler, bf16/fp16 and
checkpoint save/resume are the Trainer's own and need nothing else: the optimizer is an ordinary
``torch.optim.Optimizer`` whose ``state_dict`` holds every moment.

With a lorapro optimizer, clipping (``max_grad_norm``) happens before ``optimizer.step``, i.e.
on LoRA's raw gradients. The closed form is linear in those gradients, so clipping scales the
adjusted gradients by the same factor; the logged ``grad_norm`` is the norm of the raw gradients.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._extras import raise_missing_extra

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_pt_utils import get_parameter_names
except ModuleNotFoundError as exc:
    raise_missing_extra(exc, "lorapro.integrations.trainer")

from .._base import LoRAProOptimizer
from .._validation import check_choice
from ..adamw import LoRAProAdamW
from ..backward_hooks import LoRAProHandle, attach
from ..closed_form import X_MODES
from ..errors import LoRAProConfigError
from ..pairs import find_lora_pairs
from ..sgd import LoRAProSGD
from ._transformers_internals import CheckpointExtras, deepspeed_config, default_optim, fsdp_version
from .guard import unwrap_lorapro

__all__ = [
    "BASE_WEIGHTS_NAME",
    "LoRAProCallback",
    "LoRAProTrainer",
    "create_lorapro_optimizer",
    "lorapro_optimizer_cls_and_kwargs",
    "lorapro_param_groups",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": LoRAProAdamW, "sgd": LoRAProSGD}
BASE_WEIGHTS_NAME = "lorapro_base_weights.pt"
"""Checkpoint file holding the base weights that full mode's weight decay scaled in place."""

# The Trainer's own rule (Trainer.get_decay_parameter_names): no decay on biases and norms.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


class LoRAProCallback(TrainerCallback):
    """Makes any ``Trainer`` / TRL ``SFTTrainer`` train LoRA-Pro's efficient mode (Algorithm 2 with
    an AdamW-like ``optim``, Algorithm 1 with SGD) with its own optimizer.

    ``Trainer(..., callbacks=[LoRAProCallback()])``. At ``on_train_begin`` it attaches
    :func:`lorapro.attach` to the model; at ``on_train_end`` it removes the hooks. ``handle`` is
    the :class:`~lorapro.LoRAProHandle` while training runs.
    """

    def __init__(self, x_mode: str = "sylvester") -> None:
        check_choice("x_mode", x_mode, X_MODES)
        self.x_mode = x_mode
        self.handle: LoRAProHandle | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if unwrap_lorapro(optimizer) is not None:
            raise LoRAProConfigError(
                "LoRAProCallback with a lorapro optimizer would adjust the gradients twice: use the callback "
                "with the Trainer's own optimizer (optim=...), or LoRAProTrainer without the callback"
            )
        if model is None:
            raise LoRAProConfigError("LoRAProCallback needs the Trainer's model (on_train_begin got none)")
        if self.handle is None or self.handle.removed or self.handle.model is not model:
            self.handle = attach(model, x_mode=self.x_mode)  # type: ignore[arg-type]

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def lorapro_param_groups(
    model: nn.Module, weight_decay: float, decay_parameter_names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups (decay / no decay), with each LoRA pair kept whole.

    LoRA-Pro updates A and B of a layer together with one learning rate and weight decay, so
    both factors go to the group of ``lora_A`` (the Trainer's name rule puts them together
    anyway; this makes it hold for any rule). Empty groups are left out.
    """
    if decay_parameter_names is None:
        decay_parameter_names = get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS)
    decay_names = set(decay_parameter_names)
    decays = {id(p): n in decay_names for n, p in model.named_parameters()}
    for pair in find_lora_pairs(model):
        decays[id(pair.B)] = decays[id(pair.A)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if decays[id(p)]], "weight_decay": weight_decay},
        {"params": [p for p in trainable if not decays[id(p)]], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _optimizer_kwargs(
    args: TrainingArguments, optimizer: str, lorapro_kwargs: dict[str, Any]
) -> dict[str, Any]:
    if optimizer not in OPTIMIZERS:
        raise LoRAProConfigError(f"unknown lorapro optimizer {optimizer!r}: use 'adamw' or 'sgd'")
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if optimizer == "adamw":
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(lorapro_kwargs)
    return kwargs


def create_lorapro_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    optimizer: str = "adamw",
    decay_parameter_names: Iterable[str] | None = None,
    **lorapro_kwargs: Any,
) -> LoRAProOptimizer:
    """A lorapro optimizer configured from ``TrainingArguments``.

    ``optimizer`` is ``"adamw"`` (:class:`~lorapro.LoRAProAdamW`, takes ``adam_beta1/2`` and
    ``adam_epsilon``) or ``"sgd"`` (:class:`~lorapro.LoRAProSGD`; pass ``momentum=`` here).
    ``lorapro_kwargs`` (``mode``, ``x_mode``, ``nonfinite``, ``foreach``, ...) are passed on and
    override what ``args`` gives. ``model`` may be the PEFT model or a wrapper of it (DDP,
    Accelerate's wrappers): pairs are found by module. A model sharded by FSDP2's
    ``fully_shard`` (before or after this call) needs nothing more: the optimizers work on
    DTensor factors.

    Like every lorapro optimizer, it checks before every step that it still owns the model's
    active LoRA factors, so a wrapper that swaps them fails loudly.
    """
    kwargs = _optimizer_kwargs(args, optimizer, lorapro_kwargs)
    weight_decay = kwargs.pop("weight_decay")
    if "params" not in kwargs:
        kwargs["params"] = lorapro_param_groups(model, weight_decay, decay_parameter_names)
    cls = OPTIMIZERS[optimizer]
    return cls(model, weight_decay=weight_decay, **kwargs)


class _LoRAProFactory:
    """``Trainer``'s optimizer-factory protocol: instantiated without arguments, then called
    with ``(model, **kwargs)`` (see ``transformers.trainer_optimizer.is_optimizer_factory``)."""

    def __call__(self, model: nn.Module, *, optimizer: str = "adamw", weight_decay: float = 0.0, **kwargs):
        if "params" not in kwargs:
            kwargs["params"] = lorapro_param_groups(model, weight_decay)
        return OPTIMIZERS[optimizer](model, weight_decay=weight_decay, **kwargs)


def lorapro_optimizer_cls_and_kwargs(
    args: TrainingArguments, optimizer: str = "adamw", **lorapro_kwargs: Any
) -> tuple[type, dict[str, Any]]:
    """For the stock Trainer's optimizer hook.

    ``Trainer(..., optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(args, mode="full"))``.

    Builds the same optimizer as :class:`LoRAProTrainer`. Full mode with weight decay is refused
    here: it scales the frozen base weights in place, which the stock Trainer's checkpoints do
    not contain, so a resumed run would silently differ; :class:`LoRAProTrainer` saves them.
    """
    kwargs = _optimizer_kwargs(args, optimizer, lorapro_kwargs)
    if kwargs.get("mode") == "full" and kwargs["weight_decay"] != 0.0:
        raise LoRAProConfigError(
            "full mode with weight decay scales the frozen base weights in place, which the stock "
            "Trainer's (adapter-only) checkpoints do not hold: a resumed run would silently differ. Use "
            "LoRAProTrainer (it saves and restores them), or weight_decay=0"
        )
    return _LoRAProFactory, {"optimizer": optimizer, **kwargs}


def _decayed_base_weights(optimizer: Any) -> dict[str, torch.Tensor] | None:
    """Base weights that full mode's weight decay scales in place, keyed by layer name.

    ``None`` unless some group is in full mode with weight decay: only then does a step change
    a frozen weight, which PEFT's adapter checkpoint does not contain.
    """
    opt = unwrap_lorapro(optimizer)
    if not isinstance(opt, LoRAProAdamW):
        return None
    weights: dict[str, torch.Tensor] = {}
    for group, pairs in opt.pairs_by_group:
        if group["mode"] == "full" and group["weight_decay"] != 0.0:
            for pair in pairs:
                weights[pair.name] = pair.base_weight
    return weights or None


class LoRAProTrainer(CheckpointExtras, Trainer):
    """``transformers.Trainer`` that trains with a lorapro optimizer: needed for full mode
    (Algorithm 3); for efficient mode :class:`LoRAProCallback` keeps your own optimizer.

    Args:
        lorapro_optimizer: ``"adamw"`` (default) or ``"sgd"``.
        lorapro_kwargs: options for the optimizer (``mode``, ``x_mode``, ``nonfinite``,
            ``momentum`` for SGD, ...); they override what ``args`` gives.
        Everything else as ``transformers.Trainer``. ``args.optim`` is not used (a warning says so).

    Full mode with weight decay scales the frozen base weights in place (Eq. 57-58 of the
    paper). PEFT checkpoints hold only the adapter, so this trainer also writes those base
    weights to ``lorapro_base_weights.pt`` in each checkpoint and restores them on resume;
    the final adapter from ``save_model`` does not contain them (a warning says so): export
    ``model.merge_and_unload()`` instead, or train with ``weight_decay=0``.
    """

    def __init__(
        self,
        *args: Any,
        lorapro_optimizer: str = "adamw",
        lorapro_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if lorapro_optimizer not in OPTIMIZERS:
            raise LoRAProConfigError(f"unknown lorapro optimizer {lorapro_optimizer!r}: use 'adamw' or 'sgd'")
        self.lorapro_optimizer = lorapro_optimizer
        self.lorapro_kwargs = dict(lorapro_kwargs or {})
        super().__init__(*args, **kwargs)
        if self.optimizer_cls_and_kwargs is not None:
            raise LoRAProConfigError(
                "LoRAProTrainer builds its own optimizer: pass lorapro_kwargs=..., not "
                "optimizer_cls_and_kwargs"
            )
        if fsdp_version(self) not in (None, 2):
            raise LoRAProConfigError(
                "FSDP1 flattens each wrapped module's parameters into one FlatParameter, so the LoRA A and B "
                "matrices do not reach the optimizer as matrices; use FSDP2 (fsdp_version=2 in the FSDP "
                "config), whose DTensor factors the lorapro optimizers handle"
            )
        if self.is_deepspeed_enabled:
            from .deepspeed import check_deepspeed_config

            check_deepspeed_config(deepspeed_config(self))
        if self.args.optim != default_optim(self.args):
            warnings.warn(
                f"LoRAProTrainer trains with lorapro's {self.lorapro_optimizer} and does not use "
                f"optim={str(getattr(self.args.optim, 'value', self.args.optim))!r}. For LoRA-Pro with that "
                "optimizer, use a stock Trainer with callbacks=[LoRAProCallback()] instead.",
                UserWarning,
                stacklevel=2,
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            full_with_decay = (
                self.lorapro_kwargs.get("mode") == "full"
                and self.lorapro_kwargs.get("weight_decay", self.args.weight_decay) != 0.0
            )
            if full_with_decay and self.is_fsdp_enabled and self.args.save_strategy != "no":
                raise LoRAProConfigError(
                    "full mode with weight decay scales the (sharded) base weights in place, and "
                    "LoRAProTrainer does not checkpoint sharded base weights: train with weight_decay=0, "
                    "or save_strategy='no' and export model.merge_and_unload() at the end"
                )
            self.optimizer = create_lorapro_optimizer(
                opt_model,
                self.args,
                self.lorapro_optimizer,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
                **self.lorapro_kwargs,
            )
        return self.optimizer

    @property
    def lorapro(self) -> LoRAProOptimizer | None:
        """The lorapro optimizer itself (``self.optimizer`` may be Accelerate's wrapper)."""
        return None if self.optimizer is None else unwrap_lorapro(self.optimizer)

    # -- full mode + weight decay: the decayed base weights travel with the checkpoint ----------
    def save_checkpoint_extras(self, output_dir: str) -> None:
        weights = _decayed_base_weights(self.optimizer)
        if weights is not None and self.args.should_save:
            torch.save(
                {name: w.detach().cpu() for name, w in weights.items()},
                os.path.join(output_dir, BASE_WEIGHTS_NAME),
            )

    def load_checkpoint_extras(self, checkpoint: str) -> None:
        weights = _decayed_base_weights(self.optimizer)
        path = os.path.join(checkpoint, BASE_WEIGHTS_NAME)
        if weights is None:
            return
        if not os.path.isfile(path):
            raise LoRAProConfigError(
                f"{checkpoint} has no {BASE_WEIGHTS_NAME}: full mode with weight decay scales the base "
                "weights in place and a resume needs them. Resume from a checkpoint written by "
                "LoRAProTrainer with the same mode and weight decay."
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if set(saved) != set(weights):
            raise LoRAProConfigError(
                f"{path} holds base weights of other layers than this model's LoRA layers; resume with "
                "the model and LoRA config the checkpoint was written with"
            )
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(saved[name].to(device=weight.device, dtype=weight.dtype))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call and _decayed_base_weights(self.optimizer) is not None:
            logger.warning(
                "lorapro full mode with weight decay changed the base weights; the saved PEFT adapter "
                "does not contain them. To export the trained model, save model.merge_and_unload() "
                "instead, or train with weight_decay=0."
            )
        super().save_model(output_dir, _internal_call=_internal_call)
