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
    adafactor_scales,
    low_rank_square_sums,
    project_tangent,
    scaled_tangent_products,
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
