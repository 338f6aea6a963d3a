"""The optimizers' step, shared by :class:`~lorapro.LoRAProAdamW` and :class:`~lorapro.LoRAProSGD`.

A step runs in three phases so that nothing is ever half-updated:

1. **collect** every parameter that has a gradient, the LoRA factors by pair (:mod:`._ownership`
   says which pairs this optimizer holds; :mod:`._storage` how each pair's factors are stored);
2. **solve** the r x r half of the closed form for every LoRA layer, batched over layers
   (:func:`lorapro._solve.solve_pairs`), and check raw gradients, Gram terms and coefficients for
   NaN/Inf in one reduction (one host sync);
3. only then **apply**: touch parameters and optimizer state (the subclass's update), the
   adjusted LoRA gradients produced chunk by chunk into one reused buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._ownership import PairOwnership
from ._solve import PairWork, Solved, adjusted_chunks, solve_pairs
from ._storage import FactorSharding, local_tensors
from ._validation import NONFINITE_POLICIES, check_choice, check_number
from .closed_form import X_MODES, compute_dtype
from .errors import LoRAProConfigError, NonFiniteGradientError
from .functional import any_nonfinite
from .pairs import LoRAPair

__all__ = ["GroupWork", "LoRAProOptimizer"]


@dataclass(eq=False)
class GroupWork:
    """One parameter group's share of a step: its LoRA pairs and its other parameters."""

    group: dict[str, Any]
    pairs: list[PairWork] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)  # ordinary parameters with a gradient
    grads: list[Tensor] = field(default_factory=list)


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Skips the call when there is nothing to convert: the step runs this for every factor.
    return t if t.dtype == dtype else t.to(dtype)


class LoRAProOptimizer(Optimizer):
    """Base class: finds the model's LoRA pairs and runs the collect / solve / apply step."""

    #: Options added after a release, with the value that a state dict saved without them meant:
    #: such a state dict still loads, and its groups get that value.
    _added_options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        nonfinite: str,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the model (an nn.Module with PEFT LoRA layers), "
                f"got {type(model).__name__}; pass the model itself: {type(self).__name__}(model, lr=...)"
            )
        check_choice("nonfinite policy", nonfinite, NONFINITE_POLICIES)
        self._ownership = PairOwnership(model, type(self).__name__)
        if params is None:
            params = self._ownership.default_params(model)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        """Steps skipped because of non-finite gradients (``nonfinite="skip"``)."""
        self._sharding = FactorSharding()  # FSDP2's DTensor factors, if any, handled there
        # The options this class defines (torch adds keys such as "differentiable" to
        # self.defaults on load, and those never appear in a saved group).
        self._option_keys = tuple(defaults)
        super().__init__(params, defaults)
        self._ownership.start(self.param_groups)

    # -- the pairs: the public API the integrations use --------------------------------------
    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer adjusts, in module order."""
        return self._ownership.pairs

    @property
    def pairs_by_group(self) -> list[tuple[dict[str, Any], list[LoRAPair]]]:
        """Each parameter group with the LoRA pairs it holds."""
        return list(zip(self.param_groups, self._ownership.by_group, strict=True))

    def sync_pairs(self, when: str = "at optimizer.step()") -> None:
        """Follow the model's active LoRA pairs and raise :class:`~lorapro.LoRAProConfigError`,
        before anything is modified, where the next step would not run LoRA-Pro on them (factors
        swapped out of the optimizer by DeepSpeed, an adapter it does not hold, an attached
        model). Every step runs it first; ``when`` goes into the message."""
        self._ownership.sync(self.param_groups, when)

    @property
    def comm_numel(self) -> dict[str, int]:
        """Numbers this rank sent into collectives in the last step, by purpose. Empty unless the
        LoRA factors are FSDP2 shards (``gram_allreduce``: the r x r terms; ``reshard_A``: A under
        FSDP2's default placement; ``full_mode_gather`` / ``full_mode_allreduce``: full mode)."""
        return dict(self._sharding.comm_numel)

    # -- set-up -----------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        group["lr"] = check_number("lr", group["lr"])
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"])
        check_choice("x_mode", group["x_mode"], X_MODES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._validate_group(group)
            for p in group["params"]:
                if p.is_sparse:
                    raise LoRAProConfigError(
                        "sparse parameters are not supported; use dense embeddings (sparse=False)"
                    )
            if self._ownership.started:  # (Optimizer.__init__ adds the first groups before start)
                self._ownership.index(self.param_groups)
                self.sync_pairs("in add_param_group")
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    # -- the step ---------------------------------------------------------------------------
    def _collect(self) -> list[GroupWork]:
        self.sync_pairs()
        self._sharding.begin_step()
        lora_ids = self._ownership.lora_ids
        works = []
        for group, pairs in self.pairs_by_group:
            work = GroupWork(group)
            for pair in pairs:
                pair_work = self._pair_work(pair)
                if pair_work is not None:
                    pair_work.damping = self._damping_of(group)
                    work.pairs.append(pair_work)
            for p in group["params"]:
                if p.grad is None or id(p) in lora_ids:
                    continue
                if p.grad.is_sparse:
                    raise LoRAProConfigError(
                        "sparse gradients are not supported; use dense embeddings (sparse=False)"
                    )
                work.params.append(p)
                work.grads.append(p.grad)
            works.append(work)
        self._sharding.end_collect()
        return works

    def _pair_work(self, pair: LoRAPair) -> PairWork | None:
        """The layer's share of this step, or None when it has nothing to do."""
        train_A, train_B = pair.A.requires_grad, pair.B.requires_grad
        if not (train_A or train_B):
            return None  # frozen since the optimizer was built: never updated
        # A frozen factor's gradient (if one is left over) takes no part in the step.
        gA = pair.A.grad if train_A else None
        gB = pair.B.grad if train_B else None
        if gA is None and gB is None:
            return None  # the layer took no part in this forward pass
        if (gA is not None and gA.is_sparse) or (gB is not None and gB.is_sparse):
            raise LoRAProConfigError(
                f"{pair.name}: sparse gradients are not supported; use dense embeddings (sparse=False)"
            )
        dtype = compute_dtype(pair.A.dtype)
        storage = self._sharding.storage(pair)  # whole factors, or this rank's canonical shards
        A = _in_dtype(storage.local_A(pair.A), dtype)
        B = _in_dtype(storage.local_B(pair.B), dtype)
        gA = torch.zeros_like(A) if gA is None else _in_dtype(storage.local_A(gA), dtype)
        gB = torch.zeros_like(B) if gB is None else _in_dtype(storage.local_B(gB), dtype)
        return PairWork(pair, pair.scaling, A, B, gA, gB, storage=storage, train_A=train_A, train_B=train_B)

    def _solve(
        self, pair_works: list[PairWork], x_mode_of: Callable[[PairWork], str], precise: bool | None = None
    ) -> Solved:
        """Coefficients for every layer (the terms summed over shards where the factors are).
        ``precise=None`` forms the terms in float32 and again in float64 where float32 cannot hold
        them (a host read); the step decides this itself after its non-finite check."""
        solved = solve_pairs(pair_works, x_mode_of, self._sharding.reduce_terms, precise=bool(precise))
        if precise is None and solved.needs_float64_terms():
            solved = solve_pairs(pair_works, x_mode_of, self._sharding.reduce_terms, precise=True)
        return solved

    def _damping_of(self, group: dict[str, Any]) -> float:
        """The closed form's damping for the group's layers (:func:`lorapro.closed_form.factor_basis`):
        none unless a subclass has the option."""
        return 0.0

    def _x_mode_of(self, works: list[GroupWork]) -> Callable[[PairWork], str]:
        """The X each layer is solved with: its group's (subclasses may choose per mode)."""
        group_of = {id(w): g.group for g in works for w in g.pairs}
        return lambda w: group_of[id(w)]["x_mode"]

    def _prepare(self, works: list[GroupWork], precise: bool = False) -> Solved:
        """Solve every layer's coefficients before anything is checked or updated."""
        return self._solve([w for g in works for w in g.pairs], self._x_mode_of(works), precise)

    def _adjusted_updates(
        self, work: GroupWork, solved: Solved
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """The group's trained LoRA factors with their adjusted gradients, chunk by chunk.

        Yields ``(params, grads)`` lists, each gradient laid out like its parameter. A chunk's
        gradients live in a buffer that the next chunk overwrites: update with them at once.
        """
        for chunk in adjusted_chunks(work.pairs, solved):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for w in chunk:
                assert w.adjusted_A is not None and w.adjusted_B is not None and w.storage is not None
                gA, gB = w.storage.as_params(w.adjusted_A, w.adjusted_B)
                if w.train_A:
                    params.append(w.pair.A)
                    grads.append(gA)
                if w.train_B:
                    params.append(w.pair.B)
                    grads.append(gB)
            yield params, grads

    def _apply(self, work: GroupWork, solved: Solved) -> None:
        raise NotImplementedError

    def _check_before_apply(self, works: list[GroupWork]) -> None:
        """Raise for anything that would stop ``_apply`` part-way (nothing is modified yet)."""

    def _nonfinite(self, works: list[GroupWork], solved: Solved) -> bool:
        """Does any gradient of this step hold NaN or Inf? One host sync.

        LoRA gradients are checked through their r x r terms ``B^T gB`` and ``gA A^T``: every
        NaN or Inf in a factor's gradient reaches them through the matmul (IEEE: 0 * NaN and
        0 * Inf are NaN), so the (m, r) and (r, n) tensors need no pass of their own. The
        solved coefficients are checked too, and a bound on each layer's adjusted gradients (see
        :func:`lorapro._solve.solve_pairs`).
        """
        tensors: list[Tensor] = list(solved.checked)
        for work in works:
            tensors += local_tensors(work.grads)
        # The one sync per step (GradScaler pays the same). With sharded factors the r x r terms
        # are already summed over ranks, so a NaN in any rank's shard is in every rank's terms;
        # agree() makes the verdict on the other parameters' local shards the same on every rank.
        return self._sharding.agree(any_nonfinite(tensors))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step: adjust the LoRA gradients by Theorem 2.1, then update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()
        self._ownership.stop_checking_forward()  # from now on every step checks (sync_pairs)
        solved = self._prepare(works)
        nonfinite = self._nonfinite(works, solved)
        if solved.needs_float64_terms():  # factors at scales float32 Gram matrices cannot hold
            solved = self._prepare(works, precise=True)
            nonfinite = self._nonfinite(works, solved)
        if nonfinite:
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    "a gradient holds NaN or Inf; no parameter or optimizer state was changed. Find the "
                    "cause (learning rate, loss scale, bad batch), or construct the optimizer with "
                    "nonfinite='skip' to skip such steps (counted in optimizer.skipped_steps)."
                )
            self.skipped_steps += 1
            return loss
        self._check_before_apply(works)
        for work in works:
            self._apply(work, solved)
        return loss

    # -- state dict ------------------------------------------------------------------------
    def _expected_state_shapes(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple[int, ...]]:
        """Shapes of the state tensors this optimizer keeps for ``param`` in ``group``."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking that it belongs to this model and mode first.

        Unlike ``torch.optim``, moments keep the dtype they were saved in (float32 for
        low-precision parameters) instead of being cast to the parameter dtype.
        """
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise LoRAProConfigError(
                "not an optimizer state dict: expected the keys 'state' and 'param_groups'"
            )
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise LoRAProConfigError(
                "the state dict was saved from a different model or parameter grouping (the number of "
                "groups or of parameters per group differs); build the optimizer the same way as when saving"
            )
        id_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        for saved_group in saved_groups:
            # With this optimizer's tensors in place of the saved ids, so that checks on the
            # parameters themselves (fused=True's dtype and device) run on load too.
            params = [id_to_param[i] for i in saved_group["params"]]
            merged = {**self.defaults, **saved_group, "params": params}
            missing = [k for k in self._option_keys if k not in saved_group and k not in self._added_options]
            if missing:
                raise LoRAProConfigError(
                    f"the state dict's param groups lack {missing}: it was saved by another optimizer "
                    f"(not {type(self).__name__}); load a state dict saved by the same optimizer class"
                )
            self._validate_group(merged)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, entry in saved_state.items():
            param = id_to_param.get(saved_id)
            if param is None:
                raise LoRAProConfigError(f"state for unknown parameter id {saved_id} in the state dict")
            group = dict(group_of[id(param)])
            saved_group = next(g for g in saved_groups if saved_id in g["params"])
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            expected = self._expected_state_shapes(group, param)
            got = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor) and k != "step"}
            if got and got != expected:
                raise LoRAProConfigError(
                    f"the state dict does not match this model/mode: a parameter of shape "
                    f"{tuple(param.shape)} has saved state {got}, expected {expected}. Load a state dict "
                    "saved from the same model with the same optimizer mode."
                )
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self._added_options.items():
                group.setdefault(key, value)
        # torch.optim casts floating state to the parameter dtype; restore the saved dtypes.
        for saved_id, entry in saved_state.items():
            param = id_to_param[saved_id]
            for key, value in entry.items():
                if isinstance(value, Tensor) and key != "step":
                    self.state[param][key] = value.to(device=param.device)
        self._ownership.index(self.param_groups)
