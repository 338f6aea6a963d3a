"""lorapro.attach: LoRA-Pro's gradients out of backward, checked against the closed form and the
optimizers (float64 where the math is compared, float32 for whole training runs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorapro
from integration_common import lm_loss, pattern_tokens, tiny_lora_llama, trainable_state

pytestmark = pytest.mark.usefixtures("single_thread")


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def expected_adjusted(raw_model, x_mode="sylvester") -> dict[str, torch.Tensor]:
    """Theorem 2.1 (lorapro.optimal_gradients) applied to the raw gradients of an unattached copy."""
    names = {id(p): n for n, p in raw_model.named_parameters()}
    out = {}
    for pair in lorapro.find_lora_pairs(raw_model):
        if pair.A.grad is None:
            continue
        gA, gB = lorapro.optimal_gradients(
            pair.matrix_A().detach(), pair.matrix_B().detach(), pair.matrix_A(pair.A.grad),
            pair.matrix_B(pair.B.grad), pair.scaling, x_mode=x_mode,
        )  # fmt: skip
        out[names[id(pair.A)]] = gA.reshape(pair.A.shape)
        out[names[id(pair.B)]] = gB.reshape(pair.B.shape)
    return out


def assert_adjusted(attached_model, raw_model, x_mode="sylvester", rtol=1e-10):
    got = lora_grads(attached_model)
    expected = expected_adjusted(raw_model, x_mode)
    assert expected
    for name, value in expected.items():
        tol = max(rtol, 1e-5) if value.dtype == torch.float32 else rtol  # PEFT adds adapters in float32
        scale = value.abs().max().item()
        torch.testing.assert_close(got[name], value, rtol=tol, atol=tol * scale, msg=name)
    # and it is not LoRA's own gradient
    raw = lora_grads(raw_model)
    assert any(not torch.allclose(raw[n], got[n]) for n in expected)


# -- the math, float64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetric"])
def test_backward_leaves_theorem_2_1_gradients(x_mode):
    raw = tiny_lora_llama(random_b=True).double()
    model = copy.deepcopy(raw)
    handle = lorapro.attach(model, x_mode=x_mode)
    tokens = pattern_tokens(6)
    lm_loss(raw, tokens).backward()
    lm_loss(model, tokens).backward()
    assert_adjusted(model, raw, x_mode)
    assert len(handle.pairs) == 8


def test_large_ranks_use_the_eigenbases():
    """Above VEC_OPERATOR_MAX_RANK the hooks apply the maps in the eigenbases instead of as
    r^2 x r^2 matrices: same answer."""
    from lorapro.backward_hooks import VEC_OPERATOR_MAX_RANK

    r = VEC_OPERATOR_MAX_RANK + 2
    raw = tiny_lora_llama(random_b=True, r=r, hidden_size=48, intermediate_size=64).double()
    model = copy.deepcopy(raw)
    handle = lorapro.attach(model)
    lm_loss(raw, pattern_tokens(6)).backward()
    lm_loss(model, pattern_tokens(6)).backward()
    assert all(e.cached.x_op is None for e in handle._entries.values())
    assert_adjusted(model, raw)


def test_peft_initialisation_b_zero():
    """B = 0: grad_A is zero and the minimum-norm answer is taken (no NaN)."""
    raw = tiny_lora_llama(random_b=False).double()
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    lm_loss(raw, pattern_tokens(4)).backward()
    lm_loss(model, pattern_tokens(4)).backward()
    assert all(torch.isfinite(g).all() for g in lora_grads(model).values())
    assert_adjusted(model, raw)


def test_lora_dropout():
    """With lora_dropout the closed form still holds per backward (the dropped input feeds both
    factors' gradients alike); the two copies draw the same masks."""
    raw = tiny_lora_llama(random_b=True).double()
    for module in raw.modules():
        if hasattr(module, "lora_dropout"):
            for name in list(module.lora_dropout):
                module.lora_dropout[name] = nn.Dropout(p=0.3)
    raw.train()
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    for part in pattern_tokens(8).chunk(2):
        for m in (raw, model):
            torch.manual_seed(7)
            lm_loss(m, part).backward()
    assert_adjusted(model, raw)


def test_per_micro_batch_adjustment_equals_adjusting_the_accumulated_gradient():
    """Linearity: 4 micro-batches adjusted one by one and accumulated in .grad equal the closed
    form applied to the accumulated raw gradient."""
    raw = tiny_lora_llama(random_b=True).double()
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    for tokens in pattern_tokens(8).chunk(4):
        lm_loss(raw, tokens).backward()
        lm_loss(model, tokens).backward()
    assert_adjusted(model, raw)


class Mixed(nn.Module):
    """Linear, Conv2d (3x3 and 1x1) and Embedding layers, for every kind of LoRA pair."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 4, 1)
        self.lin = nn.Linear(8 + 4 * 16, 5)

    def forward(self, ids, image):
        e = self.emb(ids).mean(1)
        c = self.point(torch.tanh(self.conv(image))).flatten(1)
        return self.lin(torch.cat([e, c], dim=1))


def mixed_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (4, 5), generator=g)
    return ids, torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)


def mixed_model(**lora) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=3, lora_alpha=5, target_modules=["emb", "conv", "point", "lin"], init_lora_weights=False, **lora
    )
    return get_peft_model(Mixed().double(), config)


@pytest.mark.parametrize(
    "lora",
    [{}, {"use_rslora": True}, {"rank_pattern": {"conv": 2}, "alpha_pattern": {"lin": 9}}],
    ids=["plain", "rslora", "patterns"],
)
def test_linear_conv_embedding_and_live_scaling(lora):
    raw = mixed_model(**lora)
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    ids, image = mixed_inputs()
    raw(ids, image).square().sum().backward()
    model(ids, image).square().sum().backward()
    assert {p.kind for p in lorapro.find_lora_pairs(model)} == {"linear", "conv", "embedding"}
    assert_adjusted(model, raw)
    # PEFT's set_scale changes the scaling at run time: read live.
    for m in (raw, model):
        m.zero_grad()
        for module in m.modules():
            if hasattr(module, "set_scale"):
                module.set_scale("default", 1.7)
        m(ids, image).square().sum().backward()
    assert_adjusted(model, raw)


def test_several_active_adapters():
    raw = mixed_model()
    second = LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "point"], init_lora_weights=False)
    raw.add_adapter("second", second)
    raw.base_model.set_adapter(["default", "second"])
    for n, p in raw.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    model = copy.deepcopy(raw)
    handle = lorapro.attach(model)
    assert len(handle.pairs) == 6
    ids, image = mixed_inputs()
    raw(ids, image).square().sum().backward()
    model(ids, image).square().sum().backward()
    assert_adjusted(model, raw)


# -- adapters and factors that change later ------------------------------------------------------


def test_switched_added_and_deleted_adapters_are_followed():
    raw = mixed_model()
    model = copy.deepcopy(raw)
    handle = lorapro.attach(model)
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False)
    for m in (raw, model):
        m.add_adapter("b", second)
        m.set_adapter("b")
    model.load_state_dict(raw.state_dict())  # the new adapter's random initialisation
    ids, image = mixed_inputs()
    raw(ids, image).square().sum().backward()
    model(ids, image).square().sum().backward()
    assert [p.adapter for p in handle.pairs] == ["b"]
    assert_adjusted(model, raw)
    for m in (raw, model):
        m.zero_grad()
        m.set_adapter("default")
        m.delete_adapter("b")
        m(ids, image).square().sum().backward()
    assert {p.adapter for p in handle.pairs} == {"default"}
    assert_adjusted(model, raw)


def test_an_unsupported_adapter_added_later_raises_at_the_next_forward():
    model = mixed_model()
    lorapro.attach(model)
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    model.set_adapter("dora")
    with pytest.raises(lorapro.LoRAProConfigError, match="DoRA"):
        model(*mixed_inputs())


def test_basis_is_computed_once_per_step_and_never_stale():
    """Accumulation reuses the A/B-only part; an optimizer step, an in-place write and
    load_state_dict each make it recompute; a .data write needs refresh()."""
    raw = tiny_lora_llama(random_b=True).double()
    model = copy.deepcopy(raw)
    handle = lorapro.attach(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = pattern_tokens(8)
    for step in range(3):
        for part in tokens.chunk(4):
            lm_loss(model, part).backward()
        opt.step()
        opt.zero_grad()
        assert handle.basis_computations == step + 1

    def check():
        raw.load_state_dict(model.state_dict())
        for m in (raw, model):
            m.zero_grad()
            lm_loss(m, tokens).backward()
        assert_adjusted(model, raw)

    pair = handle.pairs[0]
    with torch.no_grad():
        pair.A.mul_(1.5)  # version counter
    check()
    state = {k: v * 0.9 if "lora_B" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check()
    pair.B.data.mul_(2.0)  # bypasses autograd's version counter: refresh() says so
    handle.refresh()
    check()


def test_remove_gives_back_lora_gradients_and_works_as_a_context_manager():
    raw = tiny_lora_llama(random_b=True)
    model = copy.deepcopy(raw)
    tokens = pattern_tokens(4)
    with lorapro.attach(model) as handle:
        lm_loss(model, tokens).backward()
        assert handle.pairs and all(p.A.grad is not None for p in handle.pairs)
    assert handle.removed and not handle.pairs
    model.zero_grad()
    lm_loss(raw, tokens).backward()
    lm_loss(model, tokens).backward()
    raw_grads, grads = lora_grads(raw), lora_grads(model)
    assert all(torch.equal(raw_grads[n], grads[n]) for n in raw_grads)
    handle2 = lorapro.attach(model)  # attach again after remove is fine
    handle2.remove()


def test_a_deep_copy_of_an_attached_model_is_not_attached():
    """The copy has no hooks, so nothing may treat it as attached: an optimizer and attach work on it."""
    model = tiny_lora_llama(random_b=True)
    lorapro.attach(model)
    copy_ = copy.deepcopy(model)
    lorapro.LoRAProAdamW(copy_, lr=1e-3)
    lorapro.attach(copy_).remove()


def test_misuse_is_refused():
    model = tiny_lora_llama()
    handle = lorapro.attach(model)
    with pytest.raises(lorapro.LoRAProConfigError, match="already attached"):
        lorapro.attach(model)
    with pytest.raises(lorapro.LoRAProConfigError, match="adjust them a second time"):
        lorapro.LoRAProAdamW(model, lr=1e-3)
    with pytest.raises(lorapro.LoRAProConfigError, match="unknown x_mode"):
        lorapro.attach(tiny_lora_llama(), x_mode="sylvestre")
    with pytest.raises(TypeError, match="takes the model"):
        lorapro.attach([p for p in model.parameters()])
    with pytest.raises(lorapro.LoRAProConfigError, match="no trainable LoRA layers"):
        lorapro.attach(nn.Linear(3, 3))
    handle.remove()
    with pytest.raises(lorapro.LoRAProConfigError, match="DoRA"):
        lorapro.attach(get_peft_model(Mixed(), LoraConfig(r=2, target_modules=["lin"], use_dora=True)))


def test_an_optimizer_built_before_attach_refuses_to_step():
    model = tiny_lora_llama(random_b=True)
    opt = lorapro.LoRAProSGD(model, lr=0.1)
    lorapro.attach(model)
    lm_loss(model, pattern_tokens(4)).backward()
    with pytest.raises(lorapro.LoRAProConfigError, match="adjust them a second time"):
        opt.step()


# -- equal to lorapro's optimizers ---------------------------------------------------------------


def train(model, opt, steps=4, accumulation=4, clip=None, scaler=None):
    tokens = pattern_tokens(8)
    losses = []
    for _ in range(steps):
        total = 0.0
        for part in tokens.chunk(accumulation):
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                loss = lm_loss(model, part) / accumulation
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("random_b", "dtype", "tol"),
    [(True, torch.float32, 1e-6), (False, torch.float64, 1e-10)],
    ids=["random_b-float32", "peft_init-float64"],
)
def test_attach_plus_torch_adamw_equals_lorapro_adamw(random_b, dtype, tol):
    """Accumulation 4, weight decay, 4 steps. From PEFT's B = 0 the first steps feed Adam
    gradients of A that are tiny and which Adam scales up to full-size updates, so float32
    rounding differences (2e-6 seen) show; in float64 the two routes agree to 1e-14."""
    reference = tiny_lora_llama(random_b=random_b).to(dtype)
    model = copy.deepcopy(reference)
    train(reference, lorapro.LoRAProAdamW(reference, lr=1e-2, weight_decay=0.1))
    lorapro.attach(model)
    losses = train(model, torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1))
    got, expected = trainable_state(model), trainable_state(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol, msg=name)
    plain = tiny_lora_llama(random_b=random_b).to(dtype)
    train(plain, torch.optim.AdamW(trainable(plain), lr=1e-2, weight_decay=0.1))
    assert max((trainable_state(plain)[n] - got[n]).abs().max().item() for n in got) > 1e-3
    assert losses[-1] < losses[0]


def test_attach_plus_torch_sgd_equals_lorapro_sgd():
    reference = tiny_lora_llama(random_b=True)
    model = copy.deepcopy(reference)
    train(reference, lorapro.LoRAProSGD(reference, lr=0.05, momentum=0.9, weight_decay=0.01))
    lorapro.attach(model)
    train(model, torch.optim.SGD(trainable(model), lr=0.05, momentum=0.9, weight_decay=0.01))
    got, expected = trainable_state(model), trainable_state(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_clipping_under_attach_clips_the_adjusted_gradients():
    """Clipping after backward sees LoRA-Pro's gradients: the step equals the closed form's
    gradients clipped by their own norm (not by LoRA's raw norm)."""
    raw = tiny_lora_llama(random_b=True).double()
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    tokens = pattern_tokens(8)
    lm_loss(raw, tokens).backward()
    lm_loss(model, tokens).backward()
    expected = {**lora_grads(raw), **expected_adjusted(raw)}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))
    reported = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(reported, norm)
    got = lora_grads(model)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g * (1e-3 / (norm + 1e-6)), rtol=1e-10, atol=1e-16)


# -- non-finite gradients ------------------------------------------------------------------------


def poison_one_layer(model, value: float):
    """A NaN or Inf in one entry of one LoRA layer's output gradient."""
    pair = lorapro.find_lora_pairs(model)[1]
    lora_b = pair.layer.lora_B[pair.adapter]

    def on_output(module, args, out):
        def poison(grad):
            grad = grad.clone()
            grad.view(-1)[3] = value
            return grad

        out.register_hook(poison)

    lora_b.register_forward_hook(on_output)
    return pair


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("random_b", [True, False], ids=["random_b", "peft_init"])
def test_a_non_finite_gradient_stays_non_finite(value, random_b):
    model = tiny_lora_llama(random_b=random_b)
    pair = poison_one_layer(model, value)
    lorapro.attach(model)
    lm_loss(model, pattern_tokens(4)).backward()
    assert not torch.isfinite(pair.B.grad).all()
    if random_b:  # at B = 0, grad_A = s B^T g is exactly 0 whatever g holds
        assert not torch.isfinite(pair.A.grad).all()


def test_fp16_grad_scaler_skips_the_step_on_overflow():
    """fp16 autocast with GradScaler: an Inf in one LoRA layer's fp16 output gradient makes the
    adjusted gradients non-finite, so the scaler skips the step and halves its scale."""
    model = tiny_lora_llama(random_b=True)
    lorapro.attach(model)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(model, opt, steps=2, accumulation=2, scaler=scaler)  # finite: steps taken
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()
    poison_one_layer(model, float("inf"))
    train(model, opt, steps=1, accumulation=2, scaler=scaler)
    assert scaler.get_scale() == scale / 2  # overflow seen
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- precision, checkpointing, compile, QLoRA ----------------------------------------------------


def test_bf16_parameters_get_bf16_gradients_computed_in_float32():
    raw = tiny_lora_llama(random_b=True).to(torch.bfloat16)
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    lm_loss(raw, pattern_tokens(4)).backward()
    lm_loss(model, pattern_tokens(4)).backward()
    got = lora_grads(model)
    for pair in lorapro.find_lora_pairs(raw):
        gA, gB = lorapro.optimal_gradients(
            pair.A.detach().double(), pair.B.detach().double(), pair.A.grad.double(), pair.B.grad.double(),
            pair.scaling,
        )  # fmt: skip
        expected = {f"{pair.name}.lora_A.default.weight": gA, f"{pair.name}.lora_B.default.weight": gB}
        for name, value in expected.items():
            assert got[name].dtype == torch.bfloat16
            # bf16 has 8 bits: B's X comes from B^T gB, equal to gA A^T up to bf16 rounding
            err = (got[name].double() - value).norm() / value.norm()
            assert err < 0.05, (name, err)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    plain = tiny_lora_llama(random_b=True).double()
    model = copy.deepcopy(plain)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    for m in (plain, model):
        lorapro.attach(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm_loss(m, pattern_tokens(4)).backward()
    want, got = lora_grads(plain), lora_grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    """A compiled model: dynamo and AOT autograd (aot_eager), and the default inductor backend,
    which generates C++ for the CPU (a few seconds here)."""
    raw = mixed_model()
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    compiled = torch.compile(model, backend=backend, fullgraph=backend == "aot_eager")  # no graph break
    ids, image = mixed_inputs()
    for _ in range(2):  # the second call runs the cached graph
        for m in (raw, model):
            m.zero_grad()
        raw(ids, image).square().sum().backward()
        compiled(ids, image).square().sum().backward()
        assert_adjusted(model, raw, rtol=1e-9)


def test_qlora_4bit_base_layers():
    bnb = pytest.importorskip("bitsandbytes")

    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = bnb.nn.Linear4bit(16, 32, quant_type="nf4", compute_dtype=torch.float32)
            self.down = bnb.nn.Linear4bit(32, 4, quant_type="nf4", compute_dtype=torch.float32)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    base = Quantised()
    base.up.weight = bnb.nn.Params4bit(torch.randn(32, 16) * 0.2, requires_grad=False, quant_type="nf4")
    base.down.weight = bnb.nn.Params4bit(torch.randn(4, 32) * 0.2, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")
    raw = get_peft_model(base, LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False))
    assert isinstance(raw.base_model.model.up.base_layer, bnb.nn.Linear4bit)
    model = copy.deepcopy(raw)
    lorapro.attach(model)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    raw(x).square().sum().backward()
    model(x).square().sum().backward()
    assert_adjusted(model, raw, rtol=1e-4)  # float32
