"""The optimizers on tiny PEFT models: the step does what the paper says, state round-trips,
bad input is refused before anything changes."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro
from lorapro import LoRAProAdamW, LoRAProConfigError, LoRAProSGD, NonFiniteGradientError, optimal_gradients
from lorapro._solve import CPU_CHUNK_BYTES, PairWork, adjust_pairs, adjusted_chunks, solve_pairs
from state_checks import assert_unchanged, snapshot


class TinyNet(nn.Module):
    def __init__(self, d_in=6, d_hidden=10, d_out=3, depth=1):
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.hidden = nn.ModuleList(nn.Linear(d_hidden, d_hidden) for _ in range(depth))
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.head(x)


def make_model(dtype=torch.float64, seed=0, depth=1, random_b=True, **lora_kwargs):
    """A LoRA model with the head trained fully. random_b=True starts from B != 0 so that the
    closed form is exercised away from PEFT's B = 0 initialisation."""
    torch.manual_seed(seed)
    net = TinyNet(depth=depth)
    targets = ["inp"] + [f"hidden.{i}" for i in range(depth)]
    config = LoraConfig(
        r=lora_kwargs.pop("r", 3),
        lora_alpha=lora_kwargs.pop("lora_alpha", 6),
        target_modules=targets,
        modules_to_save=["head"],
        init_lora_weights=not random_b,
        **lora_kwargs,
    )
    return get_peft_model(net, config).to(dtype)


def batch(seed=1, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def train(model, opt, steps, seed0=10):
    losses = []
    for i in range(steps):
        x, y = batch(seed0 + i, dtype=next(model.parameters()).dtype)
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def merged_weight(pair):
    return pair.base_weight + pair.scaling * pair.B @ pair.A


def full_gradient(model, pair, x, y):
    """dL/dW of the merged weight, by autograd on a model where the layer is replaced by W."""
    layer = pair.layer
    W = merged_weight(pair).detach().requires_grad_(True)
    bias = layer.get_base_layer().bias
    handle = layer.register_forward_hook(lambda mod, inp, out: F.linear(inp[0], W, bias))
    try:
        loss_of(model, x, y).backward()
    finally:
        handle.remove()
    model.zero_grad()
    return W.grad


ALL_MODES = [("sgd", None, xm) for xm in lorapro.X_MODES] + [
    ("adamw", mode, xm) for mode in lorapro.MODES for xm in lorapro.X_MODES
]


def build(kind, mode, x_mode, model, **kw):
    if kind == "sgd":
        return LoRAProSGD(model, lr=kw.pop("lr", 0.05), momentum=kw.pop("momentum", 0.9), x_mode=x_mode, **kw)
    return LoRAProAdamW(model, lr=kw.pop("lr", 1e-3), mode=mode, x_mode=x_mode, **kw)


# -- the step is the paper's step ------------------------------------------------------------


@pytest.mark.parametrize("x_mode", lorapro.X_MODES)
def test_sgd_step_moves_merged_weight_along_projected_full_gradient(x_mode):
    """To first order, one LoRA-Pro SGD step changes W0 + sBA by -lr * (P_B g + (I - P_B) g P_A):
    the projection of the full gradient onto what a rank-r step can express (Theorem 2.1)."""
    model = make_model()
    x, y = batch()
    pair = lorapro.find_lora_pairs(model)[1]
    g = full_gradient(model, pair, x, y)
    B, A = pair.B.detach(), pair.A.detach()
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    projected = P_B @ g + (torch.eye(len(g), dtype=g.dtype) - P_B) @ g @ P_A

    lr = 1e-5
    before = merged_weight(pair).detach().clone()
    opt = LoRAProSGD(model, lr=lr, x_mode=x_mode)
    loss_of(model, x, y).backward()
    opt.step()
    delta = merged_weight(pair).detach() - before
    # second-order term s * lr^2 gB gA is ~1e-5 relative to the first-order one
    torch.testing.assert_close(delta, -lr * projected, rtol=1e-4, atol=1e-4 * lr * projected.abs().max())
    # ...and it is strictly closer to the full gradient than plain LoRA's equivalent gradient
    lora_equiv = pair.scaling * (B @ (pair.scaling * B.T @ g) + (pair.scaling * g @ A.T) @ A)
    assert (projected - g).norm() < (lora_equiv - g).norm()


def test_efficient_mode_is_adamw_on_the_adjusted_gradients():
    model = make_model()
    reference = copy.deepcopy(model)
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, x_mode="sylvester")
    ref_pairs = lorapro.find_lora_pairs(reference)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x, y = batch(20 + step)
        loss_of(model, x, y).backward()
        loss_of(reference, x, y).backward()
        with torch.no_grad():
            for pair in ref_pairs:
                new_a, new_b = optimal_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling)
                pair.A.grad.copy_(new_a)
                pair.B.grad.copy_(new_b)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(
    ("ours", "torchs"),
    [({}, {"fused": True}), ({"fused": False}, {"foreach": False}), ({"foreach": False}, {"foreach": False})],
    ids=["default-is-fused", "foreach", "per-tensor"],
)
def test_ordinary_parameters_get_exactly_torch_adamw(ours, torchs):
    """Bit for bit: float32 CPU parameters take torch's fused kernel by default, and the other
    paths repeat torch's per-tensor arithmetic."""
    model = make_model(dtype=torch.float32)
    opt = LoRAProAdamW(model, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, **ours)
    head = [p for n, p in model.named_parameters() if "head" in n and p.requires_grad]
    twins = [p.detach().clone().requires_grad_(True) for p in head]
    ref = torch.optim.AdamW(twins, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, **torchs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        for t, p in zip(twins, head, strict=True):
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, t in zip(head, twins, strict=True):
        assert torch.equal(p, t)


def test_full_mode_first_step_matches_algorithm_3():
    """Step 1 of Algorithm 3 by hand: Adam on the equivalent gradient with bias correction at
    t = 1, projection back through the closed form, decay of A, B by sqrt(1 - lr wd) and of W0
    by (1 - lr wd)."""
    lr, wd, eps = 1e-3, 0.1, 1e-8
    model = make_model()
    x, y = batch()
    loss_of(model, x, y).backward()
    pairs = lorapro.find_lora_pairs(model)
    expected = {}
    for pair in pairs:
        s, A, B = pair.scaling, pair.A.detach(), pair.B.detach()
        gA, gB = optimal_gradients(A, B, pair.A.grad, pair.B.grad, s, "zero")
        g_equiv = s * (B @ gA + gB @ A)
        m, v = 0.1 * g_equiv, 0.001 * g_equiv**2
        direction = (m / 0.1) / ((v / 0.001).sqrt() + eps)
        fA, fB = optimal_gradients(A, B, s * B.T @ direction, s * direction @ A.T, s, "sylvester")
        keep = (1 - lr * wd) ** 0.5
        W0 = (1 - lr * wd) * pair.base_weight.detach()
        expected[pair.name] = (keep * A - lr * fA, keep * B - lr * fB, W0)
    opt = LoRAProAdamW(model, lr=lr, weight_decay=wd, eps=eps, mode="full")
    opt.step()
    for pair in pairs:
        A, B, W0 = expected[pair.name]
        torch.testing.assert_close(pair.A.detach(), A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(pair.B.detach(), B, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(pair.base_weight.detach(), W0, rtol=1e-15, atol=0.0)
    state = opt.state[pairs[0].B]
    assert state["equiv_exp_avg"].shape == pairs[0].base_weight.shape
    assert state["equiv_exp_avg"].dtype == torch.float64
    assert opt.state[pairs[0].A] == {}  # full mode keeps no per-factor moments


def test_batched_layers_equal_unbatched():
    """Layers of equal shape are stacked into one batched solve: same numbers as one by one."""
    model = make_model(depth=3)
    x, y = batch()
    loss_of(model, x, y).backward()
    pairs = lorapro.find_lora_pairs(model)
    expected = {}
    for pair in pairs:
        gA, gB = optimal_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling)
        expected[pair.name] = (pair.A.detach() - 0.1 * gA, pair.B.detach() - 0.1 * gB)
    LoRAProSGD(model, lr=0.1).step()
    for pair in pairs:
        torch.testing.assert_close(pair.A.detach(), expected[pair.name][0], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(pair.B.detach(), expected[pair.name][1], rtol=1e-13, atol=1e-15)


def _mixed_layers(dtype=torch.float64) -> list[PairWork]:
    """Shapes repeated and interleaved, several scalings, two ranks, a B = 0 layer (PEFT's
    initialisation)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    layers = [  # (m, n, r, scaling)
        (12, 9, 3, 2.0), (7, 9, 3, 2.0), (12, 9, 3, 2.0), (12, 5, 3, 0.5), (7, 9, 3, 2.0),
        (12, 9, 2, 1.0), (12, 9, 3, 2.0), (6, 4, 2, 1.0),
    ]  # fmt: skip
    works = []
    for i, (m, n, r, s) in enumerate(layers):
        B = torch.zeros(m, r, dtype=dtype) if i == 4 else randn(m, r)
        works.append(PairWork(None, s, randn(r, n), B, randn(r, n), randn(m, r)))
    return works


def _assert_theorem_2_1(w: PairWork, adjusted_A, adjusted_B, x_mode: str) -> None:
    gA, gB = optimal_gradients(w.A, w.B, w.grad_A, w.grad_B, w.scaling, x_mode=x_mode)
    torch.testing.assert_close(adjusted_A, gA, rtol=1e-12, atol=1e-12 * gA.abs().max())
    torch.testing.assert_close(adjusted_B, gB, rtol=1e-12, atol=1e-12 * gB.abs().max())


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetric"])
def test_adjust_pairs_equals_the_closed_form_layer_by_layer(x_mode):
    """The batched solve (layers of every shape and scaling of a rank in one eigh) gives each
    layer exactly Theorem 2.1's answer, in float64."""
    works = _mixed_layers()
    adjust_pairs(works, lambda w: x_mode)
    for w in works:
        _assert_theorem_2_1(w, w.adjusted_A, w.adjusted_B, x_mode)


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetric"])
@pytest.mark.parametrize("max_bytes", [0, 1200, None, math.inf], ids=["one", "some", "default", "all"])
def test_adjusted_chunks_stream_the_closed_form(max_bytes, x_mode):
    """However the adjusted gradients are chunked (layer by layer, a few layers, the device
    default, all at once), every layer comes out once, in order, with Theorem 2.1's answer;
    each chunk fits the cap unless it is a single layer; and the chunk's views are released
    before the buffer is reused."""
    works = _mixed_layers()
    cap = CPU_CHUNK_BYTES if max_bytes is None else max_bytes
    solved = solve_pairs(works, lambda w: x_mode)
    chunks: list[list[PairWork]] = []
    for chunk in adjusted_chunks(works, solved, max_bytes):
        for w in chunk:
            _assert_theorem_2_1(w, w.adjusted_A, w.adjusted_B, x_mode)
        chunks.append(list(chunk))
    assert [w for chunk in chunks for w in chunk] == works
    assert all(w.adjusted_A is None and w.adjusted_B is None for w in works)

    def size(ws):
        return sum(w.A.numel() + w.B.numel() for w in ws) * 8

    for chunk, following in zip(chunks, [*chunks[1:], None], strict=True):
        assert len(chunk) == 1 or size(chunk) <= cap
        assert following is None or size(chunk + following[:1]) > cap  # filled greedily
    if max_bytes == 1200:
        assert 1 < len(chunks) < len(works)


def test_chunked_steps_equal_one_chunk_steps(monkeypatch):
    """The optimizer's result does not depend on how its adjusted gradients are chunked:
    bit-for-bit, over several steps, for AdamW and SGD with momentum."""
    results = []
    for chunk_bytes in (0, 1 << 30):
        monkeypatch.setattr(lorapro._solve, "CPU_CHUNK_BYTES", chunk_bytes)
        runs = []
        for make in (
            lambda m: LoRAProAdamW(m, lr=1e-2, weight_decay=0.1),
            lambda m: LoRAProSGD(m, lr=1e-1, momentum=0.9),
        ):
            model = make_model(depth=3)
            train(model, make(model), steps=3)
            runs.append([p.detach().clone() for p in model.parameters()])
        results.append(runs)
    for one, whole in zip(*results, strict=True):
        for a, b in zip(one, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scaling_is_read_at_every_step():
    model = make_model()
    opt = LoRAProSGD(model, lr=0.1)
    pair = opt.pairs[0]
    pair.layer.set_scale("default", 0.5)  # PEFT's run-time rescaling
    assert pair.scaling == pytest.approx(0.5 * 6 / 3)
    x, y = batch()
    loss_of(model, x, y).backward()
    gA, _ = optimal_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, 1.0)
    A_before = pair.A.detach().clone()
    opt.step()
    torch.testing.assert_close(pair.A.detach(), A_before - 0.1 * gA)


@pytest.mark.parametrize(("kind", "mode", "x_mode"), ALL_MODES)
def test_every_mode_trains_from_peft_initialisation(kind, mode, x_mode):
    """From PEFT's own init (B = 0) every mode lowers the loss and stays finite."""
    model = make_model(random_b=False)
    lr = {"sgd": 0.2, "efficient": 1e-2}.get(mode or kind, 3e-3)
    opt = build(kind, mode, x_mode, model, lr=lr)
    x, y = batch(5, n=64)
    first = loss_of(model, x, y).item()
    for _ in range(40):
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loss_of(model, x, y).item() < 0.9 * first
    assert all(pair.B.abs().max() > 0 for pair in opt.pairs)


# -- state -----------------------------------------------------------------------------------


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("kind", "mode", "x_mode"), ALL_MODES)
def test_save_load_continue_is_exactly_an_uninterrupted_run(kind, mode, x_mode):
    uninterrupted = make_model()
    opt = build(kind, mode, x_mode, uninterrupted, weight_decay=0.01)
    train(uninterrupted, opt, 6)

    first_half = make_model()
    opt = build(kind, mode, x_mode, first_half, weight_decay=0.01)
    train(first_half, opt, 3)
    model_state, opt_state = roundtrip(first_half.state_dict()), roundtrip(opt.state_dict())

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    opt = build(kind, mode, x_mode, resumed, weight_decay=0.01)
    opt.load_state_dict(opt_state)
    train(resumed, opt, 3, seed0=13)
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_state_holds_tensors_only_and_low_precision_moments_stay_float32():
    model = make_model(dtype=torch.bfloat16)
    opt = LoRAProAdamW(model, lr=1e-2)
    losses = train(model, opt, 5)
    assert all(torch.isfinite(torch.tensor(losses)))
    for state in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert state["exp_avg"].dtype == torch.float32
    restored = LoRAProAdamW(model, lr=1e-2)
    restored.load_state_dict(roundtrip(opt.state_dict()))
    for p in opt.state:
        for key, value in opt.state[p].items():
            assert restored.state[p][key].dtype == value.dtype
            assert torch.equal(restored.state[p][key], value)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bf16_parameters_train():
    model = make_model(dtype=torch.bfloat16, random_b=False)
    opt = LoRAProAdamW(model, lr=1e-2)
    x, y = batch(5, n=64, dtype=torch.bfloat16)
    first = loss_of(model, x, y).item()
    for _ in range(30):
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert loss_of(model, x, y).item() < 0.9 * first


def test_lr_scheduler_and_param_groups():
    model = make_model()
    pairs = lorapro.find_lora_pairs(model)
    lora = [t for p in pairs for t in (p.A, p.B)]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not t for t in lora)]
    opt = LoRAProAdamW(model, lr=1e-3, params=[{"params": lora}, {"params": others, "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-3]
    assert len(opt.pairs) == len(pairs)


def test_state_dict_from_another_model_is_refused():
    small, big = make_model(), make_model(depth=2)
    opt_small = LoRAProAdamW(small, lr=1e-3)
    train(small, opt_small, 1)
    opt_big = LoRAProAdamW(big, lr=1e-3)
    with pytest.raises(LoRAProConfigError, match="different model"):
        opt_big.load_state_dict(opt_small.state_dict())
    full = LoRAProAdamW(small, lr=1e-3, mode="full")
    with pytest.raises(LoRAProConfigError, match="does not match"):
        full.load_state_dict({**opt_small.state_dict(), "param_groups": full.state_dict()["param_groups"]})


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": 1e-3, "mode": "fast"}, "unknown mode 'fast'"),
        ({"lr": 1e-3, "x_mode": "eig"}, "unknown x_mode 'eig'"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, r"betas\[1\] must be < 1"),
        ({"lr": 1e-3, "eps": -1.0}, "eps must be > 0"),
        ({"lr": 1e-3, "eps": 0.0}, "eps must be > 0"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"lr": 1e-3, "nonfinite": "ignore"}, "unknown nonfinite policy"),
    ],
)
def test_bad_options_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(LoRAProConfigError, match=message):
        LoRAProAdamW(make_model(), **kwargs)


def test_sgd_bad_momentum():
    with pytest.raises(LoRAProConfigError, match="momentum must be >= 0"):
        LoRAProSGD(make_model(), lr=0.1, momentum=-0.5)


def test_model_without_lora_is_refused():
    with pytest.raises(LoRAProConfigError, match="get_peft_model"):
        LoRAProAdamW(TinyNet(), lr=1e-3)
    with pytest.raises(TypeError, match="pass the model itself"):
        LoRAProAdamW(list(TinyNet().parameters()), lr=1e-3)


def test_dora_is_refused_naming_the_paper_limitation():
    net = TinyNet()
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["inp"], use_dora=True))
    with pytest.raises(LoRAProConfigError, match="DoRA"):
        LoRAProSGD(model, lr=0.1)


def test_split_pair_across_groups_is_refused():
    model = make_model()
    pair = lorapro.find_lora_pairs(model)[0]
    rest = [p for p in model.parameters() if p.requires_grad and p is not pair.A]
    with pytest.raises(LoRAProConfigError, match="same parameter group"):
        LoRAProAdamW(model, lr=1e-3, params=[{"params": [pair.A]}, {"params": rest}])


@pytest.mark.parametrize(("kind", "mode", "x_mode"), ALL_MODES)
@pytest.mark.parametrize("where", ["lora", "head"])
def test_nonfinite_gradients_raise_or_skip_with_nothing_modified(kind, mode, x_mode, where):
    model = make_model()
    opt = build(kind, mode, x_mode, model, weight_decay=0.01)
    train(model, opt, 2)  # state exists
    x, y = batch(99)
    loss_of(model, x, y).backward()
    head = model.base_model.model.head.modules_to_save["default"]
    target = opt.pairs[0].B if where == "lora" else head.weight
    target.grad[0, 0] = float("nan")
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match="nonfinite='skip'"):
        opt.step()
    assert_unchanged(model, opt, snap)

    skipping = build(kind, mode, x_mode, model, weight_decay=0.01, nonfinite="skip")
    skipping.load_state_dict(opt.state_dict())
    snap = snapshot(model, skipping)
    skipping.step()
    assert skipping.skipped_steps == 1
    assert_unchanged(model, skipping, snap)
    skipping.zero_grad()
    train(model, skipping, 1)
    assert skipping.skipped_steps == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "fast", [{"foreach": True, "fused": False}, {"fused": None}], ids=["foreach", "fused"]
)
def test_foreach_and_per_tensor_paths_agree(dtype, fast):
    """bf16 parameters (float32 moments) never take the fused kernel; float64 ones do by default."""
    runs = []
    for kwargs in ({"foreach": False}, fast):
        model = make_model(dtype=dtype)
        opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, **kwargs)
        train(model, opt, 3)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for (name, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
    for p1, p2 in zip(o1.state, o2.state, strict=True):
        for key in o1.state[p1]:
            torch.testing.assert_close(o1.state[p1][key], o2.state[p2][key], rtol=1e-12, atol=1e-12)


def test_factors_swapped_by_a_wrapper_are_followed_or_refused():
    """Wrappers such as Accelerate's FSDP2 prepare replace parameters in the model and in the
    optimizer's groups after construction: the pairs must follow (else the new factors would
    silently get plain AdamW), and a factor missing from the groups must be refused."""
    model, twin = make_model(), make_model()
    opt, twin_opt = LoRAProSGD(model, lr=0.1), LoRAProSGD(twin, lr=0.1)
    layer = opt.pairs[0].layer
    old = layer.lora_A["default"].weight
    new = nn.Parameter(old.detach().clone())
    layer.lora_A["default"].weight = new
    for group in opt.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert opt.pairs[0].A is new

    layer.lora_B["default"].weight = nn.Parameter(layer.lora_B["default"].weight.detach().clone())
    with pytest.raises(LoRAProConfigError, match="same parameter group"):
        train(model, opt, 1)
