"""The damped closed form: LoRA-Pro's least-squares problem with a ridge penalty.

Objective (float64, brute force in tests/reference.py):
    min ||s (B gA + gB A) - g||_F^2 + lam (||gA||_F^2 + ||gB||_F^2),
    lam = damping * s^2 * (||A||_F^2 + ||B||_F^2) / r.
damping = 0 is Theorem 2.1 with Sylvester's X (the minimum-norm least-squares pair); a large damping
gives LoRA's own gradients up to a positive scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from lorapro import LoRAProAdamW, LoRAProConfigError, find_lora_pairs
from lorapro.closed_form import optimal_gradients
from reference import min_norm_lstsq, ridge_grads, theorem_grads

# (m, n, r, s, kind): full rank, rank-deficient A / B / both, B = 0 (PEFT's init), A = 0, both 0,
# r > max(m, n) (both Gram matrices singular), r = 1.
SHAPES = [
    (8, 6, 3, 2.0, "full"),
    (5, 12, 3, 0.5, "full"),
    (7, 9, 1, 2.0, "full"),
    (9, 7, 3, 2.0, "dupA"),
    (9, 7, 3, 0.5, "dupB"),
    (8, 6, 4, 5.66, "dupAB"),
    (5, 4, 6, 1.0, "full"),
    (8, 6, 3, 2.0, "B0"),
    (8, 6, 3, 2.0, "A0"),
    (6, 8, 2, 2.0, "AB0"),
]
IDS = [f"m{m}-n{n}-r{r}-{kind}" for m, n, r, _, kind in SHAPES]


def problem(m, n, r, s, kind, seed=0):
    """(A, B, g, gA_lora, gB_lora) as float64 numpy arrays; LoRA's gradients from g."""
    rng = np.random.default_rng(100 + seed)
    A, B, g = rng.standard_normal((r, n)), rng.standard_normal((m, r)), rng.standard_normal((m, n))
    if kind in ("dupA", "dupAB"):
        A[1] = A[0]
    if kind in ("dupB", "dupAB"):
        B[:, 1] = B[:, 0]
    if kind in ("A0", "AB0"):
        A[:] = 0.0
    if kind in ("B0", "AB0"):
        B[:] = 0.0
    return A, B, g, s * B.T @ g, s * g @ A.T


def ridge_lambda(A, B, s, damping):
    """lam of the objective, written from its definition."""
    return damping * s**2 * (np.sum(A * A) + np.sum(B * B)) / A.shape[0]


def ours(A, B, gA_lora, gB_lora, s, **kwargs):
    out = optimal_gradients(*(torch.from_numpy(t) for t in (A, B, gA_lora, gB_lora)), s, **kwargs)
    return tuple(t.numpy() for t in out)


def max_rel(actual, expected):
    scale = max(np.max(np.abs(e)) for e in expected) or 1.0
    return max(np.max(np.abs(a - e)) for a, e in zip(actual, expected, strict=True)) / scale


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_zero_damping_is_todays_answer(shape):
    """damping=0 is Theorem 2.1 with Sylvester's X: the minimum-norm least-squares pair."""
    s, kind = shape[3], shape[4]
    A, B, g, gA_lora, gB_lora = problem(*shape)
    got = ours(A, B, gA_lora, gB_lora, s, damping=0.0)
    default = ours(A, B, gA_lora, gB_lora, s)
    assert all(np.array_equal(a, b) for a, b in zip(got, default, strict=True))
    assert max_rel(got, min_norm_lstsq(A, B, g, s)) <= 1e-12
    if kind == "full":  # scipy's Sylvester solver needs B^T B and -A A^T without a shared eigenvalue
        assert max_rel(got, theorem_grads(A, B, gA_lora, gB_lora, s, "sylvester")) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("damping", [1e-3, 0.1, 1.0, 30.0])
def test_damped_pair_solves_the_ridge_problem(shape, damping):
    """Against a dense float64 solve of the ridge problem's normal equations (rank-deficient and
    zero factors included), for several random problems."""
    s = shape[3]
    for seed in range(3):
        A, B, _, gA_lora, gB_lora = problem(*shape, seed=seed)
        expected = ridge_grads(A, B, gA_lora, gB_lora, s, ridge_lambda(A, B, s, damping))
        got = ours(A, B, gA_lora, gB_lora, s, damping=damping)
        assert max_rel(got, expected) <= 1e-10, f"seed {seed}"


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_small_damping_tends_to_the_undamped_answer(shape):
    """The damping -> 0+ limit is the minimum-norm pair, also where a Gram matrix is singular
    (the cut eigenvalues count as zero whatever the damping)."""
    s, kind = shape[3], shape[4]
    A, B, g, gA_lora, gB_lora = problem(*shape)
    undamped = min_norm_lstsq(A, B, g, s)
    errors = [max_rel(ours(A, B, gA_lora, gB_lora, s, damping=d), undamped) for d in (1e-4, 1e-6, 1e-8)]
    assert errors[-1] <= 1e-6
    if kind not in ("AB0",):  # (AB0: every answer is 0)
        assert errors[0] > errors[1] > errors[2] or errors[0] <= 1e-12


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[4] != "AB0"], ids=IDS[:-1])
def test_large_damping_gives_loras_gradients_up_to_a_positive_scale(shape):
    s, kind = shape[3], shape[4]
    A, B, _, gA_lora, gB_lora = problem(*shape)
    damping = 1e9
    got = ours(A, B, gA_lora, gB_lora, s, damping=damping)
    lora = np.concatenate([gA_lora.ravel(), gB_lora.ravel()])
    mine = np.concatenate([t.ravel() for t in got])
    scale = float(mine @ lora) / float(lora @ lora)
    assert scale > 0
    assert np.max(np.abs(mine - scale * lora)) <= 1e-8 * np.max(np.abs(scale * lora))
    # the scale is 1/lam: the penalty dominates the normal equations
    assert scale == pytest.approx(1.0 / ridge_lambda(A, B, s, damping), rel=1e-6)
    # and a moderate damping is not yet LoRA's direction (the test can tell the two apart)
    mid = np.concatenate([t.ravel() for t in ours(A, B, gA_lora, gB_lora, s, damping=0.1)])
    cosine = float(mid @ lora) / (np.linalg.norm(mid) * np.linalg.norm(lora))
    if kind not in ("B0",):  # at B = 0 every damping gives (0, gB_lora (A A^T + mu)^-1 / s^2)
        assert cosine < 1 - 1e-6


def test_damping_is_relative_to_the_factors_scale():
    """(A, B, g) -> (cA, cB, cg) multiplies both terms of the objective by c^2 (lam is relative to
    the Gram matrices, which scale by c^2), so the damped pair is unchanged: one damping value
    means the same at any scale of the factors. An absolute lam would not."""
    A, B, g, _, _ = problem(8, 6, 3, 2.0, "full")
    s = 2.0
    base = ours(A, B, s * B.T @ g, s * g @ A.T, s, damping=0.1)
    c = 1e3
    A2, B2, g2 = c * A, c * B, c * g
    scaled = ours(A2, B2, s * B2.T @ g2, s * g2 @ A2.T, s, damping=0.1)
    assert max_rel(scaled, base) <= 1e-10


def test_batched_layers_get_their_own_damping():
    """lam is per problem: a batch of layers of different scales equals separate calls."""
    problems = [problem(8, 6, 3, 2.0, "full", seed=k) for k in range(3)]
    factors = [1.0, 1e-3, 40.0]
    As = torch.stack([torch.from_numpy(p[0] * f) for p, f in zip(problems, factors, strict=True)])
    Bs = torch.stack([torch.from_numpy(p[1]) for p in problems])
    gs = torch.stack([torch.from_numpy(p[2]) for p in problems])
    gA, gB = 2.0 * Bs.mT @ gs, 2.0 * gs @ As.mT
    batched = optimal_gradients(As, Bs, gA, gB, 2.0, damping=0.05)
    for k in range(3):
        single = optimal_gradients(As[k], Bs[k], gA[k], gB[k], 2.0, damping=0.05)
        torch.testing.assert_close(batched[0][k], single[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batched[1][k], single[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": -0.1}, "damping must be finite and >= 0"),
        ({"damping": float("nan")}, "damping must be finite and >= 0"),
        ({"damping": float("inf")}, "damping must be finite and >= 0"),
        ({"damping": "0.1"}, "damping must be a real number"),
        ({"damping": 0.1, "x_mode": "zero"}, "use x_mode='sylvester' or damping=0"),
        ({"damping": 0.1, "x_mode": "symmetric"}, "use x_mode='sylvester' or damping=0"),
    ],
)
def test_closed_form_refuses_bad_damping(kwargs, message):
    A, B, _, gA_lora, gB_lora = problem(8, 6, 3, 2.0, "full")
    with pytest.raises(ValueError, match=message):
        ours(A, B, gA_lora, gB_lora, 2.0, **kwargs)


# -- the optimizer option ----------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.hidden = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def make_model(random_b: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["inp", "hidden"],
        modules_to_save=["head"],
        init_lora_weights=not random_b,
    )
    return get_peft_model(_Net(), config).to(torch.float64)


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


@pytest.mark.parametrize("random_b", [True, False], ids=["random-B", "peft-init"])
def test_efficient_mode_with_damping_is_adamw_on_the_ridge_gradients(random_b):
    """Three steps of LoRAProAdamW(damping=d) equal torch AdamW on the brute-force ridge pair."""
    import copy

    damping = 0.05
    model = make_model(random_b)
    reference = copy.deepcopy(model)
    opt = LoRAProAdamW(model, lr=1e-2, damping=damping)
    ref_opt = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    for step in range(3):
        x, y = batch(20 + step)
        for net in (model, reference):
            F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for pair in find_lora_pairs(reference):
                A, B = pair.A.numpy(), pair.B.numpy()
                s = pair.scaling
                lam = ridge_lambda(A, B, s, damping)
                new_a, new_b = ridge_grads(A, B, pair.A.grad.numpy(), pair.B.grad.numpy(), s, lam)
                pair.A.grad.copy_(torch.from_numpy(new_a))
                pair.B.grad.copy_(torch.from_numpy(new_b))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    # From PEFT's init, Adam's first step (about lr * sign(grad)) can leave two columns of B equal
    # up to ~1e-8: B^T B then has an eigenvalue below the closed form's cut-off (seen: 1e-15 against
    # 2e-3), which counts as zero with damping as without it, where the dense reference keeps it.
    # The difference is that direction's share, ~1e-9 here; skipping the damping moves A by ~1e-3.
    tol = {"rtol": 1e-9, "atol": 1e-12} if random_b else {"rtol": 1e-7, "atol": 1e-8}
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol, msg=name)
    # and the damping changed the trajectory (the comparison could tell)
    plain = make_model(random_b)
    plain_opt = LoRAProAdamW(plain, lr=1e-2)
    for step in range(3):
        x, y = batch(20 + step)
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    pairs, plain_pairs = find_lora_pairs(model), find_lora_pairs(plain)
    assert any(not torch.allclose(p.A, q.A, rtol=1e-6) for p, q in zip(pairs, plain_pairs, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": -1.0}, "damping must be >= 0"),
        ({"damping": float("nan")}, "damping must be finite"),
        ({"damping": 0.1, "mode": "full"}, "applies to mode='efficient' only"),
        ({"damping": 0.1, "mode": "factored"}, "applies to mode='efficient' only"),
        ({"damping": 0.1, "x_mode": "zero"}, "use x_mode='sylvester' or damping=0"),
    ],
)
def test_optimizer_refuses_bad_damping_with_the_fix(kwargs, message):
    with pytest.raises(LoRAProConfigError, match=message):
        LoRAProAdamW(make_model(), lr=1e-3, **kwargs)


def test_damping_is_checked_in_added_param_groups():
    model = make_model()
    head = list(model.base_model.model.head.parameters())
    ids = {id(p) for p in head}
    opt = LoRAProAdamW(
        model, lr=1e-3, params=[p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    )
    with pytest.raises(LoRAProConfigError, match="damping must be >= 0"):
        opt.add_param_group({"params": head, "damping": -1.0})


def test_state_dict_saved_before_damping_existed_loads_as_undamped():
    model = make_model()
    opt = LoRAProAdamW(model, lr=1e-3)
    x, y = batch(3)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["damping"]
    fresh = LoRAProAdamW(model, lr=1e-3, damping=0.5)
    fresh.load_state_dict(state)
    assert [g["damping"] for g in fresh.param_groups] == [0.0] * len(fresh.param_groups)
    # a negative damping in a state dict is refused like one given to the constructor
    bad = opt.state_dict()
    bad["param_groups"][0]["damping"] = -1.0
    with pytest.raises(LoRAProConfigError, match="damping must be >= 0"):
        LoRAProAdamW(model, lr=1e-3).load_state_dict(bad)


# -- the bench methods -------------------------------------------------------------------------


@pytest.mark.usefixtures("single_thread")
def test_bench_damped_methods_build_the_damped_optimizer():
    """One method per damping, each LoRAProAdamW in efficient mode with Sylvester's X and its damping;
    ``lorapro-damped-0`` is ``lorapro`` (same optimizer options, same start) under its own name."""
    from bench_tiny import TinyTask
    from lorapro.bench.methods import LORAPRO_DAMPINGS, METHODS, BuildContext, get_method
    from lorapro.bench.tasks import TaskOptions
    from lorapro.bench.train import TrainConfig, train_and_evaluate

    prepared = TinyTask().prepare(TaskOptions(train_size=32))

    def build(name):
        torch.manual_seed(0)
        return get_method(name).build(prepared.load_model(), BuildContext(TrainConfig(lr=1e-3), prepared, 4))

    names = [f"lorapro-damped-{d:g}" for d in LORAPRO_DAMPINGS]
    assert set(names) | {"lorapro-damped-0"} <= set(METHODS)
    for name, damping in [*zip(names, LORAPRO_DAMPINGS, strict=True), ("lorapro-damped-0", 0.0)]:
        opt = build(name).optimizer
        assert isinstance(opt, LoRAProAdamW)
        assert [(g["mode"], g["x_mode"], g["damping"]) for g in opt.param_groups] == [
            ("efficient", "sylvester", damping)
        ] * len(opt.param_groups)
    plain, control = build("lorapro"), build("lorapro-damped-0")
    assert plain.optimizer.defaults == control.optimizer.defaults
    a, b = plain.model.state_dict(), control.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = train_and_evaluate(names[-1], prepared, TrainConfig(lr=2e-3, batch_size=16), progress=False)
    assert not result.diverged and all(np.isfinite(result.loss_curve))
