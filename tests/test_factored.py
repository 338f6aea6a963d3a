"""Factored mode: each piece against dense float64 computations, and the optimizer's state
against a brute-force replay of the recurrences it approximates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import lorapro
from lorapro.factored import (
    NMF_RANK,
    NMF_SWEEPS,
    adafactor_scales,
    low_rank_square_sums,
    nmf_fit,
    project_tangent,
    scaled_tangent_products,
    sm3_estimate,
    tangent_matrix,
)

F64 = torch.float64


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_projection(A, B, Z):
    """P(Z) with explicit m x m and n x n projectors (torch.linalg.pinv)."""
    P_B = B @ torch.linalg.pinv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.pinv(A @ A.T) @ A
    return P_B @ Z + Z @ P_A - P_B @ Z @ P_A


SHAPES = [(7, 9, 3), (12, 5, 2), (6, 6, 6), (4, 10, 6)]  # (m, n, r), the last with r > m


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_projection_matches_the_dense_projection(m, n, r):
    A_old, B_old, A, B = rand(r, n, seed=1), rand(m, r, seed=2), rand(r, n, seed=3), rand(m, r, seed=4)
    X, Y = rand(r, n, seed=5), rand(m, r, seed=6)
    x, y = project_tangent(A_old, B_old, X, Y, A, B)
    Z = tangent_matrix(A_old, B_old, X, Y)
    expected = dense_projection(A, B, Z)
    assert torch.allclose(tangent_matrix(A, B, x, y), expected, atol=1e-10, rtol=1e-10)
    # A projection: applying it again changes nothing, and what it removes is orthogonal to it.
    x2, y2 = project_tangent(A, B, x, y, A, B)
    assert torch.allclose(tangent_matrix(A, B, x2, y2), expected, atol=1e-10)
    assert abs(torch.sum((Z - expected) * expected)) < 1e-9 * Z.norm() ** 2


def test_projection_onto_a_zero_b_keeps_only_the_row_space_of_a():
    m, n, r = 6, 9, 2
    A_old, B_old, A = rand(r, n, seed=1), rand(m, r, seed=2), rand(r, n, seed=3)
    B = torch.zeros(m, r, dtype=F64)  # LoRA's initialisation: the tangent space is {Y A}
    X, Y = rand(r, n, seed=5), rand(m, r, seed=6)
    x, y = project_tangent(A_old, B_old, X, Y, A, B)
    Z = tangent_matrix(A_old, B_old, X, Y)
    P_A = A.T @ torch.linalg.pinv(A @ A.T) @ A
    assert torch.allclose(tangent_matrix(A, B, x, y), Z @ P_A, atol=1e-10)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()


def test_projection_is_the_identity_when_the_tangent_space_is_everything():
    m, n, r = 4, 7, 5  # B (4 x 5) of full row rank: {B X} is every 4 x 7 matrix
    A_old, B_old, A, B = rand(r, n, seed=1), rand(m, r, seed=2), rand(r, n, seed=3), rand(m, r, seed=4)
    X, Y = rand(r, n, seed=5), rand(m, r, seed=6)
    x, y = project_tangent(A_old, B_old, X, Y, A, B)
    assert torch.allclose(tangent_matrix(A, B, x, y), tangent_matrix(A_old, B_old, X, Y), atol=1e-10)


@pytest.mark.parametrize(("m", "n", "k"), [(7, 9, 4), (12, 5, 2), (3, 3, 6)])
def test_low_rank_square_sums_match_the_dense_sums(m, n, k):
    L, R = rand(m, k, seed=1), rand(n, k, seed=2)
    G = L @ R.T
    rows, cols = low_rank_square_sums(L, R)
    assert torch.allclose(rows, (G * G).sum(dim=1), rtol=1e-12)
    assert torch.allclose(cols, (G * G).sum(dim=0), rtol=1e-12)


def test_square_sums_of_the_equivalent_gradient_need_no_m_by_n_matrix():
    m, n, r, s = 8, 11, 3, 2.0
    A, B, gA, gB = rand(r, n, seed=1), rand(m, r, seed=2), rand(r, n, seed=3), rand(m, r, seed=4)
    g = lorapro.equivalent_gradient(A, B, gA, gB, s)
    rows, cols = low_rank_square_sums(torch.cat([B, gB], 1), s * torch.cat([gA.T, A.T], 1))
    assert torch.allclose(rows, (g * g).sum(1), rtol=1e-12)
    assert torch.allclose(cols, (g * g).sum(0), rtol=1e-12)


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_scaled_tangent_products_match_the_dense_products(m, n, r):
    A, B, X, Y = rand(r, n, seed=1), rand(m, r, seed=2), rand(r, n, seed=3), rand(m, r, seed=4)
    a, b = rand(m, seed=5).abs() + 0.1, rand(n, seed=6).abs() + 0.1
    D = a[:, None] * tangent_matrix(A, B, X, Y) * b[None, :]
    bt_d, d_at = scaled_tangent_products(A, B, X, Y, a, b)
    assert torch.allclose(bt_d, B.T @ D, rtol=1e-12, atol=1e-12)
    assert torch.allclose(d_at, D @ A.T, rtol=1e-12, atol=1e-12)


def test_adafactor_scales_give_the_documented_estimate():
    m, n, eps = 5, 7, 1e-3
    rows, cols = rand(m, seed=1) ** 2, rand(n, seed=2) ** 2
    a, b = adafactor_scales(rows, cols, eps)
    v = (rows[:, None] + eps**2) * (cols[None, :] + eps**2) / (rows.mean() + eps**2)
    assert torch.allclose(a[:, None] * b[None, :], v.rsqrt(), rtol=1e-12)
    # Where nothing was ever seen, Adam's 1 / eps.
    a0, b0 = adafactor_scales(torch.zeros(m, dtype=F64), torch.zeros(n, dtype=F64), eps)
    assert torch.allclose(a0[:, None] * b0[None, :], torch.full((m, n), 1 / eps, dtype=F64), rtol=1e-12)
    # The rank-one estimate is exact for a rank-one squared gradient (Adafactor's premise).
    u, w = rand(m, seed=3).abs() + 0.5, rand(n, seed=4).abs() + 0.5
    sq = (u[:, None] * w[None, :]) ** 2
    a1, b1 = adafactor_scales(sq.mean(1), sq.mean(0), 0.0)
    assert torch.allclose(a1[:, None] * b1[None, :], sq.rsqrt(), rtol=1e-12)


def test_sm3_is_exact_on_a_min_structured_square():
    """A squared gradient ``min(a_i, b_j)`` held over the steps (a constant, or a rank-one square
    whose row factor is constant, is one): SM3's cover loses nothing, the estimate is Adam's
    exponential average itself."""
    m, n, beta2 = 5, 7, 0.9
    a, b = rand(m, seed=1).abs(), rand(n, seed=2).abs()
    sq = torch.minimum(a[:, None], b[None, :])
    row, col, exact = torch.zeros(m, dtype=F64), torch.zeros(n, dtype=F64), torch.zeros(m, n, dtype=F64)
    for _ in range(6):
        v, row, col = sm3_estimate(row, col, sq, beta2)
        exact = beta2 * exact + (1 - beta2) * sq
        assert torch.allclose(v, exact, rtol=1e-13, atol=0)


def test_sm3_never_undershoots_adams_average_and_keeps_unseen_rows_at_zero():
    m, n, beta2 = 6, 8, 0.8
    row, col, exact = torch.zeros(m, dtype=F64), torch.zeros(n, dtype=F64), torch.zeros(m, n, dtype=F64)
    for t in range(8):
        sq = rand(m, n, seed=10 + t) ** 2
        sq[2] = 0.0  # a row that never sees a gradient
        v, row, col = sm3_estimate(row, col, sq, beta2)
        exact = beta2 * exact + (1 - beta2) * sq
        assert (v >= exact * (1 - 1e-14)).all()
        if t == 0:  # nothing compressed yet
            assert torch.equal(v, (1 - beta2) * sq)
        assert torch.equal(v[2], torch.zeros(n, dtype=F64))  # Adam's 1 / eps there
        assert torch.equal(row, v.amax(1)) and torch.equal(col, v.amax(0))
    assert (v > exact * (1 + 1e-3)).any()  # a bound, not the average: the test above can fail


def i_divergence(target, estimate):
    """Sum of target log(target / estimate) - target + estimate (0 log 0 = 0)."""
    log_term = torch.where(target > 0, target * torch.log(target / estimate), 0.0)
    return (log_term - target + estimate).sum()


def test_nmf_fit_at_rank_one_is_adafactors_estimate_after_one_sweep():
    m, n = 6, 9
    target = rand(m, n, seed=1) ** 2
    L, R = rand(m, 1, seed=2).abs() + 0.1, rand(n, 1, seed=3).abs() + 0.1  # any positive start
    L, R = nmf_fit(L, R, target, sweeps=1)
    expected = target.sum(1)[:, None] * target.sum(0)[None, :] / target.sum()
    assert torch.allclose(L @ R.T, expected, rtol=1e-12)
    # A rank-one target is reproduced exactly, from zero factors too (the first step).
    u, w = rand(m, seed=4).abs() + 0.5, rand(n, seed=5).abs() + 0.5
    rank_one = u[:, None] * w[None, :]
    L, R = nmf_fit(torch.zeros(m, 1, dtype=F64), torch.zeros(n, 1, dtype=F64), rank_one, sweeps=1)
    assert torch.allclose(L @ R.T, rank_one, rtol=1e-12)


def test_nmf_fit_keeps_an_exact_rank_k_factorisation():
    m, n, k = 7, 5, NMF_RANK
    L0, R0 = rand(m, k, seed=1).abs() + 0.1, rand(n, k, seed=2).abs() + 0.1
    L, R = nmf_fit(L0, R0, L0 @ R0.T, sweeps=3)
    assert torch.allclose(L, L0, rtol=1e-12) and torch.allclose(R, R0, rtol=1e-12)


def test_nmf_fit_descends_the_divergence_and_matches_column_sums():
    m, n, k = 8, 11, NMF_RANK
    target = rand(m, n, seed=1) ** 2
    L, R = rand(m, k, seed=2).abs() + 0.1, rand(n, k, seed=3).abs() + 0.1
    before = i_divergence(target, L @ R.T)
    for _ in range(5):
        L, R = nmf_fit(L, R, target, sweeps=1)
        after = i_divergence(target, L @ R.T)
        assert after <= before * (1 + 1e-12)
        assert torch.allclose((L @ R.T).sum(0), target.sum(0), rtol=1e-12)
        before = after
    # better than Adafactor's rank-one fit of the same target: the extra component is used
    rank_one = target.sum(1)[:, None] * target.sum(0)[None, :] / target.sum()
    assert after < 0.99 * i_divergence(target, rank_one)


def test_nmf_fit_from_zero_factors_is_finite_and_keeps_zeros_zero():
    """The first step (and B = 0): all-zero factors and a target with a zero row and column."""
    m, n, k = 6, 7, NMF_RANK
    target = rand(m, n, seed=1) ** 2
    target[3], target[:, 5] = 0.0, 0.0
    L, R = nmf_fit(torch.zeros(m, k, dtype=F64), torch.zeros(n, k, dtype=F64), target)
    assert torch.isfinite(L).all() and torch.isfinite(R).all() and (L >= 0).all() and (R >= 0).all()
    estimate = L @ R.T
    assert torch.equal(estimate[3], torch.zeros(n, dtype=F64))
    assert torch.equal(estimate[:, 5], torch.zeros(m, dtype=F64))
    assert (estimate[target > 0] > 0).all()
    # the components did not start equal (they would stay equal: a rank-one fit)
    assert torch.linalg.matrix_rank(L) == k
    # a zero target everywhere: zero factors, no NaN
    L, R = nmf_fit(torch.zeros(m, k, dtype=F64), torch.zeros(n, k, dtype=F64), torch.zeros(m, n, dtype=F64))
    assert torch.equal(L, torch.zeros(m, k, dtype=F64)) and torch.equal(R, torch.zeros(n, k, dtype=F64))


def test_nmf_fit_refuses_zero_sweeps():
    with pytest.raises(ValueError, match="sweeps >= 1"):
        nmf_fit(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3, 4), sweeps=0)


# -- the optimizer ------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.hidden = nn.Linear(10, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def make_model(r, width=6, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["hidden", "out"], init_lora_weights=False)
    return get_peft_model(Net(width), config).double()


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 10, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)


def loss_of(model, i):
    x, y = batch(i)
    return F.cross_entropy(model(x), y)


def train(model, opt, steps):
    for i in range(steps):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()


def test_factored_first_moment_equals_full_mode_when_the_tangent_space_is_everything():
    """r >= m for every layer: the tangent-space first moment loses nothing, so with full mode's
    second moment the whole trajectory is full mode's."""
    model = make_model(r=6, width=6)  # hidden: m = 6, out: m = 3, r = 6
    runs = {}
    for mode in ("full", "factored-first-moment"):
        m = copy.deepcopy(model)
        train(m, lorapro.LoRAProAdamW(m, lr=5e-3, weight_decay=0.1, mode=mode), 6)
        runs[mode] = {n: p.detach().clone() for n, p in m.named_parameters()}
    for name, p in runs["full"].items():
        assert torch.allclose(p, runs["factored-first-moment"][name], rtol=1e-9, atol=1e-11), name


def test_factored_first_moment_differs_from_full_mode_below_full_rank():
    """The same comparison at r < min(m, n): the projection drops part of the moment, so the
    equality above is not automatic."""
    model = make_model(r=2, width=6)
    runs = []
    for mode in ("full", "factored-first-moment"):
        m = copy.deepcopy(model)
        train(m, lorapro.LoRAProAdamW(m, lr=5e-3, mode=mode), 6)
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert (runs[0] - runs[1]).abs().max() > 1e-6


@pytest.mark.parametrize("r", [2, 6])
def test_factored_state_follows_the_recurrences_it_keeps(r):
    """Replay, densely and in float64, what the state should hold: the first moment
    M_t = beta1 P_t(M_{t-1}) + (1 - beta1) g_t with P_t the projection onto the tangent space of
    the factors after step t-1 (exactly M_t of full mode when r >= m), and the row and column
    means of g_t^2 averaged with beta2, where g_t is the layer's equivalent gradient."""
    beta1, beta2 = 0.8, 0.95
    model = make_model(r=r, width=6)
    opt = lorapro.LoRAProAdamW(model, lr=5e-3, betas=(beta1, beta2), mode="factored")
    pairs = lorapro.find_lora_pairs(model)
    moments = {p.name: None for p in pairs}
    rows = {p.name: 0.0 for p in pairs}
    cols = {p.name: 0.0 for p in pairs}
    for i in range(5):
        loss_of(model, i).backward()
        for pair in pairs:
            A, B = pair.A.detach().clone(), pair.B.detach().clone()
            gA, gB = lorapro.optimal_gradients(A, B, pair.A.grad, pair.B.grad, pair.scaling, x_mode="zero")
            g = lorapro.equivalent_gradient(A, B, gA, gB, pair.scaling)
            previous = moments[pair.name]
            if previous is not None:
                previous = dense_projection(A, B, previous)
            moments[pair.name] = (1 - beta1) * g + (0.0 if previous is None else beta1 * previous)
            rows[pair.name] = beta2 * rows[pair.name] + (1 - beta2) * (g * g).mean(1)
            cols[pair.name] = beta2 * cols[pair.name] + (1 - beta2) * (g * g).mean(0)
        opt.step()
        opt.zero_grad()
        for pair in pairs:
            state = opt.state[pair.B]
            M = tangent_matrix(pair.A.detach(), pair.B.detach(), state["tangent_x"], state["tangent_y"])
            # The state is kept in the factors after this step: project the replay onto them too.
            expected = dense_projection(pair.A.detach(), pair.B.detach(), moments[pair.name])
            assert torch.allclose(M, expected, rtol=1e-8, atol=1e-12), (pair.name, i)
            assert torch.allclose(state["row_sq_mean"], rows[pair.name], rtol=1e-8, atol=1e-14)
            assert torch.allclose(state["col_sq_mean"], cols[pair.name], rtol=1e-8, atol=1e-14)
            if r >= pair.B.shape[0]:  # nothing lost: the moment itself
                assert torch.allclose(M, moments[pair.name], rtol=1e-8, atol=1e-12)


def test_factored_step_is_algorithm_3_with_the_factored_direction():
    """One step from zero state, densely: D = a M b / (1 - beta1) with M = (1 - beta1) g and
    Adafactor's scales, then the closed form maps s B^T D and s D A^T to the factor updates."""
    lr, eps, beta1, beta2, wd = 1e-2, 1e-8, 0.9, 0.999, 0.05
    model = make_model(r=2)
    reference = copy.deepcopy(model)
    loss_of(model, 0).backward()
    loss_of(reference, 0).backward()
    opt = lorapro.LoRAProAdamW(model, lr=lr, eps=eps, betas=(beta1, beta2), weight_decay=wd, mode="factored")
    opt.step()
    for pair, ref in zip(lorapro.find_lora_pairs(model), lorapro.find_lora_pairs(reference), strict=True):
        A, B, s = ref.A.detach(), ref.B.detach(), ref.scaling
        gA, gB = lorapro.optimal_gradients(A, B, ref.A.grad, ref.B.grad, s, x_mode="zero")
        g = lorapro.equivalent_gradient(A, B, gA, gB, s)
        row, col = (g * g).mean(1), (g * g).mean(0)  # bias-corrected: (1 - beta2) v / (1 - beta2)
        v = (row[:, None] + eps**2) * (col[None, :] + eps**2) / (row.mean() + eps**2)
        D = g / v.sqrt()
        new_A_grad, new_B_grad = lorapro.optimal_gradients(A, B, s * B.T @ D, s * D @ A.T, s)
        decay = (1 - lr * wd) ** 0.5
        assert torch.allclose(pair.A.detach(), decay * A - lr * new_A_grad, rtol=1e-9, atol=1e-12)
        assert torch.allclose(pair.B.detach(), decay * B - lr * new_B_grad, rtol=1e-9, atol=1e-12)


def test_factored_state_is_smaller_than_efficient_modes():
    """(m + n)(r + 1) numbers per layer against AdamW's 2 (m + n) r on the factors."""
    model = make_model(r=4, width=32)
    sizes = {}
    for mode in ("efficient", "factored", "full"):
        m = copy.deepcopy(model)
        opt = lorapro.LoRAProAdamW(m, lr=1e-3, mode=mode)
        train(m, opt, 1)
        pairs = lorapro.find_lora_pairs(m)
        sizes[mode] = sum(
            t.numel()
            for pair in pairs
            for p in (pair.A, pair.B)
            for k, t in opt.state[p].items()
            if k != "step"
        )
    # hidden (32 x 10) and out (3 x 32), r = 4
    assert sizes["factored"] == (32 + 10) * 5 + (3 + 32) * 5
    assert sizes["efficient"] == 2 * (32 + 10) * 4 + 2 * (3 + 32) * 4
    assert sizes["full"] == 2 * (32 * 10 + 3 * 32)


def test_factored_mode_trains_about_as_far_as_full_mode():
    """Same rate and steps: each factored mode lowers the training loss at least half as much as
    full mode does (on this toy problem they land close)."""
    model = make_model(r=2, width=16)
    before = sum(loss_of(model, i).item() for i in range(4))
    drop = {}
    for mode in ("full", "factored", "factored-first-moment"):
        m = copy.deepcopy(model)
        opt = lorapro.LoRAProAdamW(m, lr=1e-2, mode=mode)
        for _ in range(15):
            train(m, opt, 4)
        drop[mode] = before - sum(loss_of(m, i).item() for i in range(4))
    assert drop["full"] > 0.1 * before
    assert drop["factored"] > 0.5 * drop["full"], drop
    assert drop["factored-first-moment"] > 0.5 * drop["full"], drop


def dense_sm3(state, g, beta2):
    """SM3 written entry by entry: v_ij = beta2 min(row_i, col_j) + (1 - beta2) g_ij^2."""
    row, col = (
        state
        if state is not None
        else (torch.zeros(g.shape[0], dtype=F64), torch.zeros(g.shape[1], dtype=F64))
    )
    v = torch.empty_like(g)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            v[i, j] = beta2 * min(row[i], col[j]) + (1 - beta2) * g[i, j] ** 2
    return v, (v.max(dim=1).values, v.max(dim=0).values)


def dense_nmf(state, g, beta2):
    """The rank-k history refitted by I-divergence multiplicative updates, with the m x n
    matrices formed explicitly; zero rows restart from the target's row sums, weighted 2 on the
    component i mod k and 1 on the others."""
    m, n, k = g.shape[0], g.shape[1], NMF_RANK
    L, R = state if state is not None else (torch.zeros(m, k, dtype=F64), torch.zeros(n, k, dtype=F64))
    T = beta2 * (L @ R.T) + (1 - beta2) * g * g
    total = T.sum()
    weight = torch.tensor(
        [[2.0 if i % k == c else 1.0 for c in range(k)] for i in range(max(m, n))], dtype=F64
    )
    L, R = L.clone(), R.clone()
    for i in range(m):
        if L[i].sum() == 0:
            L[i] = T[i].sum() / total.sqrt() * weight[i]
    for j in range(n):
        if R[j].sum() == 0:
            R[j] = T[:, j].sum() / total.sqrt() * weight[j]
    for _ in range(NMF_SWEEPS):
        P = L @ R.T
        L = L * torch.einsum("ij,jc->ic", torch.where(P > 0, T / P, 0.0), R) / R.sum(0)
        P = L @ R.T
        R = R * torch.einsum("ij,ic->jc", torch.where(P > 0, T / P, 0.0), L) / L.sum(0)
    return T, (L, R)


STATE_KEYS = {"factored-sm3": ("sm3_row", "sm3_col"), "factored-nmf": ("nmf_row", "nmf_col")}
DENSE_RECURRENCE = {"factored-sm3": dense_sm3, "factored-nmf": dense_nmf}


@pytest.mark.parametrize("mode", ["factored-sm3", "factored-nmf"])
@pytest.mark.parametrize("random_b", [True, False])
def test_new_second_moments_replay_densely_into_the_optimizers_steps(mode, random_b):
    """Replay in float64 with every m x n matrix explicit: the first moment as in the test above,
    the second moment's recurrence, Adam's bias corrections and eps, the direction
    D = M / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) and the closed form's factor updates
    with full fine-tuning's weight decay; against the optimizer's state and factors after every
    step. From B = 0 (PEFT's initialisation) too."""
    lr, eps, beta1, beta2, wd = 1e-2, 1e-8, 0.8, 0.95, 0.05
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["hidden", "out"], init_lora_weights=not random_b)
    model = get_peft_model(Net(6), config).double()
    opt = lorapro.LoRAProAdamW(model, lr=lr, eps=eps, betas=(beta1, beta2), weight_decay=wd, mode=mode)
    pairs = lorapro.find_lora_pairs(model)
    moments = {p.name: None for p in pairs}
    second = {p.name: None for p in pairs}
    for t in range(1, 6):
        loss_of(model, t).backward()
        expected = {}
        for pair in pairs:
            A, B, s = pair.A.detach().clone(), pair.B.detach().clone(), pair.scaling
            gA, gB = lorapro.optimal_gradients(A, B, pair.A.grad, pair.B.grad, s, x_mode="zero")
            g = lorapro.equivalent_gradient(A, B, gA, gB, s)
            previous = moments[pair.name]
            M = (1 - beta1) * g + (0.0 if previous is None else beta1 * dense_projection(A, B, previous))
            moments[pair.name] = M
            v, second[pair.name] = DENSE_RECURRENCE[mode](second[pair.name], g, beta2)
            D = M / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt() + eps)
            new_gA, new_gB = lorapro.optimal_gradients(A, B, s * B.T @ D, s * D @ A.T, s)
            decay = (1 - lr * wd) ** 0.5
            expected[pair.name] = (decay * A - lr * new_gA, decay * B - lr * new_gB)
        opt.step()
        opt.zero_grad()
        for pair in pairs:
            state = opt.state[pair.B]
            new_A, new_B = expected[pair.name]
            assert torch.allclose(pair.A.detach(), new_A, rtol=1e-8, atol=1e-12), (pair.name, t)
            assert torch.allclose(pair.B.detach(), new_B, rtol=1e-8, atol=1e-12), (pair.name, t)
            for key, value in zip(STATE_KEYS[mode], second[pair.name], strict=True):
                assert torch.allclose(state[key], value, rtol=1e-8, atol=1e-14), (pair.name, t, key)
            M = tangent_matrix(pair.A.detach(), pair.B.detach(), state["tangent_x"], state["tangent_y"])
            projected = dense_projection(pair.A.detach(), pair.B.detach(), moments[pair.name])
            assert torch.allclose(M, projected, rtol=1e-8, atol=1e-12), (pair.name, t)


@pytest.mark.parametrize(("mode", "per_layer"), [("factored-sm3", 1), ("factored-nmf", NMF_RANK)])
def test_new_second_moments_state_stays_within_the_bound(mode, per_layer):
    """The first moment's (m + n) r numbers, and a second moment of (m + n) per_layer numbers,
    within the (m + n)(r + 1) allowed beyond the first moment at every rank r >= 1."""
    r = 1
    model = make_model(r=r, width=32)
    opt = lorapro.LoRAProAdamW(model, lr=1e-3, mode=mode)
    train(model, opt, 2)
    for pair in lorapro.find_lora_pairs(model):
        (m, _), n = pair.B.shape, pair.A.shape[1]
        assert opt.state[pair.A] == {}
        state = {k: t.numel() for k, t in opt.state[pair.B].items() if k != "step"}
        first = state.pop("tangent_x") + state.pop("tangent_y")
        assert first == (m + n) * r
        assert sum(state.values()) == (m + n) * per_layer <= (m + n) * (r + 1), pair.name
