"""Adam moments of the equivalent gradient kept in factored form (``LoRAProAdamW(mode="factored")``).

Full mode (Algorithm 3) runs Adam on each layer's m x n equivalent gradient
``g = s (B grad_A + grad_B A)`` and needs the Adam direction D only through ``B^T D`` (r x n)
and ``D A^T`` (m x r). Both moments can then be kept in O((m + n) r) numbers:

- **First moment in the tangent space** ``{B X + Y A}`` of the current factors (X: r x n,
  Y: m x r). The equivalent gradient lies there (X = s grad_A, Y = s grad_B), so the moment's
  update is exact within one step. When the factors change, the moment is projected onto the
  new tangent space (:func:`project_tangent`); it is exact whenever that space is everything
  (B of full row rank or A of full column rank, e.g. r >= min(m, n)), an approximation otherwise.
- **Second moment as row and column means** of the squared equivalent gradient (Adafactor's
  rank-one estimate ``v_ij ~ row_i col_j / mean``), computed from the factors without forming
  an m x n matrix (:func:`low_rank_square_sums`).

Two experimental second moments keep O(m + n) numbers per layer too but form the m x n squared
gradient and Adam direction inside the step (as full mode does), for O(m n r) work:

- **SM3's cover** (:func:`sm3_estimate`): a row and a column accumulator, the estimate
  ``v_ij = beta2 min(row_i, col_j) + (1 - beta2) g_ij^2`` and the accumulators its row and column
  maxima. By induction it is never below Adam's exponential average of ``g^2``, so it can only
  shorten Adam's step; it is exact on every matrix ``min(a_i, b_j)`` (constants included). m + n
  numbers.
- **A rank-k non-negative factorisation** (:func:`nmf_fit`, k = :data:`NMF_RANK`): the history
  ``L R^T`` (L: m x k, R: n x k) is refitted each step to ``beta2 L R^T + (1 - beta2) g^2`` by
  multiplicative updates for the I-divergence, warm-started from the last factors. Adafactor's
  estimate is this fit at k = 1 (one sweep reaches it), so k > 1 is its strict generalisation.
  The step itself uses the target, whose newest term is exact. (m + n) k numbers.

The direction ``D = diag(a) M diag(b)`` is again a sum of two rank-r products, so ``B^T D`` and
``D A^T`` cost O((m + n) r^2) (:func:`scaled_tangent_products`). The math is per layer, in the
caller's dtype (float32 at least for the optimizer), with the factors as matrices;
:func:`factored_directions` and :func:`reproject_moments` are the optimizer's step, as functions
(the factor updates are full mode's, :func:`lorapro.full_mode.factor_updates`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._solve import PairWork, Solved, adjusted_gradients
from .closed_form import default_rtol, equivalent_gradient, gram_a, gram_b, gram_pinv
from .functional import (
    AdamMoments,
    adam_denominator,
    bias_corrections,
    update_first_moment_,
    update_second_moment_,
)

__all__ = [
    "NMF_RANK",
    "NMF_SWEEPS",
    "SECOND_MOMENTS",
    "adafactor_scales",
    "factored_directions",
    "low_rank_square_sums",
    "nmf_fit",
    "project_tangent",
    "reproject_moments",
    "scaled_tangent_products",
    "second_moment_shapes",
    "sm3_estimate",
    "tangent_matrix",
]

#: The second-moment estimators of :func:`factored_directions`.
SECOND_MOMENTS = ("adafactor", "dense", "sm3", "nmf")
#: Components of the non-negative factorisation: 2 doubles Adafactor's state and stays within
#: the (m + n)(r + 1) numbers per layer of factored mode for every rank r >= 1.
NMF_RANK = 2
#: Multiplicative-update sweeps per step. Warm-started, the fit goes on improving over the steps;
#: the second sweep brings the row sums close to the target's as well as the column sums.
NMF_SWEEPS = 2


def tangent_matrix(A: Tensor, B: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """The m x n matrix ``B X + Y A`` (for tests, diagnostics and the dense variant)."""
    return torch.addmm(Y @ A, B, X)


def project_tangent(
    A_old: Tensor,
    B_old: Tensor,
    X: Tensor,
    Y: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    pinv_a: Tensor | None = None,
    pinv_b: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Orthogonally project ``Z = B_old X + Y A_old`` onto the tangent space ``{B X' + Y' A}``.

    Returns ``(X', Y')``. The projection is ``P(Z) = P_B Z + Z P_A - P_B Z P_A`` with
    ``P_B = B (B^T B)^+ B^T`` and ``P_A = A^T (A A^T)^+ A`` (Frobenius-orthogonal onto the span of
    the matrices with columns in col(B) or rows in row(A)); written in the new factors,
    ``X' = (B^T B)^+ B^T Z (I - A^T (A A^T)^+ A)`` and ``Y' = Z A^T (A A^T)^+``. Nothing of size
    m x n is formed: O((m + n) r^2). Pseudo-inverses use the closed form's cut-off
    (:func:`~lorapro.closed_form.gram_pinv`), so a zero factor (B at initialisation) contributes
    nothing; pass ``pinv_a`` = ``(A A^T)^+`` and ``pinv_b`` = ``(B^T B)^+`` when they are known
    (the optimizer computes them for all layers in one batched call).
    """
    if pinv_b is None:
        pinv_b = gram_pinv(B.mT @ B)
    if pinv_a is None:
        pinv_a = gram_pinv(A @ A.mT)
    bt_z = torch.addmm((B.mT @ Y) @ A_old, B.mT @ B_old, X)  # B^T Z, r x n
    z_at = torch.addmm(Y @ (A_old @ A.mT), B_old, X @ A.mT)  # Z A^T, m x r
    u = pinv_b @ bt_z  # P_B Z = B u
    y_new = z_at @ pinv_a  # Z P_A = y_new A
    c = u @ A.mT @ pinv_a  # P_B Z P_A = B c A
    x_new = u - c @ A
    return x_new, y_new


def low_rank_square_sums(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column sums of ``(L R^T) ** 2`` for L (m, k), R (n, k), in O((m + n) k^2).

    Row i of ``G = L R^T`` is ``L_i R^T``, whose squared norm is ``L_i (R^T R) L_i^T``; column j
    likewise with ``L^T L``. For the equivalent gradient ``k = 2r``: L = [B, grad_B] and
    R = [s grad_A^T, s A^T].
    """
    rows = ((L @ (R.mT @ R)) * L).sum(dim=-1)
    cols = ((R @ (L.mT @ L)) * R).sum(dim=-1)
    return rows.clamp_min_(0.0), cols.clamp_min_(0.0)  # >= 0 mathematically; rounding may dip


def adafactor_scales(row_mean: Tensor, col_mean: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Row and column scales a (m,), b (n,) with ``a_i b_j = 1 / sqrt(v_ij)`` for the estimate
    ``v_ij = (row_i + eps^2) (col_j + eps^2) / (mean(row) + eps^2)``.

    ``row_mean`` / ``col_mean`` are the (bias-corrected) row and column means of the squared
    gradient; ``mean(row)`` is the mean of all of it. Adding ``eps^2`` to each factor keeps the
    estimate separable: where the gradient has been zero it gives Adam's ``1 / eps``, and where
    the means are far above ``eps^2`` it is Adafactor's rank-one estimate.
    """
    e2 = eps * eps
    total = row_mean.mean() + e2
    a = ((row_mean + e2).reciprocal() * total).sqrt()
    b = (col_mean + e2).rsqrt()
    return a, b


def sm3_estimate(row: Tensor, col: Tensor, grad_sq: Tensor, beta2: float) -> tuple[Tensor, Tensor, Tensor]:
    """SM3's second moment with Adam's average: returns ``(v, new_row, new_col)``.

    ``v_ij = beta2 min(row_i, col_j) + (1 - beta2) grad_sq_ij`` (m x n), ``new_row = max_j v_ij``,
    ``new_col = max_i v_ij``. If ``min(row_i, col_j)`` bounds the previous exponential average
    from above, so does ``v`` the new one: the estimate never undershoots Adam's (a row or
    column that has only seen zeros stays exactly 0, which gives Adam's ``1 / eps``).
    """
    v = torch.minimum(row[:, None], col[None, :]).mul_(beta2).add_(grad_sq, alpha=1.0 - beta2)
    return v, v.amax(dim=1), v.amax(dim=0)


def _safe_ratio(target: Tensor, estimate: Tensor) -> Tensor:
    """``target / estimate``, 0 where the estimate is 0 (there the target is 0 too, see
    :func:`nmf_fit`, or underflowed: no information either way)."""
    return torch.where(estimate > 0, target / estimate.clamp_min(torch.finfo(estimate.dtype).tiny), 0.0)


def _ramp(size: int, k: int, like: Tensor) -> Tensor:
    """(size, k) weights: component c weighs index i by 2 if i = c (mod k), else by 1."""
    index = torch.arange(size, device=like.device)[:, None] % k
    return 1.0 + (index == torch.arange(k, device=like.device)).to(like.dtype)


def nmf_fit(L: Tensor, R: Tensor, target: Tensor, sweeps: int = NMF_SWEEPS) -> tuple[Tensor, Tensor]:
    """Refit ``L R^T`` (L: m x k, R: n x k, non-negative) to a non-negative m x n ``target`` by
    ``sweeps`` multiplicative updates for the I-divergence (Lee and Seung), starting from L, R.

    Multiplicative updates cannot revive a zero, so a row of L (of R) that is all zero first gets
    a positive start from the target's own row (column) sums, Adafactor's rank-one solution,
    split over the k components with unequal weights (equal ones would stay equal forever). A
    row whose target is zero stays zero. After that, ``target_ij > 0`` implies
    ``(L R^T)_ij > 0`` (barring underflow), and nothing divides by zero: with zero factors (the
    first step, B = 0) the result is finite. With k = 1, one sweep gives ``row_i col_j / total``
    from any start. Each R update makes the fit's column sums equal the target's. Returns new
    tensors.
    """
    if sweeps < 1:
        raise ValueError(f"nmf_fit needs sweeps >= 1, got {sweeps}")
    (m, k), n = L.shape, R.shape[0]
    tiny = torch.finfo(target.dtype).tiny
    rows, cols = target.sum(dim=1), target.sum(dim=0)
    scale = rows.sum().clamp_min(tiny).rsqrt()
    L = torch.where((L.sum(dim=1) > 0)[:, None], L, (rows * scale)[:, None] * _ramp(m, k, L))
    R = torch.where((R.sum(dim=1) > 0)[:, None], R, (cols * scale)[:, None] * _ramp(n, k, R))
    for _ in range(sweeps):
        L = L * (_safe_ratio(target, L @ R.mT) @ R) / R.sum(dim=0).clamp_min(tiny)
        R = R * (_safe_ratio(target, L @ R.mT).mT @ L) / L.sum(dim=0).clamp_min(tiny)
    return L, R


def second_moment_shapes(estimator: str, m: int, n: int) -> dict[str, tuple[int, ...]]:
    """The state tensors (name: shape) of a layer's second moment, by estimator."""
    return {
        "adafactor": {"row_sq_mean": (m,), "col_sq_mean": (n,)},
        "dense": {"equiv_exp_avg_sq": (m, n)},
        "sm3": {"sm3_row": (m,), "sm3_col": (n,)},
        "nmf": {"nmf_row": (m, NMF_RANK), "nmf_col": (n, NMF_RANK)},
    }[estimator]


def scaled_tangent_products(
    A: Tensor, B: Tensor, X: Tensor, Y: Tensor, row_scale: Tensor, col_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``B^T D`` (r, n) and ``D A^T`` (m, r) for ``D = diag(row_scale) (B X + Y A) diag(col_scale)``,
    without forming D: O((m + n) r^2)."""
    aB = row_scale[:, None] * B  # diag(a) B, m x r
    aY = row_scale[:, None] * Y
    Xb = X * col_scale  # X diag(b), r x n
    Ab = A * col_scale
    bt_d = torch.addmm((B.mT @ aY) @ Ab, B.mT @ aB, Xb)
    d_at = torch.addmm(aY @ (Ab @ A.mT), aB, Xb @ A.mT)
    return bt_d, d_at


def factored_directions(
    works: list[PairWork],
    solved: Solved,
    state_of: Callable[[PairWork], dict[str, Any]],
    moments: AdamMoments,
    second_moment: str = "adafactor",
) -> list[PairWork]:
    """Full mode's :func:`~lorapro.full_mode.equivalent_gradient_directions` with factored moments:
    advance each layer's tangent-space first moment and its ``second_moment`` estimate (one of
    :data:`SECOND_MOMENTS`: Adafactor's row and column means; ``"dense"``, full mode's m x n one,
    the diagnostic variant; SM3's cover; the rank-k factorisation) and return, per layer, a work
    whose gradients are LoRA's gradients of the Adam direction D (``s B^T D``, ``s D A^T``)."""
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"unknown second moment {second_moment!r}; use one of {SECOND_MOMENTS}")
    beta1, beta2, eps = moments
    directions: list[PairWork] = []
    for w in works:
        s = w.scaling
        adjusted_A, adjusted_B = adjusted_gradients(w, solved)
        (r, n), m = w.A.shape, w.B.shape[0]
        state = state_of(w)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["tangent_x"] = torch.zeros((r, n), dtype=w.A.dtype, device=w.A.device)
            state["tangent_y"] = torch.zeros((m, r), dtype=w.A.dtype, device=w.A.device)
            for key, shape in second_moment_shapes(second_moment, m, n).items():
                state[key] = torch.zeros(shape, dtype=w.A.dtype, device=w.A.device)
        step = state["step"]
        step += 1
        bc1, bc2 = bias_corrections(step, beta1, beta2)
        X, Y = state["tangent_x"], state["tangent_y"]
        # The equivalent gradient is B (s adjusted_A) + (s adjusted_B) A: in the tangent space
        # of the current factors, where the first moment lives, so its update is exact.
        update_first_moment_(X, s * adjusted_A, beta1)
        update_first_moment_(Y, s * adjusted_B, beta1)
        if second_moment == "adafactor":
            L = torch.cat([w.B, adjusted_B], dim=1)  # g = L R^T
            R = torch.cat([adjusted_A.mT, w.A.mT], dim=1).mul_(s)
            rows, cols = low_rank_square_sums(L, R)
            state["row_sq_mean"].mul_(beta2).add_(rows, alpha=(1.0 - beta2) / n)
            state["col_sq_mean"].mul_(beta2).add_(cols, alpha=(1.0 - beta2) / m)
            a, b = adafactor_scales(state["row_sq_mean"] / bc2, state["col_sq_mean"] / bc2, eps)
            bt_d, d_at = scaled_tangent_products(w.A, w.B, X, Y, a.div_(bc1), b)
        else:
            # The other estimators form the m x n squared gradient, as full mode does.
            g = equivalent_gradient(w.A, w.B, adjusted_A, adjusted_B, s)
            if second_moment == "dense":
                exp_avg_sq = state["equiv_exp_avg_sq"]
                update_second_moment_(exp_avg_sq, g, beta2)
            elif second_moment == "sm3":
                exp_avg_sq, row, col = sm3_estimate(state["sm3_row"], state["sm3_col"], g.square_(), beta2)
                state["sm3_row"].copy_(row)
                state["sm3_col"].copy_(col)
            else:
                Lv, Rv = state["nmf_row"], state["nmf_col"]
                # This step's square enters exactly; only the history is compressed.
                exp_avg_sq = torch.addmm(g.square_(), Lv, Rv.mT, beta=1.0 - beta2, alpha=beta2)
                new_L, new_R = nmf_fit(Lv, Rv, exp_avg_sq)
                Lv.copy_(new_L)
                Rv.copy_(new_R)
            denom = adam_denominator(exp_avg_sq, bc2, eps)
            direction = tangent_matrix(w.A, w.B, X, Y).div_(denom).div_(bc1)
            del g, denom
            bt_d, d_at = w.B.mT @ direction, direction @ w.A.mT
        directions.append(dataclasses.replace(w, grad_A=s * bt_d, grad_B=s * d_at))
    return directions


def reproject_moments(
    works: list[PairWork],
    new_factors: list[tuple[Tensor, Tensor]],
    state_of: Callable[[PairWork], dict[str, Any]],
) -> None:
    """Project each layer's first moment, written in the old factors' tangent space, onto the new
    factors' (in place in ``state_of(w)``). The pseudo-inverses of the new Gram matrices come from
    one batched ``eigh`` per rank."""
    by_rank: dict[tuple, list[int]] = defaultdict(list)
    for i, (new_A, _) in enumerate(new_factors):
        by_rank[(new_A.shape[0], new_A.dtype, new_A.device)].append(i)
    for indices in by_rank.values():
        # (layers of one rank may differ in shape: each Gram matrix on its own, then one eigh)
        btb = torch.stack([gram_b(new_factors[i][1]) for i in indices])
        aat = torch.stack([gram_a(new_factors[i][0]) for i in indices])
        dtype = new_factors[indices[0]][0].dtype
        rtol = default_rtol(btb.shape[-1], dtype)  # the factors' precision, not the float64 solve's
        pinv_b, pinv_a = gram_pinv(btb, rtol).to(dtype), gram_pinv(aat, rtol).to(dtype)
        for i, pb, pa in zip(indices, pinv_b.unbind(0), pinv_a.unbind(0), strict=True):
            w, (new_A, new_B) = works[i], new_factors[i]
            state = state_of(w)
            x, y = project_tangent(
                w.A, w.B, state["tangent_x"], state["tangent_y"], new_A, new_B, pinv_a=pa, pinv_b=pb
            )
            state["tangent_x"].copy_(x)
            state["tangent_y"].copy_(y)
