"""The LoRA-Pro closed form (Theorems 2.1-2.3) as pure functions.

Shapes follow PEFT and the paper: ``A`` is (r, n), ``B`` is (m, r), the adapted weight is
``W = W0 + s * B @ A``. Every function accepts any number of leading batch dimensions, so
layers of equal shape can be solved in one call.

LoRA's own gradients are ``grad_A = s B^T g`` and ``grad_B = s g A^T`` for the full gradient
``g = dL/dW``. A LoRA step therefore moves W along the *equivalent gradient*
``s (B grad_A + grad_B A)``. Theorem 2.1 picks the factor gradients whose equivalent gradient
is closest to ``g`` in Frobenius norm; the answer depends on ``g`` only through LoRA's own
gradients, so no m x n matrix is needed.

Numerics. Both Gram matrices ``B^T B`` and ``A A^T`` are r x r and symmetric positive
semi-definite. One ``eigh`` of each gives their pseudo-inverses and also diagonalises the
Sylvester equation of Theorem 2.3, so the whole solve costs two r x r eigendecompositions and
a handful of skinny matmuls. Eigenvalues below ``rtol`` times the largest are treated as zero,
which turns the inverses into pseudo-inverses: rank-deficient factors (B = 0 at PEFT's
initialisation in particular) then give the minimum-norm least-squares answer instead of
NaN or Inf, with no branching on a step counter or on tensor values.

Scale. LoRA's product is unchanged by ``A -> c A, B -> B / c``, and so is the equivalent
gradient, but the Gram matrices then span ``c^{+-2}``: in float32 they overflow or underflow
long before the adjusted gradients do. So the r x r work (the four terms, ``eigh``, the
coefficients) runs in float64 (:data:`SOLVE_DTYPE`), and a coefficient applied to float32
tensors is split into a float32 matrix and a power of two (:func:`split_power_of_two`), each
about the square root of the whole, which the matmul applies as its ``alpha`` / ``beta``: a
power of two is exact, so in the usual range this changes no bit of the result.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

XMode = Literal["sylvester", "zero", "symmetric"]
X_MODES: tuple[str, ...] = ("sylvester", "zero", "symmetric")
DEFAULT_RTOL_FACTOR = 10.0
#: The dtype of the r x r work whatever the factors' dtype (see the module docstring).
SOLVE_DTYPE = torch.float64

__all__ = [
    "X_MODES",
    "Coefficients",
    "FactorBasis",
    "GramEigen",
    "GramTerms",
    "XMode",
    "adjust_grad_A",
    "adjust_grad_B",
    "adjusted_gradient_bound",
    "apply_coefficients",
    "b_coefficient",
    "b_weights",
    "check_damping",
    "check_x_mode",
    "compute_dtype",
    "damping_scale",
    "equivalent_gradient",
    "factor_basis",
    "fold_scaling",
    "gram_a",
    "gram_b",
    "gram_eigen",
    "gram_matrices",
    "gram_out_of_range",
    "gram_pinv",
    "gram_terms",
    "layer_terms",
    "optimal_gradients",
    "solve_coefficients",
    "split_exponents",
    "split_power_of_two",
    "vec_operator",
    "vec_operators",
    "x_matrix",
]


def check_x_mode(x_mode: str) -> None:
    """Raise ``ValueError`` for an unknown ``x_mode`` (the optimizers and attach check their
    options with :func:`lorapro._validation.check_choice` first, and say the same)."""
    if x_mode not in X_MODES:
        raise ValueError(f"unknown x_mode {x_mode!r}: use one of {', '.join(X_MODES)}")


def check_damping(damping: float, x_mode: str = "sylvester") -> float:
    """``damping`` as a float, or ``ValueError``: it must be finite and >= 0, and a positive one
    needs ``x_mode="sylvester"`` (the damped problem has one minimiser, which fixes X itself)."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise ValueError(f"damping must be a real number, got {damping!r} ({type(damping).__name__})")
    damping = float(damping)
    if not (math.isfinite(damping) and damping >= 0.0):
        raise ValueError(f"damping must be finite and >= 0 (0 turns it off), got {damping!r}")
    if damping > 0.0 and x_mode != "sylvester":
        raise ValueError(
            f"damping={damping:g} defines X itself (the damped problem has a single minimiser, whose "
            f"damping -> 0 limit is Sylvester's X), so it cannot go with x_mode={x_mode!r}; use "
            "x_mode='sylvester' or damping=0"
        )
    return damping


def damping_scale(btb: Tensor, aat: Tensor) -> Tensor:
    """``(tr(B^T B) + tr(A A^T)) / r`` (batched, shape (...,)): the mean over (i, j) of ``l_i + q_j``,
    the eigenvalues of the damped problem's normal operator on the r x r block at s = 1 (see
    :func:`factor_basis`). ``damping`` is relative to it, so one value means the same whatever the
    factors' scale (A, B -> c A, c B), the scaling s, or the gradients' size."""
    r = btb.shape[-1]
    return (btb.diagonal(dim1=-2, dim2=-1).sum(-1) + aat.diagonal(dim1=-2, dim2=-1).sum(-1)) / r


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the closed form runs in: float32 at least, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _as_batch_scalar(scaling: float | Tensor, like: Tensor) -> Tensor | float:
    """Scaling broadcast against (..., rows, cols): a tensor of batch shape gains two dims."""
    if isinstance(scaling, Tensor):
        return scaling.to(device=like.device, dtype=like.dtype)[..., None, None]
    return float(scaling)


def _check_shapes(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: float | Tensor) -> None:
    """Name mismatched shapes instead of letting a matmul fail anonymously (or broadcast)."""
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(
            f"A and B must be matrices (..., r, n) and (..., m, r); got shapes {A.shape}, {B.shape}"
        )
    if A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(
            f"A of shape {tuple(A.shape)} and B of shape {tuple(B.shape)} do not form a LoRA pair: "
            "A must be (..., r, n) and B (..., m, r) with the same r and batch dimensions"
        )
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradient shapes {tuple(grad_A.shape)}, {tuple(grad_B.shape)} must equal the factor shapes "
            f"{tuple(A.shape)}, {tuple(B.shape)} (is a gradient transposed?)"
        )
    if isinstance(scaling, Tensor) and scaling.dim() > 0 and scaling.shape != A.shape[:-2]:
        raise ValueError(
            f"a scaling tensor must be 0-dim or of the batch shape {tuple(A.shape[:-2])}, "
            f"got {tuple(scaling.shape)}"
        )


def equivalent_gradient(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scaling: float | Tensor,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """The gradient a LoRA step applies to W: ``scaling * (B @ grad_A + grad_B @ A)``.

    Returns an (..., m, n) tensor: only for diagnostics and full mode, never the hot path
    of efficient mode. ``out`` (float scaling) receives it without allocating.
    """
    _check_shapes(A, B, grad_A, grad_B, scaling)
    s = _as_batch_scalar(scaling, A)
    if out is None:
        return s * (B @ grad_A + grad_B @ A)
    return _add_product_(_mm(B, grad_A, out=out), grad_B, A, beta=1.0, alpha=1.0).mul_(s)


class GramEigen(NamedTuple):
    """Eigendecomposition of an r x r Gram matrix with its pseudo-inverse spectrum."""

    values: Tensor  # (..., r) eigenvalues, clamped at zero, cut ones set to zero
    vectors: Tensor  # (..., r, r) orthonormal eigenvectors (columns)
    inverse_values: Tensor  # (..., r) 1/value where kept, 0 where cut


def default_rtol(r: int, dtype: torch.dtype) -> float:
    """The default eigenvalue cut-off of :func:`gram_eigen`, relative to the largest eigenvalue."""
    eps = torch.finfo(dtype).eps
    return max(DEFAULT_RTOL_FACTOR * r * eps, eps ** (2.0 / 3.0))


def gram_eigen(gram: Tensor, rtol: float | None = None) -> GramEigen:
    """``eigh`` of a symmetric PSD Gram matrix, with a relative cut-off for its pseudo-inverse.

    An eigenvalue is kept when it exceeds both ``rtol * max eigenvalue`` and the smallest
    normal number of the dtype (so that 1/value cannot overflow). The default ``rtol`` is
    ``max(10 * r * eps, eps ** (2/3))``. The first term keeps rounding noise out: an exactly
    zero eigenvalue was measured at up to ~0.8 * r * eps (duplicate rows, 2,000 seeds). The
    second bounds the solve's error, which grows like eps * K^3 in the condition number K of a
    factor; in float64 the first term alone kept factors so ill-conditioned that the equivalent
    gradient came out 1,000x longer than g and pointing uphill (tests/test_property.py).
    """
    r = gram.shape[-1]
    finfo = torch.finfo(gram.dtype)
    if rtol is None:
        rtol = default_rtol(r, gram.dtype)
    # Symmetrise: the Gram products are symmetric only up to rounding, and eigh reads one
    # triangle; averaging makes the result independent of which.
    sym = 0.5 * (gram + gram.mT)
    # eigh works on the matrix divided by a power of two near its largest diagonal entry (exact),
    # so its entries are of order one whatever the factors' scale. A matrix holding NaN or Inf
    # is replaced by the identity for eigh (which would raise on it) and its inverse spectrum set
    # to NaN: the adjusted gradients come out non-finite, as a non-finite gradient would make
    # them, and GradScaler or the optimizers' non-finite policy takes over.
    finite = torch.isfinite(sym).flatten(-2).all(-1)
    diag = sym.diagonal(dim1=-2, dim2=-1).amax(-1)
    usable = finite & (diag > 0)
    exponent = torch.frexp(torch.where(usable, diag, torch.ones_like(diag))).exponent
    scale = torch.ldexp(torch.ones_like(diag), -exponent)
    eye = torch.eye(r, dtype=sym.dtype, device=sym.device).expand_as(sym)
    sym = torch.where(finite[..., None, None], sym * scale[..., None, None], eye)
    values, vectors = torch.linalg.eigh(sym)
    values = values.clamp_min(0.0) / scale[..., None]
    threshold = (rtol * values.amax(dim=-1, keepdim=True)).clamp_min(finfo.tiny)
    keep = values > threshold
    values = torch.where(keep, values, torch.zeros_like(values))
    safe = torch.where(keep, values, torch.ones_like(values))
    inverse_values = torch.where(keep, safe.reciprocal(), torch.zeros_like(values))
    inverse_values = torch.where(finite[..., None], inverse_values, torch.full_like(values, float("nan")))
    return GramEigen(values, vectors, inverse_values)


def _pinv(eig: GramEigen) -> Tensor:
    return (eig.vectors * eig.inverse_values[..., None, :]) @ eig.vectors.mT


def gram_pinv(gram: Tensor, rtol: float | None = None) -> Tensor:
    """Pseudo-inverse of a symmetric PSD Gram matrix (batched), with :func:`gram_eigen`'s cut-off."""
    return _pinv(gram_eigen(gram, rtol))


class FactorBasis(NamedTuple):
    """The closed form's r x r pieces that depend on A and B only, at scaling s = 1.

    Computed once per optimizer step (the factors do not change between micro-batches) and
    reused for every gradient until A or B changes. With the eigenbases ``B^T B = U diag(l) U^T``
    and ``A A^T = V diag(q) V^T``, every r x r map of a gradient term ``M`` the closed form needs
    is ``U ((U^T M V) * weights) V^T`` for fixed weights; this holds them.
    """

    u: Tensor  # (..., r, r) eigenvectors of B^T B (columns)
    v: Tensor  # (..., r, r) eigenvectors of A A^T
    pinv_b: Tensor  # (B^T B)^+, or (B^T B + mu I)^-1 when damped
    pinv_a: Tensor  # (A A^T)^+, or (A A^T + mu I)^-1 when damped
    x_weights: Tensor  # X = U ((U^T R V) * x_weights) V^T for R = grad_A A^T
    proj_weights: Tensor  # (B^T B)^+ S (A A^T)^+ = U ((U^T S V) * proj_weights) V^T (l+_i q+_j)


def factor_basis(
    btb: Tensor,
    aat: Tensor,
    x_mode: XMode | str = "sylvester",
    rtol: float | None = None,
    damping: float = 0.0,
) -> FactorBasis:
    """:class:`FactorBasis` from the Gram matrices ``B^T B`` and ``A A^T`` (batched): two ``eigh``.

    X of Theorem 2.1 for the chosen ``x_mode``, written for the Sylvester right-hand side
    ``C = -(B^T B)^+ R`` with ``R = grad_A A^T`` (Theorem 2.3's ``B^T B X + X A A^T = C``, at
    s = 1). In the eigenbases the equation is diagonal: ``X~_ij (l_i + q_j) = C~_ij``.

    - ``"sylvester"``: the unique solution (min-norm where both spectra are cut), which keeps
      the adjusted gradients closest to LoRA's own; it also makes the adjusted pair the
      minimum-norm least-squares solution.
    - ``"symmetric"``: Eq. 16 in its consistent r x r form ``X = (1/2) C (A A^T)^+``,
      i.e. ``X~_ij = C~_ij q_j^+ / 2``; it balances ``B g^A`` against ``g^B A`` inside
      span(B) x rowspace(A).
    - ``"zero"``: X = 0.

    ``damping = rho > 0`` (``"sylvester"`` only) solves the ridge-regularised problem instead::

        min ||s (B gA + gB A) - G||_F^2 + lambda (||gA||_F^2 + ||gB||_F^2),
        lambda = rho * s^2 * (tr(B^T B) + tr(A A^T)) / r          (see :func:`damping_scale`)

    whose normal equations read ``(L* L + lambda) (gA, gB) = (grad_A, grad_B)`` for LoRA's own
    gradients, so G is not needed. Its rho -> 0+ limit is the minimum-norm least-squares pair, i.e.
    today's Sylvester answer; as rho grows the pair tends to ``(grad_A, grad_B) / lambda``, LoRA's
    gradients up to a positive scale. With ``mu = lambda / s^2``, the pieces become
    ``(B^T B + mu I)^-1`` and ``(A A^T + mu I)^-1`` in place of the pseudo-inverses, and in the
    eigenbases ``X~_ij = -R~_ij / ((l_i + mu)(l_i + q_j + mu))`` and B's coefficient
    ``-S~_ij / ((q_j + mu)(l_i + q_j + mu))`` (``S = B^T grad_B``): every coefficient still carries
    1/s^2, so the solve stays at s = 1. Why relative to ``l_i + q_j``: those are the eigenvalues of
    ``L* L`` on the r x r block (at s = 1), so rho is a fraction of their mean, a number without
    units; right after PEFT's B = 0 initialisation it is set by A's scale, which is what keeps
    ``(B^T B + mu I)^-1`` from blowing up while B is tiny. Eigenvalues below the cut-off still
    count as zero (the right-hand side has no component there), so rho -> 0 is today's answer.
    The written formulas are the ridge minimiser when ``R = S`` (LoRA's gradients of any loss);
    otherwise X is taken from R, as Theorem 2.3 writes it, and at rho = 0 this is today's answer
    for any inputs.
    """
    check_x_mode(x_mode)
    damping = check_damping(damping, x_mode)
    # One batched eigh for both Gram matrices of every layer (half the calls of two).
    both = gram_eigen(torch.stack((btb, aat)), rtol)
    mu = None
    if damping:
        mu = damping * damping_scale(btb, aat)  # (...,): one shift per problem, for both Gram matrices
        # 1/(value + mu) where the value survived the cut, 0 where it did not; NaN (a non-finite
        # Gram matrix, see gram_eigen) stays NaN.
        shifted = both.values + mu[None, ..., None]
        damped = torch.where(both.values > 0, 1.0 / torch.where(both.values > 0, shifted, 1.0), 0.0)
        damped = torch.where(torch.isnan(both.inverse_values), both.inverse_values, damped)
        both = GramEigen(both.values, both.vectors, damped)
    eig_b, eig_a = (GramEigen(*parts) for parts in zip(*(t.unbind(0) for t in both), strict=True))
    l, q = eig_b.values, eig_a.values
    l_inv, q_inv = eig_b.inverse_values, eig_a.inverse_values
    proj = l_inv[..., :, None] * q_inv[..., None, :]
    if x_mode == "sylvester":
        # Keep X~_ij only where both eigenvalues survived the cut: elsewhere the right-hand
        # side is zero in exact arithmetic (it carries a factor l_i^+ and A^T v_j), and the
        # truncated problem's solution is zero there too.
        keep = (l > 0)[..., :, None] & (q > 0)[..., None, :]
        total = l[..., :, None] + q[..., None, :]
        if mu is not None:
            total = total + mu[..., None, None]
            # B's coefficient is -(proj + x_weights) (b_weights); this makes it the ridge
            # minimiser's -1/((q + mu)(l + q + mu)). At mu = 0 the factor is 1 and proj is l+ q+.
            proj = proj * torch.where(
                keep, (total + mu[..., None, None]) / torch.where(keep, total, 1.0), 0.0
            )
        denom = torch.where(keep, total, torch.ones_like(proj))
        x_weights = torch.where(keep, -l_inv[..., :, None] / denom, torch.zeros_like(proj))
    elif x_mode == "symmetric":
        x_weights = -0.5 * proj
    else:
        x_weights = torch.zeros_like(proj)
    pinv_b, pinv_a = _pinv(both).unbind(0)
    return FactorBasis(eig_b.vectors, eig_a.vectors, pinv_b, pinv_a, x_weights, proj)


def b_weights(basis: FactorBasis) -> Tensor:
    """B's coefficient in the eigenbases when X's right-hand side is ``B^T grad_B`` too."""
    return -(basis.proj_weights + basis.x_weights)


def _in_bases(basis: FactorBasis, m: Tensor) -> Tensor:
    return basis.u.mT @ m @ basis.v


def _from_bases(basis: FactorBasis, m: Tensor) -> Tensor:
    return basis.u @ m @ basis.v.mT


def x_matrix(basis: FactorBasis, grad_a_at: Tensor) -> Tensor:
    """X of Theorem 2.1 at s = 1 from ``R = grad_A A^T`` (r x r, batched)."""
    return _from_bases(basis, _in_bases(basis, grad_a_at) * basis.x_weights)


def b_coefficient(basis: FactorBasis, bt_grad_b: Tensor, grad_a_at: Tensor | None = None) -> Tensor:
    """``-((B^T B)^+ B^T grad_B (A A^T)^+ + X)`` at s = 1 (r x r, batched): the matrix that,
    with ``grad_B (A A^T)^+``, gives B's adjusted gradient (see :class:`Coefficients`).

    ``grad_a_at=None`` takes X's right-hand side from ``B^T grad_B`` instead of ``grad_A A^T``.
    For LoRA's own gradients of any loss the two are equal (both are ``s B^T G A^T``, G the
    gradient of the merged weight), so B's adjusted gradient then needs B's gradient alone:
    that is what lets :func:`lorapro.attach` adjust B inside backward, before A's gradient
    exists. Both reduce to the same bases, hence one pass: ``-U ((U^T S V) * (l+ q+ + x_w)) V^T``.
    """
    s_eig = _in_bases(basis, bt_grad_b)
    if grad_a_at is None:
        return _from_bases(basis, s_eig * b_weights(basis))
    return _from_bases(basis, -(s_eig * basis.proj_weights) - _in_bases(basis, grad_a_at) * basis.x_weights)


class GramTerms(NamedTuple):
    """The four r x r reductions the closed form needs from the (m, r) and (r, n) operands.

    Each is a sum over m (rows of B) or over n (columns of A), so with B sharded by rows and
    A by columns the terms of the shards simply add up: a distributed optimizer all-reduces
    these 4 r^2 numbers per layer instead of gathering the factors.
    """

    btb: Tensor  # B^T B
    aat: Tensor  # A A^T
    bt_grad_b: Tensor  # B^T grad_B
    grad_a_at: Tensor  # grad_A A^T


class Coefficients(NamedTuple):
    """r x r matrices that turn LoRA's gradients into LoRA-Pro's, for scaling s = 1::

    new_grad_A = (1/s^2) (grad_A_coef @ grad_A + a_coef @ A)
    new_grad_B = (1/s^2) (grad_B @ grad_B_coef + B @ b_coef)

    Every term of Theorem 2.1 is proportional to 1/s^2 (X included), so one solve at s = 1
    serves layers of any scaling: the scale is applied when the coefficients are used.
    """

    grad_a_coef: Tensor  # (B^T B)^+ ((B^T B + mu I)^-1 when damped)
    a_coef: Tensor  # X
    grad_b_coef: Tensor  # (A A^T)^+ ((A A^T + mu I)^-1 when damped)
    b_coef: Tensor  # -((B^T B)^+ B^T grad_B (A A^T)^+ + X)


def gram_b(B: Tensor) -> Tensor:
    """``B^T B`` (batched) in :data:`SOLVE_DTYPE` whatever B's dtype: a float32 product of a factor
    scaled by 1e20 would overflow (and one scaled by 1e-20 underflow)."""
    B = B.to(SOLVE_DTYPE)
    return B.mT @ B


def gram_a(A: Tensor) -> Tensor:
    """``A A^T`` (batched) in :data:`SOLVE_DTYPE` (see :func:`gram_b`)."""
    A = A.to(SOLVE_DTYPE)
    return A @ A.mT


def gram_matrices(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``B^T B`` and ``A A^T`` (batched) in :data:`SOLVE_DTYPE`."""
    return gram_b(B), gram_a(A)


def gram_terms(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> GramTerms:
    """The r x r reductions of one layer (or a batch of layers), see :class:`GramTerms`, in
    :data:`SOLVE_DTYPE` (see :func:`gram_matrices`)."""
    A, B, grad_A, grad_B = (t.to(SOLVE_DTYPE) for t in (A, B, grad_A, grad_B))
    return GramTerms(B.mT @ B, A @ A.mT, B.mT @ grad_B, grad_A @ A.mT)


def layer_terms(
    layers: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], precise: bool = False
) -> tuple[Tensor, list[int]]:
    """The four terms of many layers of one rank, stacked: ``(terms, counts)`` with ``terms`` of
    shape (K, 4, r, r) in :data:`SOLVE_DTYPE` (the order of :class:`GramTerms`) and ``counts[i]``
    the problems of layer i: one, or one per expert for (E, r, n) / (E, m, r) MoE factors.

    The products run in the inputs' dtype and are converted: float64 products of (m, r) factors
    cost several times float32's on the CPU. That is exact enough wherever the Gram matrices stay
    well inside float32's range, which :func:`gram_out_of_range` tells; ``precise=True`` forms
    every product in float64 (factors scaled by 1e+-20, whose Gram matrices float32 cannot hold).
    Fresh r x r results stacked once: cheaper per layer than writing into views of a buffer, and
    this runs for every layer each step.
    """
    products: list[Tensor] = []
    counts: list[int] = []
    for A, B, grad_A, grad_B in layers:
        if precise:
            A, B, grad_A, grad_B = (t.to(SOLVE_DTYPE) for t in (A, B, grad_A, grad_B))
        Bt, At = B.mT, A.mT
        products += [Bt @ B, A @ At, Bt @ grad_B, grad_A @ At]
        counts.append(1 if A.dim() == 2 else A.shape[0])
    if len(counts) == sum(counts):
        terms = torch.stack(products).unflatten(0, (len(counts), 4))
    else:
        r = products[0].shape[-1]
        terms = torch.cat([torch.stack(products[4 * i : 4 * i + 4], dim=-3).reshape(-1, 4, r, r)
                           for i in range(len(counts))])  # fmt: skip
    return terms.to(SOLVE_DTYPE), counts


#: A Gram matrix formed in float32 is trusted when its diagonal (the factors' squared column or
#: row norms) lies within these powers of two or is zero: far from float32's overflow (2^128) and
#: from its subnormals (2^-126), where the products lose digits.
GRAM_FLOAT32_RANGE = (2.0**-100, 2.0**100)


def gram_out_of_range(grams: Tensor) -> Tensor:
    """Per problem (over the last three dims of (K, G, r, r)), a bool: does a Gram matrix formed in
    float32 fall outside :data:`GRAM_FLOAT32_RANGE` (or hold NaN or Inf)? Then it must be formed
    again in float64."""
    diag = grams.diagonal(dim1=-2, dim2=-1).flatten(-2)
    low, high = GRAM_FLOAT32_RANGE
    bad = ~torch.isfinite(diag) | (diag > high) | ((diag > 0) & (diag < low))
    return bad.any(-1)


def fold_scaling(t: Tensor, scaling: float | Tensor | Sequence[float]) -> Tensor:
    """``t / s^2`` in place, for one scaling or one per leading index of ``t`` (a sequence of
    floats: no host-to-device copy per step when they all agree). Every term of Theorem 2.1 goes
    with 1/s^2 (X included), so one solve at s = 1 serves layers of any scaling; this is the one
    place the scale enters."""
    if isinstance(scaling, Tensor):
        return t.mul_((1.0 / (scaling * scaling)).to(device=t.device, dtype=t.dtype).reshape(
            *scaling.shape, *(1,) * (t.dim() - scaling.dim())))  # fmt: skip
    if isinstance(scaling, numbers.Real):
        scaling = [float(scaling)] * (t.shape[0] if t.dim() > 2 else 1)
    inv_s2 = [1.0 / (s * s) for s in scaling]
    if len(set(inv_s2)) == 1:  # the usual case: one scaling for every layer
        return t.mul_(inv_s2[0]) if inv_s2[0] != 1.0 else t
    for part, factor in zip(t.unbind(0), inv_s2, strict=True):
        part.mul_(factor)
    return t


def adjusted_gradient_bound(coefficients: Tensor, terms: Tensor, grad_norms: Tensor) -> Tensor:
    """A bound on the Frobenius norm of each problem's adjusted gradients, (K,): the larger of
    ``|P| |grad_A| + |X| |A|`` and ``|Q| |grad_B| + |b| |B|``, from the (K, 4, r, r) coefficients
    (1/s^2 folded in), the terms (``|A|`` and ``|B|`` from the traces of the Gram matrices) and the
    (K, 2) norms of the raw gradients. The coefficients are applied split by powers of two
    (:func:`split_power_of_two`), so they stay finite where an adjusted gradient would overflow:
    this is what tells."""
    coef_norms = torch.linalg.matrix_norm(coefficients)  # (K, 4): P, X, Q, b
    factor_norms = terms[:, :2].diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()  # (K, 2): |B|, |A|
    bound_A = coef_norms[:, 0] * grad_norms[:, 0] + coef_norms[:, 1] * factor_norms[:, 1]
    bound_B = coef_norms[:, 2] * grad_norms[:, 1] + coef_norms[:, 3] * factor_norms[:, 0]
    return torch.maximum(bound_A, bound_B)


#: The exponents :func:`split_power_of_two` returns stay within this bound, so that both the power
#: of two and the matrix it divides are normal float32 numbers for any coefficient float32 holds.
MAX_SPLIT_EXPONENT = 60


def split_power_of_two(coef: Tensor, *, unsplit: int = 0) -> tuple[Tensor, Tensor]:
    """Split each matrix (over the last two dims) as ``coef = matrix * 2**k`` with ``2**k`` about
    the square root of its largest entry: returns ``(matrix, k)``, k an integer-valued float
    tensor of the batch shape (0 for a zero or non-finite matrix; see :func:`split_exponents`
    for ``unsplit``).

    A float32 matmul that applies a coefficient holding ``1e-40`` (the pseudo-inverse of ``B^T B``
    for B scaled by 1e20) cannot hold it, nor a product on the way that the final ``2**k`` brings
    back into range; ``matrix`` and ``2**k`` each stay near the square root, and the matmul applies
    ``2**k`` as its ``alpha`` / ``beta`` (exact: a power of two).
    """
    k = split_exponents(coef.abs().amax(dim=(-2, -1)), unsplit=unsplit)
    return coef * torch.exp2(-k)[..., None, None], k


#: Exponents up to this size are not worth splitting off where a coefficient is applied often
#: (attach's hooks): such a coefficient lies within 2^+-40 (about 1e+-12), far inside float32's
#: range, and a matmul with alpha = beta = 1 is the cheaper kernel.
HOOK_UNSPLIT_EXPONENT = 20


def split_exponents(amax: Tensor, *, unsplit: int = 0) -> Tensor:
    """The exponents k of :func:`split_power_of_two` for matrices whose largest absolute entries
    are ``amax``: about half of each one's binary exponent, within +-:data:`MAX_SPLIT_EXPONENT`;
    0 for a zero or non-finite ``amax``, and where ``|k| <= unsplit`` (the matrix is applied as it
    is)."""
    usable = torch.isfinite(amax) & (amax > 0)
    exponent = torch.frexp(torch.where(usable, amax, torch.ones_like(amax))).exponent.to(amax.dtype)
    k = torch.where(usable, torch.floor(exponent / 2), torch.zeros_like(amax))
    k = k.clamp(-MAX_SPLIT_EXPONENT, MAX_SPLIT_EXPONENT)
    if unsplit:
        k = torch.where(k.abs() <= unsplit, torch.zeros_like(k), k)
    return k


def vec_operators(basis: FactorBasis) -> tuple[Tensor, Tensor]:
    """The maps ``R -> X`` (:func:`x_matrix`) and ``S -> b_coefficient(S)`` (with X taken from
    ``S = B^T grad_B``) as (r^2, r^2) matrices acting on row-major ``vec``, batched.

    Both are ``(U kron V) diag(vec(weights)) (U kron V)^T``. Applying one costs a single
    matrix-vector product instead of five r x r operations, which matters where the closed form
    runs once per layer per backward (:func:`lorapro.attach`); they take r^4 numbers each, so
    they suit small ranks.
    """
    return vec_operator(basis, basis.x_weights), vec_operator(basis, b_weights(basis))


def vec_operator(basis: FactorBasis, weights: Tensor) -> Tensor:
    """The map ``M -> U ((U^T M V) * weights) V^T`` as an (r^2, r^2) matrix on row-major ``vec``
    (batched): ``(U kron V) diag(vec(weights)) (U kron V)^T``."""
    u, v = basis.u, basis.v
    r = u.shape[-1]
    uv = (u[..., :, None, :, None] * v[..., None, :, None, :]).reshape(*u.shape[:-2], r * r, r * r)
    return (uv * weights.flatten(-2)[..., None, :]) @ uv.mT


def solve_coefficients(
    btb: Tensor,
    aat: Tensor,
    bt_grad_b: Tensor,
    grad_a_at: Tensor,
    x_mode: XMode | str = "sylvester",
    rtol: float | None = None,
    damping: float = 0.0,
) -> Coefficients:
    """All the r x r work of Theorem 2.1 at s = 1: :func:`factor_basis`, X and B's coefficient.

    Batched over any leading dimensions. X's right-hand side is ``grad_A A^T``, as Theorem 2.3
    writes it. ``damping`` > 0 solves the ridge-regularised problem (see :func:`factor_basis`).
    """
    basis = factor_basis(btb, aat, x_mode, rtol, damping)
    x = x_matrix(basis, grad_a_at)
    return Coefficients(basis.pinv_b, x, basis.pinv_a, b_coefficient(basis, bt_grad_b, grad_a_at))


def _mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    if a.dim() == 2 and b.dim() == 2:
        return torch.mm(a, b, out=out)
    return torch.matmul(a, b, out=out)


def _add_product_(out: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    """``out = beta * out + alpha * (a @ b)`` in place (batched: MoE experts, any batch shape)."""
    if out.dim() == 2:
        return out.addmm_(a, b, beta=beta, alpha=alpha)
    if out.dim() == 3:
        return out.baddbmm_(a, b, beta=beta, alpha=alpha)
    if beta != 1.0:
        out.mul_(beta)
    return out.add_(a @ b, alpha=alpha)


def adjust_grad_A(
    A: Tensor,
    grad_A: Tensor,
    grad_coef: Tensor,
    coef: Tensor | None,
    out: Tensor | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> Tensor:
    """``g * grad_coef @ grad_A + c * coef @ A`` for ``scales = (g, c)``: A's adjusted gradient from
    its r x r coefficients (``(B^T B)^+`` and X, with 1/s^2 folded in, each possibly split by
    :func:`split_power_of_two`); ``coef=None`` for X = 0 (or B frozen). ``out`` receives it
    without allocating. Batched over experts."""
    if coef is None:
        out = _mm(grad_coef, grad_A, out=out)
        return out.mul_(scales[0]) if scales[0] != 1.0 else out
    # (coef @ A first, then the accumulating product: the order measured fastest in attach's hooks,
    # which call this for every layer in every backward pass; 2-D operands skip the helpers)
    if A.dim() == 2:
        return torch.mm(coef, A, out=out).addmm_(grad_coef, grad_A, beta=scales[1], alpha=scales[0])
    return _add_product_(_mm(coef, A, out=out), grad_coef, grad_A, beta=scales[1], alpha=scales[0])


def adjust_grad_B(
    B: Tensor,
    grad_B: Tensor,
    grad_coef: Tensor,
    coef: Tensor | None,
    out: Tensor | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> Tensor:
    """``g * grad_B @ grad_coef + c * B @ coef`` for ``scales = (g, c)``: B's adjusted gradient from
    its r x r coefficients (``(A A^T)^+`` and :func:`b_coefficient`, with 1/s^2 folded in);
    ``coef=None`` when A is frozen (LoRA-FA's update)."""
    if coef is None:
        out = _mm(grad_B, grad_coef, out=out)
        return out.mul_(scales[0]) if scales[0] != 1.0 else out
    if B.dim() == 2:  # (the order and the shortcut of adjust_grad_A)
        return torch.mm(B, coef, out=out).addmm_(grad_B, grad_coef, beta=scales[1], alpha=scales[0])
    return _add_product_(_mm(B, coef, out=out), grad_B, grad_coef, beta=scales[1], alpha=scales[0])


def apply_coefficients(
    A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, coefficients: Coefficients, scaling: float | Tensor
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's gradients from LoRA's, given the layer's r x r coefficients."""
    folded = fold_scaling(torch.stack(coefficients, dim=-3), scaling)  # (..., 4, r, r)
    grad_a_coef, a_coef, grad_b_coef, b_coef = folded.unbind(-3)
    new_grad_A = adjust_grad_A(A, grad_A, grad_a_coef, a_coef)
    new_grad_B = adjust_grad_B(B, grad_B, grad_b_coef, b_coef)
    return new_grad_A, new_grad_B


def optimal_gradients(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scaling: float | Tensor,
    x_mode: XMode | str = "sylvester",
    rtol: float | None = None,
    damping: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Theorem 2.1: the factor gradients whose equivalent gradient is closest to the full one.

    Args:
        A: (..., r, n) LoRA A factor. B: (..., m, r) LoRA B factor.
        grad_A, grad_B: LoRA's own gradients of A and B (same shapes).
        scaling: the LoRA scaling s (alpha/r, alpha/sqrt(r) under rsLoRA, ...), a float or a
            tensor of the batch shape.
        x_mode: how the free matrix X is chosen, see :func:`solve_x`.
        rtol: eigenvalue cut-off relative to the largest eigenvalue of each Gram matrix;
            ``None`` uses :func:`default_rtol` of the factors' precision (float32 for float32,
            bf16 and fp16 factors): the cut-off reflects what the factors can resolve, not the
            float64 of the solve.
        damping: 0 (default) for Theorem 2.1's answer; ``rho > 0`` (with ``x_mode="sylvester"``)
            for the minimiser of the ridge-regularised problem
            ``||s (B gA + gB A) - G||^2 + lambda (||gA||^2 + ||gB||^2)`` with
            ``lambda = rho * s^2 * (tr(B^T B) + tr(A A^T)) / r``: the pseudo-inverses become
            ``(B^T B + mu I)^-1``, ``(A A^T + mu I)^-1`` (``mu = lambda / s^2``) and X changes
            with them (:func:`factor_basis`).

    Returns:
        ``(grad_A, grad_B)`` adjusted, in the dtype of ``A`` and ``B``::

            gA = (1/s^2) (B^T B)^+ grad_A + X A
            gB = (1/s^2) [I - B (B^T B)^+ B^T] grad_B (A A^T)^+ - B X

    The m x m projector is never formed: it is applied as ``G - B ((B^T B)^+ (B^T G))``.
    Computed in float64 and returned in the factors' dtype, so factors of any scale float32
    can hold give a finite answer.
    """
    check_x_mode(x_mode)
    damping = check_damping(damping, x_mode)
    _check_shapes(A, B, grad_A, grad_B, scaling)
    out_dtype = A.dtype
    if rtol is None:
        rtol = default_rtol(A.shape[-2], compute_dtype(torch.promote_types(A.dtype, B.dtype)))
    # Everything in float64 (see the module docstring: the factors' scale), then rounded once.
    A, B, grad_A, grad_B = (t.to(SOLVE_DTYPE) for t in (A, B, grad_A, grad_B))
    terms = gram_terms(A, B, grad_A, grad_B)
    coefficients = solve_coefficients(*terms, x_mode=x_mode, rtol=rtol, damping=damping)
    new_grad_A, new_grad_B = apply_coefficients(A, B, grad_A, grad_B, coefficients, scaling)
    return new_grad_A.to(out_dtype), new_grad_B.to(out_dtype)
