"""LoRA-Pro with AdamW: efficient mode (Algorithm 2), full mode (Algorithm 3) and factored mode
(Algorithm 3 with its moments kept in O((m + n) r) numbers per layer)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._base import GroupWork, LoRAProOptimizer
from ._solve import PairWork, Solved
from ._storage import ShardedStorage
from ._validation import check_choice, check_number
from .closed_form import XMode, compute_dtype
from .errors import LoRAProConfigError
from .factored import factored_directions, reproject_moments, second_moment_shapes
from .full_mode import equivalent_gradient_directions, factor_updates
from .functional import AdamMoments, adamw_update, fused_kernel_applies

__all__ = ["MODES", "LoRAProAdamW"]

MODES = ("efficient", "full", "factored", "factored-first-moment", "factored-sm3", "factored-nmf")
#: Modes that run Adam on the equivalent gradient (Algorithm 3), with full fine-tuning's weight decay.
EQUIVALENT_GRADIENT_MODES = ("full", "factored", "factored-first-moment", "factored-sm3", "factored-nmf")
#: The factored modes' second moments (:data:`lorapro.factored.SECOND_MOMENTS`).
FACTORED_SECOND_MOMENT = {
    "factored": "adafactor",
    "factored-first-moment": "dense",
    "factored-sm3": "sm3",
    "factored-nmf": "nmf",
}


def _check_full_mode_decay(lr: float, weight_decay: float) -> None:
    if lr * weight_decay >= 1.0:
        raise LoRAProConfigError(
            f"full mode needs lr * weight_decay < 1 (sqrt(1 - lr*wd) scales A and B), got "
            f"lr={lr}, weight_decay={weight_decay}; lower one of them"
        )


def _check_damping(group: dict[str, Any]) -> None:
    group["damping"] = check_number("damping", group.get("damping", 0.0))
    if group["damping"] == 0.0:
        return
    if group["mode"] != "efficient":
        raise LoRAProConfigError(
            f"damping={group['damping']:g} applies to mode='efficient' only, got mode={group['mode']!r} "
            "(its moments see the equivalent gradient, which the damping would change); use "
            "mode='efficient' or damping=0"
        )
    if group["x_mode"] != "sylvester":
        raise LoRAProConfigError(
            f"damping={group['damping']:g} defines X itself (its damping -> 0 limit is Sylvester's X), so "
            f"it cannot go with x_mode={group['x_mode']!r}; use x_mode='sylvester' or damping=0"
        )


def _state_dtype(p: Tensor) -> torch.dtype:
    return compute_dtype(p.dtype)


class LoRAProAdamW(LoRAProOptimizer):
    """AdamW on LoRA-Pro's adjusted gradients.

    ``mode="efficient"`` (Algorithm 2, the paper's default): the LoRA factor gradients are
    adjusted by Theorem 2.1, then A and B get ordinary AdamW with their own moments. The state
    is exactly AdamW's (two moments per factor).

    ``mode="full"`` (Algorithm 3): the m x n equivalent gradient of each layer gets float32
    Adam moments, the Adam direction is projected back onto the factors by the closed form, and
    weight decay follows full fine-tuning (Eq. 57-58): ``W <- (1 - lr*wd) W`` is applied as
    ``A, B <- sqrt(1 - lr*wd) (A, B)`` **and ``W0 <- (1 - lr*wd) W0``: the frozen base weight
    is scaled in place**. Full mode behaves like full fine-tuning and wants a full fine-tuning
    learning rate (about 10x smaller than LoRA's).

    ``mode="factored"`` (experimental): full mode's algorithm at LoRA's optimizer memory. The
    first moment is kept in the tangent space ``{B X + Y A}`` of the factors (re-projected when
    they change) and the second as Adafactor-style row and column means, about (m + n)(r + 1)
    numbers per layer instead of 2 m n (:mod:`lorapro.factored`). Weight decay and learning rate
    as in full mode. ``mode="factored-first-moment"`` factors only the first moment and keeps
    full mode's m x n second moment: a diagnostic variant, to tell which factorisation costs
    quality. ``mode="factored-sm3"`` and ``mode="factored-nmf"`` (experimental) keep factored
    mode's first moment with another second moment in O(m + n) numbers per layer: SM3's row and
    column cover (m + n), or a rank-2 non-negative factorisation (2 (m + n)); both form m x n
    temporaries inside the step, as full mode does.

    Args:
        model: the model holding PEFT LoRA layers (pairs are found by module).
        lr: learning rate. betas, eps, weight_decay: as ``torch.optim.AdamW``.
        mode: ``"efficient"``, ``"full"``, ``"factored"``, ``"factored-first-moment"``,
            ``"factored-sm3"`` or ``"factored-nmf"``.
        x_mode: ``"sylvester"`` (Theorem 2.3), ``"zero"`` or ``"symmetric"`` (Eq. 16).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf;
            either way nothing is modified.
        foreach: use the multi-tensor AdamW path (default, ``None``: on) or per-tensor updates.
        fused: torch's fused AdamW kernel for the moments. ``None`` (default) uses it wherever
            it applies, i.e. for float32/float64 parameters on the CPU (one pass per tensor,
            about 4x faster there than foreach: docs/performance.md), and the foreach path
            elsewhere (CUDA, and bf16/fp16 parameters, whose moments are float32). ``True``
            insists: every parameter must be a float32/float64 CPU tensor. ``False`` never
            uses it.
        params: parameters or param groups (default: every trainable parameter of ``model``).
            Both factors of a LoRA pair must be in the same group.
        damping: efficient mode with ``x_mode="sylvester"`` only: 0 (default) adjusts by
            Theorem 2.1; ``rho > 0`` by the ridge-regularised problem of
            :func:`lorapro.closed_form.factor_basis` (``(B^T B + mu I)^-1`` in place of the
            pseudo-inverse, mu = rho times the mean of the Gram matrices' eigenvalues, and X to
            match); large rho tends to plain LoRA's gradients up to a scale. Experimental.

    Parameters that are not LoRA factors (heads, ``modules_to_save``, biases) get plain AdamW.
    Moments are float32 for bf16/fp16 parameters.
    """

    _added_options: ClassVar[dict[str, Any]] = {"damping": 0.0}

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "efficient",
        x_mode: XMode = "sylvester",
        *,
        nonfinite: str = "raise",
        foreach: bool | None = None,
        fused: bool | None = None,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        damping: float = 0.0,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "mode": mode, "x_mode": x_mode, "foreach": foreach, "fused": fused, "damping": damping,
        }  # fmt: skip
        super().__init__(model, params, defaults, nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise LoRAProConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        group["betas"] = (
            check_number("betas[0]", betas[0], high=1.0, open_high=True),
            check_number("betas[1]", betas[1], high=1.0, open_high=True),
        )
        # eps = 0 divides 0 by 0 where an adjusted gradient is exactly zero (grad_A at B = 0).
        group["eps"] = check_number("eps", group["eps"], open_low=True)
        check_choice("mode", group["mode"], MODES)
        if group["foreach"] not in (None, True, False):
            raise LoRAProConfigError(f"foreach must be None, True or False, got {group['foreach']!r}")
        if group["fused"] not in (None, True, False):
            raise LoRAProConfigError(f"fused must be None, True or False, got {group['fused']!r}")
        if group["fused"] is True:
            if group["foreach"] is False:
                raise LoRAProConfigError(
                    "fused=True and foreach=False ask for two different AdamW paths; drop one of them"
                )
            for p in group["params"]:
                if not fused_kernel_applies(p.device, p.dtype, _state_dtype(p)):
                    raise LoRAProConfigError(
                        f"fused=True needs float32/float64 parameters on the CPU, got a {p.dtype} "
                        f"parameter on {p.device} (bf16/fp16 parameters keep float32 moments, which the "
                        "fused kernel cannot hold; on CUDA the foreach path is used). Use fused=None to "
                        "fuse wherever it applies."
                    )
        if group["mode"] in EQUIVALENT_GRADIENT_MODES:
            _check_full_mode_decay(group["lr"], group["weight_decay"])
        _check_damping(group)

    def _expected_state_shapes(self, group, param):
        if group["mode"] in EQUIVALENT_GRADIENT_MODES and id(param) in self._ownership.lora_ids:
            pair = next(p for p in self.pairs if param is p.A or param is p.B)
            if param is not pair.B:
                return {}
            (r, n), m = pair.matrix_A().shape[-2:], pair.matrix_B().shape[-2]
            if group["mode"] == "full":
                shape = (m, n) if pair.experts == 1 else (pair.experts, m, n)
                return {"equiv_exp_avg": shape, "equiv_exp_avg_sq": shape}
            shapes = {"tangent_x": (r, n), "tangent_y": (m, r)}
            return {**shapes, **second_moment_shapes(FACTORED_SECOND_MOMENT[group["mode"]], m, n)}
        return {"exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}

    @staticmethod
    def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        # Multi-tensor kernels by default: fewer launches on GPU, less Python on CPU.
        return True if group["foreach"] is None else group["foreach"]

    @staticmethod
    def _use_fused(group: dict[str, Any]) -> bool:
        # An explicit foreach=False asks for the per-tensor path, which the default respects.
        return group["fused"] is not False and group["foreach"] is not False

    def _adamw(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Plain AdamW on ``params`` with the given gradients, state created on first use."""
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
        beta1, beta2 = group["betas"]
        adamw_update(
            params, grads,
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [self.state[p]["step"] for p in params],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], foreach=self._use_foreach(group, params),
            fused=self._use_fused(group),
        )  # fmt: skip

    def _damping_of(self, group: dict[str, Any]) -> float:
        return group["damping"]

    def _x_mode_of(self, works: list[GroupWork]) -> Callable[[PairWork], str]:
        # Full mode only needs the equivalent gradient here, which X does not change: take the
        # cheapest X. Efficient mode adjusts with the group's own x_mode.
        group_of = {id(w): g.group for g in works for w in g.pairs}

        def x_mode_of(w: PairWork) -> str:
            group = group_of[id(w)]
            return "zero" if group["mode"] in EQUIVALENT_GRADIENT_MODES else group["x_mode"]

        return x_mode_of

    def _check_before_apply(self, works: list[GroupWork]) -> None:
        for work in works:
            group = work.group
            if group["mode"] not in EQUIVALENT_GRADIENT_MODES:
                continue
            if group["mode"] != "full":
                if any(isinstance(w.storage, ShardedStorage) for w in work.pairs):
                    raise LoRAProConfigError(
                        f"mode={group['mode']!r} does not support FSDP2-sharded LoRA factors yet; use "
                        "mode='full' (its moments are sharded by rows) or 'efficient' under FSDP2"
                    )
                for w in work.pairs:
                    if w.pair.experts > 1:
                        raise LoRAProConfigError(
                            f"{w.pair.name}: LoRA on MoE experts (target_parameters) is not supported by "
                            f"mode={group['mode']!r}; use mode='full' or 'efficient', which adjust every "
                            "expert's pair on its own"
                        )
                    if not (w.train_A and w.train_B):
                        raise LoRAProConfigError(
                            f"{w.pair.name}: lora_{'A' if not w.train_A else 'B'} is frozen, which "
                            f"mode={group['mode']!r} does not support (its moments live in the tangent space "
                            "of both factors); use mode='full' or 'efficient', which give the other factor "
                            "Theorem 2.1's one-factor optimum, or unfreeze it"
                        )
            # A scheduler may have raised lr since construction: check every group first.
            _check_full_mode_decay(group["lr"], group["weight_decay"])
            if group["weight_decay"] == 0.0:
                continue
            for w in work.pairs:
                base = w.pair.base_weight
                if base.dtype not in (torch.float32, torch.float64):
                    raise LoRAProConfigError(
                        f"{w.pair.name}: full-mode weight decay scales the frozen base weight by "
                        f"(1 - lr*wd) = {1 - group['lr'] * group['weight_decay']} each step, which rounds "
                        f"back to the same value in {base.dtype}: W0 would silently never decay. Keep the "
                        "base weights in float32, use weight_decay=0, or use mode='efficient'."
                    )

    def _apply(self, work: GroupWork, solved: Solved) -> None:
        group = work.group
        if group["mode"] == "efficient":
            # Each chunk of adjusted gradients is consumed while it is in cache, and its buffer
            # is reused by the next: the step never holds all of them.
            for params, grads in self._adjusted_updates(work, solved):
                self._adamw(group, params, grads)
        else:
            moments = AdamMoments(*group["betas"], group["eps"])
            if group["mode"] == "full":
                directions = equivalent_gradient_directions(work.pairs, solved, self._layer_state, moments)
                self._update_factors(group, directions)
            else:
                estimator = FACTORED_SECOND_MOMENT[group["mode"]]
                directions = factored_directions(work.pairs, solved, self._layer_state, moments, estimator)
                self._update_factors(group, directions, reproject=True)
        self._adamw(group, work.params, work.grads)

    def _layer_state(self, w: PairWork) -> dict[str, Any]:
        """Full and factored mode keep a layer's moments in the state of its B factor."""
        return self.state[w.pair.B]

    def _update_factors(self, group: dict[str, Any], works: list[PairWork], reproject: bool = False) -> None:
        """Algorithm 3's end: the closed form maps each layer's ``grad_A = s B^T D`` and
        ``grad_B = s D A^T`` to factor updates, with full fine-tuning's weight decay (Eq. 57-58);
        factored mode first projects its first moment onto the new factors."""
        solved = self._solve(works, lambda w: group["x_mode"])
        new_factors = factor_updates(works, solved, lr=group["lr"], weight_decay=group["weight_decay"])
        if reproject:  # (the works still hold the old factors)
            reproject_moments(works, new_factors, self._layer_state)
        decayed_bases: set[int] = set()
        for w, (new_A, new_B) in zip(works, new_factors, strict=True):
            assert w.storage is not None
            A, B = w.pair.A, w.pair.B
            as_A, as_B = w.storage.as_params(new_A.to(A.dtype), new_B.to(B.dtype))
            if w.train_A:
                A.copy_(as_A)
            if w.train_B:
                B.copy_(as_B)
            base = w.pair.base_weight
            if group["weight_decay"] != 0.0 and id(base) not in decayed_bases:
                decayed_bases.add(id(base))
                base.mul_(1.0 - group["lr"] * group["weight_decay"])
