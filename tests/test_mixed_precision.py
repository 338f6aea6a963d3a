"""The numerical hazards of a training step: low-precision parameters, loss scaling (GradScaler),
autocast, gradient clipping and non-finite gradients (Inf as well as NaN, in Linear, Conv and
Embedding pairs, raw or produced by the adjustment), for every mode and x_mode.

Expected values never come from the step under test: they come from the same optimizer fed fp32
copies, from torch.optim / the closed form applied by hand, or from a run that never saw the hazard.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro
from lorapro import LoRAProAdamW, LoRAProConfigError, LoRAProSGD, NonFiniteGradientError, optimal_gradients
from state_checks import assert_unchanged, snapshot

ALL_MODES = [("sgd", None, xm) for xm in lorapro.X_MODES] + [
    ("adamw", mode, xm) for mode in lorapro.MODES for xm in lorapro.X_MODES
]


def mode_id(case) -> str:
    kind, mode, x_mode = case
    return f"{mode or kind}-{x_mode}"


pytestmark = pytest.mark.usefixtures("single_thread")


# -- models --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


class ConvEmbedNet(nn.Module):
    """Token ids -> Embedding -> a 1-channel "image" -> Conv2d -> Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 6, 3)

    def forward(self, ids):
        x = self.emb(ids).unsqueeze(1)  # (batch, 1, 4, 6)
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def mlp(dtype=torch.float32, seed=0, random_b=True) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["inp", "hidden"],
        modules_to_save=["head"],
        init_lora_weights=not random_b,
    )
    return get_peft_model(MLP(), config).to(dtype)


def conv_embed(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["emb", "conv"], modules_to_save=["head"], init_lora_weights=False
    )
    return get_peft_model(ConvEmbedNet(), config).double()


def mlp_batch(seed, n=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def ids_batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (n, 4), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def build(case, model, **kw):
    kind, mode, x_mode = case
    momentum = kw.pop("momentum", 0.9)
    if kind == "sgd":
        return LoRAProSGD(model, lr=kw.pop("lr", 0.05), momentum=momentum, x_mode=x_mode, **kw)
    return LoRAProAdamW(model, lr=kw.pop("lr", 1e-3), mode=mode, x_mode=x_mode, **kw)


def train(model, opt, steps, seed0=10, batch_fn=None, dtype=None):
    dtype = dtype or next(model.parameters()).dtype
    batch_fn = batch_fn or (lambda seed: mlp_batch(seed, dtype=dtype))
    for i in range(steps):
        loss_of(model, batch_fn(seed0 + i)).backward()
        opt.step()
        opt.zero_grad()


def assert_same_parameters(a: nn.Module, b: nn.Module):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# -- low-precision parameters: fp32 math, rounded once -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_low_precision_step_is_the_float32_step_rounded_once(case, dtype):
    """A bf16/fp16 model's step equals the same optimizer on an fp32 copy (same values, same gradients,
    same fp32 state) rounded once to the parameter dtype, bit for bit; the state stays fp32."""
    # Full mode refuses weight decay on low-precision base weights (test below): no decay there.
    wd = 0.0 if case[1] in lorapro.adamw.EQUIVALENT_GRADIENT_MODES else 0.01
    model = mlp(dtype)
    opt = build(case, model, weight_decay=wd)
    train(model, opt, 2)  # moments exist
    loss_of(model, mlp_batch(99, dtype=dtype)).backward()

    twin = copy.deepcopy(model).float()
    # Low-precision parameters take the foreach AdamW path (torch's fused kernel cannot keep
    # float32 moments for them): the fp32 twin must take it too for bit-equality.
    twin_opt = build(case, twin, weight_decay=wd)
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        if "fused" in group:  # saved options are what a loaded optimizer runs with
            group["fused"] = False
    twin_opt.load_state_dict(state)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.float()
    opt.step()
    twin_opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.dtype == dtype, name
        assert torch.equal(p, q.to(dtype)), name
    for p, state in opt.state.items():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.float32, key
                twin_p = dict(zip(map(id, model.parameters()), twin.parameters(), strict=True))[id(p)]
                assert torch.equal(value, twin_opt.state[twin_p][key]), key


# -- GradScaler ----------------------------------------------------------------------------------------------
def scaler_step(model, opt, scaler, batch):
    scaler.scale(loss_of(model, batch)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_grad_scaler_unscales_before_the_adjustment(case, dtype):
    """torch.amp.GradScaler("cpu"): scaler.step(optimizer) unscales the raw gradients in place before
    calling step, so the adjusted step equals the unscaled one. The scale is a power of two, so "equal"
    means bit for bit."""
    scaled, plain = mlp(dtype), mlp(dtype)
    opt_s, opt_p = build(case, scaled), build(case, plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2)
    for i in range(4):
        batch = mlp_batch(30 + i, dtype=dtype)
        scaler_step(scaled, opt_s, scaler, batch)
        loss_of(plain, batch).backward()
        opt_p.step()
        opt_p.zero_grad()
        assert_same_parameters(scaled, plain)
    assert scaler.get_scale() == 2.0**16  # grew twice: no step was skipped
    assert opt_s.skipped_steps == 0


@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_grad_scaler_overflow_skips_the_step_with_nothing_touched(case):
    """An overflowed step is skipped by the scaler before the optimizer runs: parameters and state are
    untouched, the scale halves, and training then continues exactly as if the batch had not been seen."""
    model, reference = mlp(), mlp()
    opt = build(case, model)  # nonfinite="raise": the scaler must keep the Inf away from it
    ref_opt = build(case, reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(2):
        scaler_step(model, opt, scaler, mlp_batch(40 + i))
    train(reference, ref_opt, 2, seed0=40)

    snap = snapshot(model, opt)
    scaler.scale(loss_of(model, mlp_batch(50))).backward()
    opt.pairs[0].B.grad[0, 0] = float("inf")  # what an fp16 overflow leaves behind
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert_unchanged(model, opt, snap)
    assert scaler.get_scale() == 2.0**9
    for i in range(2):
        scaler_step(model, opt, scaler, mlp_batch(60 + i))
    train(reference, ref_opt, 2, seed0=60)
    assert_same_parameters(model, reference)


def test_grad_scaler_refuses_fp16_parameters():
    """torch's own rule, for any optimizer: GradScaler cannot unscale fp16 gradients. Keep fp32 (master)
    parameters with fp16 autocast, or use bf16 parameters."""
    model = mlp(torch.float16)
    opt = LoRAProAdamW(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    snap = snapshot(model, opt)
    scaler.scale(loss_of(model, mlp_batch(1, dtype=torch.float16))).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)
    assert_unchanged(model, opt, snap)


# -- autocast ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+scaler"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_autocast_training_on_cpu(case, amp_dtype):
    """fp32 parameters, forward under torch.autocast("cpu"): gradients arrive in fp32, the state is fp32,
    and every mode lowers the loss from PEFT's B = 0 initialisation (fp16 with a GradScaler)."""
    model = mlp(random_b=False)
    # (SM3's estimate bounds Adam's second moment from above, so its steps are shorter: like efficient
    # mode it wants LoRA's rates, as the bench found on trec and fashion)
    lr = {"sgd": 0.2, "efficient": 1e-2, "factored-sm3": 1e-2}.get(case[1] or case[0], 3e-3)
    opt = build(case, model, lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    batch = mlp_batch(5, n=64)
    first = loss_of(model, batch).item()
    for _ in range(40):
        with torch.autocast("cpu", dtype=amp_dtype):
            logits = model(batch[0])
        assert logits.dtype == amp_dtype
        scaler.scale(F.cross_entropy(logits.float(), batch[1])).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    assert loss_of(model, batch).item() < 0.9 * first
    assert opt.skipped_steps == 0


# -- gradient clipping ---------------------------------------------------------------------------------------
def clip_coefficient(model, max_norm):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return min(1.0, max_norm / (float(total) + 1e-6)), float(total)


@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_clip_grad_norm_before_step_clips_the_raw_lora_gradients(case):
    """clip_grad_norm_ before step scales the raw gradients; the optimizer then adjusts the clipped ones.
    Reference: the same optimizer on a twin whose raw gradients were multiplied by the coefficient by
    hand, and for SGD the closed form applied by hand."""
    max_norm = 0.05
    model = mlp(torch.float64)
    opt = build(case, model, momentum=0.0, weight_decay=0.01)
    train(model, opt, 2)
    twin = copy.deepcopy(model)
    twin_opt = build(case, twin, momentum=0.0, weight_decay=0.01)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    unclipped = copy.deepcopy(model)
    unclipped_opt = build(case, unclipped, momentum=0.0, weight_decay=0.01)
    unclipped_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    batch = mlp_batch(77, dtype=torch.float64)
    for m in (model, twin, unclipped):
        loss_of(m, batch).backward()
    coef, total = clip_coefficient(twin, max_norm)
    assert coef < 0.5, f"clipping must engage (norm {total:.3g})"
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert float(returned) == pytest.approx(total, rel=1e-12)
    with torch.no_grad():
        for p in twin.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    if case[0] == "sgd":
        expected = {}
        for pair in twin_opt.pairs:
            gA, gB = optimal_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, case[2])
            expected[pair.name] = (
                pair.A.detach() - 0.05 * (gA + 0.01 * pair.A.detach()),
                pair.B.detach() - 0.05 * (gB + 0.01 * pair.B.detach()),
            )
    opt.step()
    twin_opt.step()
    unclipped_opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
    if case[0] == "sgd":
        for pair in opt.pairs:
            torch.testing.assert_close(pair.A.detach(), expected[pair.name][0], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(pair.B.detach(), expected[pair.name][1], rtol=1e-12, atol=1e-15)
    # and clipping made a difference (the test could not pass with clipping ignored)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(model.parameters(), unclipped.parameters(), strict=True)
    )
    assert moved > 1e-6


def test_clipping_bounds_the_raw_gradients_not_the_adjusted_step():
    """Documented consequence of the order: after clipping to max_norm, the adjusted gradients can be far
    longer than max_norm (they scale like 1 / (s^2 sigma_min^2) of the factors). Here B is small (early
    training from B = 0), so grad_A adjusted = (B^T B)^-1 grad_A / s^2 is large."""
    model = mlp(torch.float64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] == 4:  # lora_B (out, r)
                module.weight.mul_(1e-3)
    loss_of(model, mlp_batch(3, dtype=torch.float64)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    pairs = lorapro.find_lora_pairs(model)
    with torch.no_grad():
        adjusted = [optimal_gradients(p.A, p.B, p.A.grad, p.B.grad, p.scaling) for p in pairs]
        raw = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        raw_norm = torch.linalg.vector_norm(torch.cat(raw))
        adjusted_norm = torch.linalg.vector_norm(torch.cat([t.flatten() for pair in adjusted for t in pair]))
    assert float(raw_norm) <= 1.0 + 1e-9
    assert float(adjusted_norm) > 10.0  # 66 here: clipping bounded the raw gradients only


# -- non-finite gradients ------------------------------------------------------------------------------------
# tests/test_optimizers.py covers a NaN in a LoRA B gradient and in the head for every mode. Here: +Inf and
# -Inf, in A, in Conv and Embedding pairs, non-finite values that only the adjustment produces, and that
# a skipped step leaves no trace at all.
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_inf_in_lora_a_gradient_raises_or_skips_with_nothing_modified(case, value):
    model = mlp()
    opt = build(case, model, weight_decay=0.01)
    train(model, opt, 2)
    loss_of(model, mlp_batch(99)).backward()
    opt.pairs[1].A.grad[0, -1] = value
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match="no parameter or optimizer state was changed"):
        opt.step()
    assert_unchanged(model, opt, snap)
    skipping = build(case, model, weight_decay=0.01, nonfinite="skip")
    skipping.load_state_dict(opt.state_dict())
    snap = snapshot(model, skipping)
    assert skipping.step() is None
    assert skipping.skipped_steps == 1
    assert_unchanged(model, skipping, snap)


@pytest.mark.parametrize("where", ["emb.A", "emb.B", "conv.A", "conv.B"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_nonfinite_in_conv_and_embedding_pairs(case, where):
    model = conv_embed()
    opt = build(case, model, weight_decay=0.01)
    train(model, opt, 2, batch_fn=ids_batch)
    loss_of(model, ids_batch(99)).backward()
    pairs = {p.kind: p for p in opt.pairs}
    assert set(pairs) == {"embedding", "conv"}
    pair = pairs["embedding" if where.startswith("emb") else "conv"]
    grad = (pair.A if where.endswith("A") else pair.B).grad
    grad.view(-1)[0] = float("nan") if where.endswith("A") else float("inf")
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_adjustment_overflow_is_caught_although_raw_gradients_are_finite(case):
    """float32: A ~ 1e-15 makes (A A^T)^+ ~ 1e30, so a finite raw grad_B of 1e20 becomes an Inf adjusted
    gradient. The step's check (on the r x r terms and solved coefficients) refuses it: nothing is applied."""
    model = mlp()
    opt = build(case, model)
    train(model, opt, 1)
    pair = opt.pairs[0]
    with torch.no_grad():
        pair.A.mul_(1e-15)
    loss_of(model, mlp_batch(5)).backward()
    pair.B.grad.fill_(1e20)
    raw = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in raw)
    _, gB = optimal_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling, case[2])
    assert not torch.isfinite(gB).all()  # the hazard is real
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_skipped_bad_batch_leaves_no_trace(case):
    """nonfinite="skip": a run that meets a NaN batch is, afterwards, bit for bit the run that never saw it
    (moments, step counters, momentum buffers and parameters)."""
    model, reference = mlp(), mlp()
    opt = build(case, model, weight_decay=0.01, nonfinite="skip")
    ref_opt = build(case, reference, weight_decay=0.01, nonfinite="skip")
    train(model, opt, 2)
    train(reference, ref_opt, 2)
    x, y = mlp_batch(123)
    x[3, 2] = float("nan")  # a corrupt example poisons every gradient
    loss_of(model, (x, y)).backward()
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    train(model, opt, 3, seed0=20)
    train(reference, ref_opt, 3, seed0=20)
    assert_same_parameters(model, reference)
    assert ref_opt.skipped_steps == 0
    for s, t in zip(opt.state.values(), ref_opt.state.values(), strict=True):
        assert set(s) == set(t)
        for key in s:
            assert torch.equal(s[key], t[key]), key


# -- full-mode weight decay of low-precision base weights ----------------------------------------------------
def test_full_mode_weight_decay_reaches_float32_base_weights():
    """W0 must shrink by (1 - lr wd)^steps ~ 4% (Eq. 57-58)."""
    lr, steps = 1e-2, 40
    model = mlp(torch.float32)
    opt = LoRAProAdamW(model, lr=lr, weight_decay=0.1, mode="full")
    pair = opt.pairs[0]
    w0 = pair.base_weight.detach().clone()
    train(model, opt, steps)
    expected = w0 * (1 - lr * 0.1) ** steps
    assert float(expected.abs().max()) < 0.97 * float(w0.abs().max())
    torch.testing.assert_close(pair.base_weight.detach(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_full_mode_weight_decay_on_low_precision_base_weights_is_refused(dtype):
    """In bf16/fp16 the per-step factor (1 - lr wd) rounds back to 1, so W0 would silently never decay
    (found by this suite): the step refuses before touching anything, naming the fixes."""
    model = mlp(dtype)
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode="full")
    loss_of(model, mlp_batch(1, dtype=dtype)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LoRAProConfigError, match="rounds back to the same value"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not opt.state


# -- non-finite gradients at PEFT's initialisation -----------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", ALL_MODES, ids=mode_id)
def test_nonfinite_grad_b_is_caught_when_b_is_zero(case, value):
    """The step checks LoRA gradients through the r x r products B^T grad_B and grad_A A^T. At PEFT's
    initialisation B = 0, so a NaN/Inf in grad_B is caught only because 0 * NaN = NaN survives the matmul:
    this pins that (a BLAS that skipped zero operands would let the NaN through into B)."""
    model = mlp(random_b=False)
    opt = build(case, model)
    loss_of(model, mlp_batch(1)).backward()
    pair = opt.pairs[0]
    assert not pair.B.any()
    pair.B.grad[0, 0] = value
    snap = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_unchanged(model, opt, snap)


# -- soak (shorter version of benchmarks/soak.py) ------------------------------------------------------------
@pytest.mark.slow
def test_soak_bf16_every_mode(monkeypatch):
    """Every mode and x_mode, 300 bf16 steps each from PEFT's B = 0 init, nonfinite="raise": finite
    parameters and state, and a lower training and held-out loss. The 10,000-step run is in the docs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("lorapro_soak", path)
    soak = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lorapro_soak", soak)  # dataclasses look their module up
    spec.loader.exec_module(soak)
    for mode in ("sgd", "efficient", "full"):
        for x_mode in lorapro.X_MODES:
            result = soak.soak(mode, x_mode, steps=300)
            assert result.finite, result
            assert result.last_loss < 0.8 * result.first_loss, result
            assert result.heldout_after < 0.8 * result.heldout_before, result
