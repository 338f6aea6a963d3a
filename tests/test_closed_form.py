"""Tests of lorapro.closed_form against independent float64 references (tests/reference.py).

Shapes follow PEFT: A is (r, n), B is (m, r), W = W0 + s B A, g is the full (m, n) gradient and
LoRA's own gradients are gA_lora = s B^T g, gB_lora = s g A^T. No reference value below is computed
with lorapro code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lorapro.closed_form import equivalent_gradient, optimal_gradients
from reference import (
    kron_system,
    lora_grads,
    min_norm_lstsq,
    projected_gradient,
    sylvester_x_brute_force,
    theorem_grads,
    theorem_grads_from_full,
)

X_MODES = ("sylvester", "zero", "symmetric")
RSLORA_SCALE = 16 / math.sqrt(8)


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    r: int
    s: float
    kind: str  # full | dupA | dupB | dupAB | B0 | A0 | AB0
    seed: int

    @property
    def id(self) -> str:
        return f"m{self.m}-n{self.n}-r{self.r}-s{self.s:.3g}-{self.kind}-seed{self.seed}"

    @property
    def full_rank(self) -> bool:
        return self.kind == "full" and self.r <= min(self.m, self.n)


CASES = [
    Case(8, 6, 1, 2.0, "full", 0),  # r = 1
    Case(5, 12, 3, 0.5, "full", 1),  # m < n
    Case(12, 5, 3, RSLORA_SCALE, "full", 2),  # m > n, rsLoRA-like scaling
    Case(6, 5, 4, 2.0, "full", 3),  # r close to min(m, n)
    Case(7, 5, 5, 0.5, "full", 4),  # r = n: A square and invertible, P_A = I
    Case(5, 9, 5, 2.0, "full", 5),  # r = m: B square and invertible, P_B = I
    Case(9, 7, 3, 2.0, "dupA", 6),  # rank-deficient A (duplicate rows)
    Case(9, 7, 3, 0.5, "dupB", 7),  # rank-deficient B (duplicate columns)
    Case(8, 6, 4, RSLORA_SCALE, "dupAB", 8),  # both rank-deficient: B^T B and A A^T share the eigenvalue 0
    Case(5, 4, 6, 1.0, "full", 9),  # r > max(m, n): both Gram matrices singular
    Case(8, 6, 3, 2.0, "B0", 10),  # PEFT initialisation
    Case(7, 9, 1, 0.5, "B0", 11),  # PEFT initialisation, r = 1
    Case(8, 6, 3, 2.0, "A0", 12),
    Case(6, 8, 2, 2.0, "AB0", 13),
]
FULL_RANK_CASES = [c for c in CASES if c.full_rank]


def make_problem(case: Case, dtype: torch.dtype = torch.float64):
    """(A, B, g, gA_lora, gB_lora) as float64 torch tensors, built from a seeded generator."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    m, n, r = case.m, case.n, case.r
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if case.kind in ("dupA", "dupAB"):
        A[1] = A[0]
    if case.kind in ("dupB", "dupAB"):
        B[:, 1] = B[:, 0]
    if case.kind in ("A0", "AB0"):
        A.zero_()
    if case.kind in ("B0", "AB0"):
        B.zero_()
    gA_lora = case.s * B.T @ g
    gB_lora = case.s * g @ A.T
    return A, B, g, gA_lora, gB_lora


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def max_err(actual, expected) -> float:
    return float(
        np.max(np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)))
    )


def assert_pair_close(actual: tuple, expected: tuple, tol: float, what: str = "") -> None:
    """Both members within tol * (largest entry of the expected pair), elementwise."""
    scale = max(float(np.max(np.abs(e))) if np.size(e) else 0.0 for e in expected)
    scale = scale if scale > 0 else 1.0
    for name, a, e in zip(("grad_A", "grad_B"), actual, expected, strict=True):
        a = np64(a) if isinstance(a, torch.Tensor) else a
        assert a.shape == e.shape, f"{what} {name}: shape {a.shape} != {e.shape}"
        err = max_err(a, e)
        assert err <= tol * scale, f"{what} {name}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def run(case: Case, x_mode: str, **kwargs):
    A, B, g, gA_lora, gB_lora = make_problem(case)
    gA, gB = optimal_gradients(A, B, gA_lora, gB_lora, case.s, x_mode=x_mode, **kwargs)
    return (A, B, g, gA_lora, gB_lora), (gA, gB)


# ---------------------------------------------------------------------------------------------------------
# equivalent_gradient
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "m", "n", "r"), [((), 7, 5, 3), ((), 4, 9, 1), ((3,), 6, 8, 2), ((2, 3), 5, 4, 4)]
)
@pytest.mark.parametrize("scaling_kind", ["float", "tensor"])
def test_equivalent_gradient_matches_formula(batch, m, n, r, scaling_kind):
    gen = torch.Generator().manual_seed(20 + len(batch) + m)
    A = torch.randn(*batch, r, n, generator=gen, dtype=torch.float64)
    B = torch.randn(*batch, m, r, generator=gen, dtype=torch.float64)
    gA = torch.randn(*batch, r, n, generator=gen, dtype=torch.float64)
    gB = torch.randn(*batch, m, r, generator=gen, dtype=torch.float64)
    if scaling_kind == "float":
        scaling = 1.7
        s = np.full(batch, 1.7)
    else:
        scaling = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.25
        s = scaling.numpy()
    out = equivalent_gradient(A, B, gA, gB, scaling)
    expected = s[..., None, None] * (
        np.einsum("...ik,...kj->...ij", B.numpy(), gA.numpy())
        + np.einsum("...ik,...kj->...ij", gB.numpy(), A.numpy())
    )
    assert out.shape == (*batch, m, n)
    assert out.dtype == torch.float64
    assert max_err(out.numpy(), expected) <= 1e-12 * np.max(np.abs(expected))


# ---------------------------------------------------------------------------------------------------------
# Theorem 2.1: every X gives the optimal equivalent gradient
# ---------------------------------------------------------------------------------------------------------


def test_references_agree_with_each_other():
    """The two references for the optimum (Kronecker least squares, projectors) agree on every case."""
    for case in CASES:
        A, B, g, _, _ = (np64(t) for t in make_problem(case))
        gA, gB = min_norm_lstsq(A, B, g, case.s)
        tilde = case.s * (B @ gA + gB @ A)
        proj = projected_gradient(A, B, g)
        assert max_err(tilde, proj) <= 1e-11 * max(1.0, np.max(np.abs(g))), case.id
        # and the stacked Kronecker map really is (gA, gB) -> s (B gA + gB A)
        sol = np.concatenate([gA.reshape(-1), gB.reshape(-1)])
        assert max_err(kron_system(A, B, case.s) @ sol, tilde.reshape(-1)) <= 1e-12 * np.max(np.abs(g))


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_equivalent_gradient_is_least_squares_optimum(case, x_mode):
    (A, B, g, _, _), (gA, gB) = run(case, x_mode)
    assert gA.shape == A.shape and gB.shape == B.shape
    assert gA.dtype == torch.float64 and gB.dtype == torch.float64
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    A, B, g, gA, gB = (np64(t) for t in (A, B, g, gA, gB))
    tilde = case.s * (B @ gA + gB @ A)
    scale = np.max(np.abs(g))
    # reference 1: P_B g + (I - P_B) g P_A
    assert max_err(tilde, projected_gradient(A, B, g)) <= 1e-10 * scale
    # reference 2: product of the brute-force (gelsd) least-squares minimiser
    ls_A, ls_B = min_norm_lstsq(A, B, g, case.s)
    assert max_err(tilde, case.s * (B @ ls_A + ls_B @ A)) <= 1e-10 * scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_all_x_modes_give_same_equivalent_gradient(case):
    tildes = []
    for x_mode in X_MODES:
        (A, B, _, _, _), (gA, gB) = run(case, x_mode)
        tildes.append(equivalent_gradient(A, B, gA, gB, case.s))
    scale = max(float(tildes[0].abs().max()), 1e-300)
    for t in tildes[1:]:
        assert float((t - tildes[0]).abs().max()) <= 1e-10 * scale


# ---------------------------------------------------------------------------------------------------------
# The gradients themselves
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sylvester_is_minimum_norm_least_squares_solution(case):
    """gA_lora A^T = B^T gB_lora makes Theorem 2.3's condition the minimum-norm condition."""
    (A, B, g, _, _), out = run(case, "sylvester")
    expected = min_norm_lstsq(np64(A), np64(B), np64(g), case.s)
    assert_pair_close(out, expected, 1e-10, case.id)


@pytest.mark.parametrize("x_mode", ["zero", "symmetric"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_zero_and_symmetric_match_pinv_formulas(case, x_mode):
    (A, B, g, _, _), out = run(case, x_mode)
    expected = theorem_grads_from_full(np64(A), np64(B), np64(g), case.s, x_mode)
    assert_pair_close(out, expected, 1e-10, case.id)


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("case", FULL_RANK_CASES, ids=lambda c: c.id)
def test_matches_theorem_with_gram_matrices_and_scipy_sylvester(case, x_mode):
    """Theorem 2.1 / 2.3 as printed (Gram inverses, scipy.linalg.solve_sylvester) on full-rank inputs."""
    (A, B, _, gA_lora, gB_lora), out = run(case, x_mode)
    expected = theorem_grads(np64(A), np64(B), np64(gA_lora), np64(gB_lora), case.s, x_mode)
    assert_pair_close(out, expected, 1e-10, case.id)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sylvester_x_minimises_distance_to_lora_gradients(case):
    """Theorem 2.3: X minimises ||gA(X) - gA_lora||^2 + ||gB(X) - gB_lora||^2 (brute force in vec(X))."""
    (A, B, g, gA_lora, gB_lora), out = run(case, "sylvester")
    A, B, g, gA_lora, gB_lora = (np64(t) for t in (A, B, g, gA_lora, gB_lora))
    gA0, gB0 = theorem_grads_from_full(A, B, g, case.s, "zero")
    X = sylvester_x_brute_force(A, B, gA0, gB0, gA_lora, gB_lora)
    assert_pair_close(out, (gA0 + X @ A, gB0 - B @ X), 1e-10, case.id)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sylvester_is_closest_to_lora_gradients(case):
    def dist(x_mode):
        (_, _, _, gA_lora, gB_lora), (gA, gB) = run(case, x_mode)
        return float((gA - gA_lora).square().sum() + (gB - gB_lora).square().sum())

    d_syl = dist("sylvester")
    for other in ("zero", "symmetric"):
        assert d_syl <= dist(other) * (1 + 1e-10) + 1e-20


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_symmetric_x_balances_both_terms_inside_span(case):
    """Eq. 16 (consistent r x r form): B^T (gB A - B gA) A^T = 0."""
    (A, B, g, _, _), (gA, gB) = run(case, "symmetric")
    A, B, g, gA, gB = (np64(t) for t in (A, B, g, gA, gB))
    residual = B.T @ (gB @ A - B @ gA) @ A.T
    scale = np.linalg.norm(B) * np.linalg.norm(A) * (np.linalg.norm(gB @ A) + np.linalg.norm(B @ gA)) + 1e-300
    assert np.linalg.norm(residual) <= 1e-12 * scale
    # the zero solution does not balance them (so this check can fail) unless B^T g A^T = 0
    if np.linalg.norm(B.T @ g @ A.T) > 1e-8 * np.linalg.norm(g):
        gA0, gB0 = (np64(t) for t in run(case, "zero")[1])
        assert np.linalg.norm(B.T @ (gB0 @ A - B @ gA0) @ A.T) > 1e-6 * scale


# ---------------------------------------------------------------------------------------------------------
# Theorem 2.2: descent
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_first_order_loss_change_is_minus_projected_norm(case, x_mode):
    """<gA_lora, gA> + <gB_lora, gB> = <g, g~> = ||P_B g||^2 + ||(I - P_B) g P_A||^2 >= 0 (Eq. 13 / 39)."""
    (A, B, g, gA_lora, gB_lora), (gA, gB) = run(case, x_mode)
    A, B, g, gA_lora, gB_lora, gA, gB = (np64(t) for t in (A, B, g, gA_lora, gB_lora, gA, gB))
    decrease = float(np.sum(gA_lora * gA) + np.sum(gB_lora * gB))
    expected = float(np.sum(projected_gradient(A, B, g) ** 2))
    assert decrease >= -1e-12 * np.sum(g**2)
    assert abs(decrease - expected) <= 1e-10 * np.sum(g**2)


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("kind", ["full", "B0"])
def test_step_along_adjusted_gradients_decreases_a_real_loss(x_mode, kind):
    """LoRA gradients from autograd on a nonlinear loss; a small step along -(gA, gB) lowers the loss
    at the rate predicted by Theorem 2.2."""
    gen = torch.Generator().manual_seed(77)
    m, n, r, s, batch = 9, 7, 3, RSLORA_SCALE, 11
    W0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    x = torch.randn(n, batch, generator=gen, dtype=torch.float64)
    y = torch.randn(m, batch, generator=gen, dtype=torch.float64)
    A0 = torch.randn(r, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    B0 = (
        torch.zeros(m, r, dtype=torch.float64)
        if kind == "B0"
        else torch.randn(m, r, generator=gen, dtype=torch.float64)
    )

    def loss(A, B):
        return 0.5 * (torch.tanh((W0 + s * B @ A) @ x) - y).square().sum()

    A = A0.clone().requires_grad_(True)
    B = B0.clone().requires_grad_(True)
    L0 = loss(A, B)
    gA_lora, gB_lora = torch.autograd.grad(L0, (A, B))
    gA, gB = optimal_gradients(A.detach(), B.detach(), gA_lora, gB_lora, s, x_mode=x_mode)
    predicted_rate = float((gA_lora * gA).sum() + (gB_lora * gB).sum())
    assert predicted_rate > 0
    with torch.no_grad():
        for lr in (1e-3, 1e-6):
            L1 = loss(A0 - lr * gA, B0 - lr * gB)
            assert float(L1) < float(L0)
        rate = float(L0 - loss(A0 - 1e-6 * gA, B0 - 1e-6 * gB)) / 1e-6
    assert rate == pytest.approx(predicted_rate, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize(("m", "n", "r", "s"), [(8, 6, 3, 2.0), (7, 9, 1, 0.5), (5, 12, 4, RSLORA_SCALE)])
def test_b_zero_peft_init(m, n, r, s, x_mode):
    """B = 0: gA is exactly 0 and gB = gB_lora (A A^T)^-1 / s^2."""
    case = Case(m, n, r, s, "B0", 40 + m)
    (A, _, _, gA_lora, gB_lora), (gA, gB) = run(case, x_mode)
    assert torch.count_nonzero(gA_lora) == 0  # the fixture really is the PEFT init
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    assert torch.count_nonzero(gA) == 0, "grad_A must be exactly zero when B = 0"
    A, gB_lora = np64(A), np64(gB_lora)
    expected_B = gB_lora @ np.linalg.inv(A @ A.T) / s**2
    assert max_err(np64(gB), expected_B) <= 1e-10 * np.max(np.abs(expected_B))


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("zero", ["A", "B", "AB"])
def test_zero_factors_give_finite_outputs(zero, x_mode, dtype):
    gen = torch.Generator().manual_seed(5)
    m, n, r, s = 6, 5, 2, 2.0
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if "A" in zero:
        A.zero_()
    if "B" in zero:
        B.zero_()
    gA_lora, gB_lora = s * B.T @ g, s * g @ A.T
    A, B, gA_lora, gB_lora = (t.to(dtype) for t in (A, B, gA_lora, gB_lora))
    gA, gB = optimal_gradients(A, B, gA_lora, gB_lora, s, x_mode=x_mode)
    assert gA.dtype == dtype and gB.dtype == dtype
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    if zero == "AB":
        assert torch.count_nonzero(gA) == 0 and torch.count_nonzero(gB) == 0
    if "B" in zero:
        assert torch.count_nonzero(gA) == 0


# ---------------------------------------------------------------------------------------------------------
# Batched leading dimensions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("batch_shape", [(4,), (2, 2)])
@pytest.mark.parametrize("scaling_kind", ["tensor", "float"])
def test_batch_matches_separate_calls(batch_shape, x_mode, scaling_kind):
    m, n, r = 7, 5, 3
    kinds = ["full", "B0", "dupA", "dupB"]
    scales = [2.0, 0.5, RSLORA_SCALE, 1.0] if scaling_kind == "tensor" else [2.0] * 4
    problems = [
        make_problem(Case(m, n, r, s, kind, 60 + i))
        for i, (s, kind) in enumerate(zip(scales, kinds, strict=True))
    ]
    A, B, _, gA_lora, gB_lora = (
        torch.stack(parts).reshape(*batch_shape, *parts[0].shape) for parts in zip(*problems, strict=True)
    )
    scaling = (
        torch.tensor(scales, dtype=torch.float64).reshape(batch_shape) if scaling_kind == "tensor" else 2.0
    )
    gA, gB = optimal_gradients(A, B, gA_lora, gB_lora, scaling, x_mode=x_mode)
    assert gA.shape == A.shape and gB.shape == B.shape
    gA, gB = gA.reshape(4, r, n), gB.reshape(4, m, r)
    for i, (s, (Ai, Bi, gi, gAi, gBi)) in enumerate(zip(scales, problems, strict=True)):
        single = optimal_gradients(Ai, Bi, gAi, gBi, s, x_mode=x_mode)
        assert_pair_close((gA[i], gB[i]), (np64(single[0]), np64(single[1])), 1e-12, f"batch element {i}")
        # and against the independent reference, so a batch-only bug cannot hide behind the loop
        if x_mode == "sylvester":
            expected = min_norm_lstsq(np64(Ai), np64(Bi), np64(gi), s)
        else:
            expected = theorem_grads_from_full(np64(Ai), np64(Bi), np64(gi), s, x_mode)
        assert_pair_close((gA[i], gB[i]), expected, 1e-10, f"batch element {i} vs reference")
    tilde = equivalent_gradient(A, B, gA.reshape(A.shape), gB.reshape(B.shape), scaling).reshape(4, m, n)
    for i, (s, (Ai, Bi, gi, _, _)) in enumerate(zip(scales, problems, strict=True)):
        proj = projected_gradient(np64(Ai), np64(Bi), np64(gi))
        assert max_err(np64(tilde[i]), proj) <= 1e-10 * np.max(np.abs(np64(gi))), (i, s)


@pytest.mark.parametrize("x_mode", X_MODES)
def test_zero_dim_tensor_scaling_for_unbatched_input(x_mode):
    case = Case(6, 5, 2, RSLORA_SCALE, "full", 70)
    A, B, _, gA_lora, gB_lora = make_problem(case)
    out = optimal_gradients(A, B, gA_lora, gB_lora, torch.tensor(case.s, dtype=torch.float64), x_mode=x_mode)
    expected = optimal_gradients(A, B, gA_lora, gB_lora, case.s, x_mode=x_mode)
    assert_pair_close(out, (np64(expected[0]), np64(expected[1])), 1e-14)


# ---------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------

DTYPE_CASES = [
    Case(32, 24, 4, 2.0, "full", 80),
    Case(20, 28, 1, RSLORA_SCALE, "full", 81),
    Case(24, 16, 4, 0.5, "B0", 82),
]


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 1e-4), (torch.bfloat16, 2 * 2**-7), (torch.float16, 2 * 2**-10)],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c.id)
def test_reduced_precision_inputs(case, x_mode, dtype, tol):
    """Outputs keep the input dtype and agree with the float64 theorem on the same (rounded) inputs."""
    A, B, _, gA_lora, gB_lora = (t.to(dtype) for t in make_problem(case))
    gA, gB = optimal_gradients(A, B, gA_lora, gB_lora, case.s, x_mode=x_mode)
    assert gA.dtype == dtype and gB.dtype == dtype
    assert gA.shape == A.shape and gB.shape == B.shape
    expected = theorem_grads(np64(A), np64(B), np64(gA_lora), np64(gB_lora), case.s, x_mode)
    assert_pair_close((gA, gB), expected, tol, f"{dtype}")


@pytest.mark.parametrize("x_mode", X_MODES)
def test_half_precision_gram_matrices_are_not_formed_in_half(x_mode):
    """A A^T overflows float16 here (entries ~ 2e5 > 65504) although every input and output fits."""
    gen = torch.Generator().manual_seed(90)
    m, n, r, s = 12, 16, 3, 2.0
    A = 100 * torch.randn(r, n, generator=gen, dtype=torch.float64)
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    gA_lora, gB_lora = lora_grads(A.numpy(), B.numpy(), g.numpy(), s)
    A16, B16 = A.half(), B.half()
    gA16, gB16 = torch.from_numpy(gA_lora).half(), torch.from_numpy(gB_lora).half()
    assert not torch.isfinite(A16 @ A16.T).all()  # the hazard is real
    out = optimal_gradients(A16, B16, gA16, gB16, s, x_mode=x_mode)
    assert out[0].dtype == torch.float16 and out[1].dtype == torch.float16
    expected = theorem_grads(np64(A16), np64(B16), np64(gA16), np64(gB16), s, x_mode)
    assert_pair_close(out, expected, 2 * 2**-10)


# ---------------------------------------------------------------------------------------------------------
# rtol, argument checking, purity
# ---------------------------------------------------------------------------------------------------------


def test_rtol_controls_the_pseudo_inverse_cut_off():
    """A with singular values (1, 0.5, 1e-4): A A^T has eigenvalue ratio 1e-8. The float64 default (10 r eps)
    keeps it; rtol=1e-6 drops it (Gram pseudo-inverse with that eigenvalue cut)."""
    gen = torch.Generator().manual_seed(95)
    m, n, r, s = 8, 6, 3, 2.0
    U, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    A = U @ torch.diag(torch.tensor([1.0, 0.5, 1e-4], dtype=torch.float64)) @ V.T
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    gA_lora, gB_lora = s * B.T @ g, s * g @ A.T
    args = (np64(A), np64(B), np64(gA_lora), np64(gB_lora), s, "zero")
    kept = theorem_grads(*args, rtol=1e-13)
    cut = theorem_grads(*args, rtol=1e-6)
    assert max_err(kept[1], cut[1]) > 1.0  # the two references really differ
    assert_pair_close(optimal_gradients(A, B, gA_lora, gB_lora, s, x_mode="zero"), kept, 1e-8, "default rtol")
    assert_pair_close(
        optimal_gradients(A, B, gA_lora, gB_lora, s, x_mode="zero", rtol=1e-6), cut, 1e-10, "rtol=1e-6"
    )


def test_unknown_x_mode_is_rejected():
    A, B, _, gA_lora, gB_lora = make_problem(CASES[1])
    with pytest.raises(ValueError, match="sylvester") as info:
        optimal_gradients(A, B, gA_lora, gB_lora, 2.0, x_mode="sylvestre")
    message = str(info.value)
    assert "zero" in message and "symmetric" in message


@pytest.mark.parametrize("x_mode", X_MODES)
def test_inputs_are_not_modified(x_mode):
    tensors = make_problem(Case(6, 9, 3, 2.0, "full", 99))
    A, B, _, gA_lora, gB_lora = tensors
    before = [t.clone() for t in (A, B, gA_lora, gB_lora)]
    gA, gB = optimal_gradients(A, B, gA_lora, gB_lora, 2.0, x_mode=x_mode)
    for t, b in zip((A, B, gA_lora, gB_lora), before, strict=True):
        assert torch.equal(t, b)
    assert gA.data_ptr() not in (A.data_ptr(), gA_lora.data_ptr())
    assert gB.data_ptr() not in (B.data_ptr(), gB_lora.data_ptr())


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetric"])
def test_vec_operators_are_the_maps_of_x_and_b_coefficient(x_mode):
    """The (r^2, r^2) matrices the gradient hooks apply equal x_matrix and b_coefficient (with
    X from B^T grad_B) on any r x r input, batched, float64; also with rank-deficient factors."""
    from lorapro.closed_form import b_coefficient, factor_basis, vec_operators, x_matrix

    gen = torch.Generator().manual_seed(5)
    k, r = 4, 3
    A = torch.randn(k, r, 7, generator=gen, dtype=torch.float64)
    B = torch.randn(k, 9, r, generator=gen, dtype=torch.float64)
    B[1] = 0.0  # PEFT's initialisation
    A[2, 0] = A[2, 1]  # rank-deficient A
    basis = factor_basis(B.mT @ B, A @ A.mT, x_mode)
    x_op, b_op = vec_operators(basis)
    R = torch.randn(k, r, r, generator=gen, dtype=torch.float64)
    vec = R.flatten(-2).unsqueeze(-1)
    torch.testing.assert_close((x_op @ vec).view(k, r, r), x_matrix(basis, R), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((b_op @ vec).view(k, r, r), b_coefficient(basis, R), rtol=1e-12, atol=1e-12)


def test_split_power_of_two_is_exact_and_keeps_moderate_coefficients_whole():
    """``coef = matrix * 2**k`` exactly, k half the largest entry's binary exponent (rounded down, within
    +-MAX_SPLIT_EXPONENT; 0 for a zero or non-finite matrix); with ``unsplit`` the moderate coefficients
    keep k = 0 and only the extreme ones are split."""
    from lorapro.closed_form import split_power_of_two

    base = torch.tensor([[1.5, -0.25], [3.0, 0.5]], dtype=torch.float64)  # largest: 3 = 0.75 * 2^2
    scales = [2.0**-130, 2.0**-50, 2.0**-10, 1.0, 2.0**30, 2.0**90]
    coef = torch.stack([base * s for s in scales] + [torch.zeros(2, 2), torch.full((2, 2), math.inf)])
    matrix, k = split_power_of_two(coef)
    assert k.tolist() == [-60, -24, -4, 1, 16, 46, 0, 0]  # -64 clamped to -60
    finite = torch.isfinite(coef).all(dim=(-2, -1))
    assert torch.equal((matrix * torch.exp2(k)[:, None, None])[finite], coef[finite])
    _, k_unsplit = split_power_of_two(coef, unsplit=20)
    assert k_unsplit.tolist() == [-60, -24, 0, 0, 0, 46, 0, 0]
