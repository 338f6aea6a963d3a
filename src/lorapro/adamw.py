"""LoRA-Pro with AdamW: efficient mode (Algorithm 2), full mode (Algorithm 3) and factored mode
(Algorithm 3 with its moments kept in O((m + n) r) numbers per layer)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._base import GroupWork, LoRAProOptimizer, PairWork, adjusted_gradients, check_choice, check_number
from ._sharded import local_tensor
from .closed_form import XMode, compute_dtype, equivalent_gradient, gram_pinv
from .errors import LoRAProConfigError
from .factored import (
    adafactor_scales,
    low_rank_square_sums,
    project_tangent,
    scaled_tangent_products,
    tangent_matrix,
)
from .functional import adam_direction, adamw_update, bias_corrections, fused_kernel_applies

__all__ = ["MODES", "LoRAProAdamW"]

MODES = ("efficient", "full", "factored", "factored-first-moment")
#: Modes that run Adam on the equivalent gradient (Algorithm 3), with full fine-tuning's weight decay.
EQUIVALENT_GRADIENT_MODES = ("full", "factored", "factored-first-moment")


def _check_full_mode_decay(lr: float, weight_decay: float) -> None:
    if lr * weight_decay >= 1.0:
        raise LoRAProConfigError(
            f"full mode needs lr * weight_decay < 1 (sqrt(1 - lr*wd) scales A and B), got "
            f"lr={lr}, weight_decay={weight_decay}; lower one of them"
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
    quality.

    Args:
        model: the model holding PEFT LoRA layers (pairs are found by module).
        lr: learning rate. betas, eps, weight_decay: as ``torch.optim.AdamW``.
        mode: ``"efficient"``, ``"full"``, ``"factored"`` or ``"factored-first-moment"``.
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

    Parameters that are not LoRA factors (heads, ``modules_to_save``, biases) get plain AdamW.
    Moments are float32 for bf16/fp16 parameters.
    """

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
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "mode": mode, "x_mode": x_mode, "foreach": foreach, "fused": fused,
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

    def _expected_state_shapes(self, group, param):
        if group["mode"] in EQUIVALENT_GRADIENT_MODES and id(param) in self._lora_ids:
            pair = next(p for p in self._pairs if param is p.A or param is p.B)
            if param is not pair.B:
                return {}
            (r, n), m = pair.matrix_A().shape[-2:], pair.matrix_B().shape[-2]
            if group["mode"] == "full":
                shape = (m, n) if pair.experts == 1 else (pair.experts, m, n)
                return {"equiv_exp_avg": shape, "equiv_exp_avg_sq": shape}
            shapes = {"tangent_x": (r, n), "tangent_y": (m, r)}
            if group["mode"] == "factored":
                return {**shapes, "row_sq_mean": (m,), "col_sq_mean": (n,)}
            return {**shapes, "equiv_exp_avg_sq": (m, n)}
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

    def _prepare(self, works: list[GroupWork]) -> None:
        # Full mode only needs the equivalent gradient here, which X does not change: take the
        # cheapest X. Efficient mode adjusts with the group's own x_mode.
        group_of = {id(w): g.group for g in works for w in g.pairs}

        def x_mode_of(w: PairWork) -> str:
            group = group_of[id(w)]
            return "zero" if group["mode"] in EQUIVALENT_GRADIENT_MODES else group["x_mode"]

        self._solve([w for g in works for w in g.pairs], x_mode_of)

    def _check_before_apply(self, works: list[GroupWork]) -> None:
        for work in works:
            group = work.group
            if group["mode"] not in EQUIVALENT_GRADIENT_MODES:
                continue
            if group["mode"] != "full":
                if any(w.sharded is not None for w in work.pairs):
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

    def _apply(self, work: GroupWork) -> None:
        group = work.group
        if group["mode"] == "efficient":
            # Each chunk of adjusted gradients is consumed while it is in cache, and its buffer
            # is reused by the next: the step never holds all of them.
            for params, grads in self._adjusted_updates(work):
                self._adamw(group, params, grads)
        elif group["mode"] == "full":
            self._apply_full(work)
        else:
            self._apply_factored(work)
        self._adamw(group, work.params, work.grads)

    def _apply_full(self, work: GroupWork) -> None:
        group = work.group
        beta1, beta2 = group["betas"]
        # Adam on each layer's m x n equivalent gradient, one layer at a time, in two m x n
        # buffers shared by all layers (the equivalent gradient, which becomes the direction,
        # and the denominator): fresh m x n temporaries per layer would be page-faulted anew on
        # the CPU every step. Then map the direction back to LoRA gradients. With FSDP2 shards
        # (w.sharded) every m x n tensor is this rank's rows, like B's shard: A and the adjusted
        # grad_A are gathered whole (r x n), and B^T D is summed over the row shards.
        largest: dict[tuple, int] = defaultdict(int)  # elements of the largest layer per dtype, device
        for w in work.pairs:
            n = w.A.shape[-1] if w.sharded is None else w.sharded.columns
            key = (w.A.dtype, w.A.device)
            largest[key] = max(largest[key], w.B.shape[:-1].numel() * n)
        scratch = {key: torch.empty((2, size), dtype=key[0], device=key[1]) for key, size in largest.items()}
        for w in work.pairs:
            sh = w.sharded
            adjusted_A, adjusted_B = adjusted_gradients(w)  # from the coefficients _prepare solved
            A = w.A if sh is None else sh.full_columns(w.A)
            if sh is not None:
                adjusted_A = sh.full_columns(adjusted_A)
            shape = (*w.B.shape[:-1], A.shape[-1])  # (m, n); (E, m, n) for MoE experts
            state = self.state[w.pair.B]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in ("equiv_exp_avg", "equiv_exp_avg_sq"):
                    if sh is None:
                        state[key] = torch.zeros(shape, dtype=w.A.dtype, device=w.A.device)
                    else:
                        state[key] = sh.row_sharded_zeros(shape[-1], w.A.dtype)
            size = math.prod(shape)
            g_equiv, denom = (buf[:size].view(shape) for buf in scratch[(w.A.dtype, w.A.device)])
            equivalent_gradient(A, w.B, adjusted_A, adjusted_B, w.scaling, out=g_equiv)
            direction = adam_direction(
                g_equiv, local_tensor(state["equiv_exp_avg"]), local_tensor(state["equiv_exp_avg_sq"]),
                state["step"], beta1=beta1, beta2=beta2, eps=group["eps"], out=g_equiv, scratch=denom,
            )  # fmt: skip
            grad_A = w.scaling * (w.B.mT @ direction)
            w.grad_A = grad_A if sh is None else sh.own_columns(sh.sum_over_rows(grad_A))
            w.grad_B = w.scaling * (direction @ A.mT)
        del scratch  # the m x n buffers are not needed by the factor updates below
        self._update_factors(work)

    def _update_factors(self, work: GroupWork, before_write: Callable[..., None] | None = None) -> None:
        """Algorithm 3's end: the closed form maps each layer's ``grad_A = s B^T D`` and
        ``grad_B = s D A^T`` to factor updates, with full fine-tuning's weight decay (Eq. 57-58).
        ``before_write(works, new_factors)`` sees every layer's new (A, B) while ``w.A`` / ``w.B``
        still hold the old factors."""
        group = work.group
        lr, wd = group["lr"], group["weight_decay"]
        self._adjust(work.pairs, lambda w: group["x_mode"])
        decay = 1.0 - lr * wd
        # W <- (1 - lr wd) W as sqrt(1 - lr wd) on each factor; with one factor frozen, the whole
        # decay on the other.
        factor_decay = {
            (True, True): (math.sqrt(decay),) * 2,
            (False, True): (1.0, decay),
            (True, False): (decay, 1.0),
        }
        # w.A and w.B may be views of the parameters: update copies, then write them.
        new_factors: list[tuple[Tensor, Tensor]] = []
        for w in work.pairs:
            assert w.adjusted_A is not None and w.adjusted_B is not None
            new_A, new_B = w.A.clone(), w.B.clone()
            decays = factor_decay[(w.train_A, w.train_B)]
            for value, delta, trained, d in ((new_A, w.adjusted_A, w.train_A, decays[0]),
                                             (new_B, w.adjusted_B, w.train_B, decays[1])):  # fmt: skip
                if not trained:
                    continue
                if wd != 0.0:
                    value.mul_(d)
                value.add_(delta, alpha=-lr)
            new_factors.append((new_A, new_B))
        if before_write is not None:
            before_write(work.pairs, new_factors)
        decayed_bases: set[int] = set()
        for w, (new_A, new_B) in zip(work.pairs, new_factors, strict=True):
            A, B = w.pair.A, w.pair.B
            if w.sharded is None:
                as_A, as_B = w.pair.param_A(new_A), w.pair.param_B(new_B)
            else:
                as_A, as_B = w.sharded.as_params(new_A.to(A.dtype), new_B.to(B.dtype))
            if w.train_A:
                A.copy_(as_A)
            if w.train_B:
                B.copy_(as_B)
            base = w.pair.base_weight
            if wd != 0.0 and id(base) not in decayed_bases:
                decayed_bases.add(id(base))
                base.mul_(decay)

    def _apply_factored(self, work: GroupWork) -> None:
        """Algorithm 3 with factored moments (:mod:`lorapro.factored`), layer by layer."""
        group = work.group
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        dense_second_moment = group["mode"] == "factored-first-moment"
        for w in work.pairs:
            s = w.scaling
            adjusted_A, adjusted_B = adjusted_gradients(w)  # from the coefficients _prepare solved
            (r, n), m = w.A.shape, w.B.shape[0]
            state = self.state[w.pair.B]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["tangent_x"] = torch.zeros((r, n), dtype=w.A.dtype, device=w.A.device)
                state["tangent_y"] = torch.zeros((m, r), dtype=w.A.dtype, device=w.A.device)
                if dense_second_moment:
                    state["equiv_exp_avg_sq"] = torch.zeros((m, n), dtype=w.A.dtype, device=w.A.device)
                else:
                    state["row_sq_mean"] = torch.zeros(m, dtype=w.A.dtype, device=w.A.device)
                    state["col_sq_mean"] = torch.zeros(n, dtype=w.A.dtype, device=w.A.device)
            step = state["step"]
            step += 1
            bc1, bc2 = bias_corrections(step, beta1, beta2)
            X, Y = state["tangent_x"], state["tangent_y"]
            # The equivalent gradient is B (s adjusted_A) + (s adjusted_B) A: in the tangent space
            # of the current factors, where the first moment lives, so its update is exact.
            X.mul_(beta1).add_(adjusted_A, alpha=(1.0 - beta1) * s)
            Y.mul_(beta1).add_(adjusted_B, alpha=(1.0 - beta1) * s)
            if dense_second_moment:
                g = equivalent_gradient(w.A, w.B, adjusted_A, adjusted_B, s)
                exp_avg_sq = state["equiv_exp_avg_sq"]
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps)
                direction = tangent_matrix(w.A, w.B, X, Y).div_(denom).div_(bc1)
                del g, denom
                bt_d, d_at = w.B.mT @ direction, direction @ w.A.mT
            else:
                L = torch.cat([w.B, adjusted_B], dim=1)  # g = L R^T
                R = torch.cat([adjusted_A.mT, w.A.mT], dim=1).mul_(s)
                rows, cols = low_rank_square_sums(L, R)
                state["row_sq_mean"].mul_(beta2).add_(rows, alpha=(1.0 - beta2) / n)
                state["col_sq_mean"].mul_(beta2).add_(cols, alpha=(1.0 - beta2) / m)
                a, b = adafactor_scales(state["row_sq_mean"] / bc2, state["col_sq_mean"] / bc2, eps)
                bt_d, d_at = scaled_tangent_products(w.A, w.B, X, Y, a.div_(bc1), b)
            w.grad_A = s * bt_d
            w.grad_B = s * d_at

        def reproject(works: list[PairWork], new_factors: list[tuple[Tensor, Tensor]]) -> None:
            # The moment was written in the old factors; the next step reads it in the new ones.
            # The pseudo-inverses of the new Gram matrices come from one batched eigh per rank.
            by_rank: dict[tuple, list[int]] = defaultdict(list)
            for i, (new_A, _) in enumerate(new_factors):
                by_rank[(new_A.shape[0], new_A.dtype, new_A.device)].append(i)
            for indices in by_rank.values():
                pinv_b = gram_pinv(torch.stack([new_factors[i][1].mT @ new_factors[i][1] for i in indices]))
                pinv_a = gram_pinv(torch.stack([new_factors[i][0] @ new_factors[i][0].mT for i in indices]))
                for i, pb, pa in zip(indices, pinv_b.unbind(0), pinv_a.unbind(0), strict=True):
                    w, (new_A, new_B) = works[i], new_factors[i]
                    state = self.state[w.pair.B]
                    x, y = project_tangent(
                        w.A, w.B, state["tangent_x"], state["tangent_y"], new_A, new_B, pinv_a=pa, pinv_b=pb
                    )
                    state["tangent_x"].copy_(x)
                    state["tangent_y"].copy_(y)

        self._update_factors(work, reproject)
