"""The paths beside the documented ones: each gets LoRA-Pro or a LoRAProConfigError that names the fix.

One test (or one small group) per row of docs/reliability.md's table "Paths beside the documented
ones". Every expected gradient comes from tests/reference.py: numpy float64, written from the paper,
importing nothing of lorapro.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro
from lorapro import LoRAProAdamW, LoRAProConfigError, LoRAProSGD
from reference import full_mode_first_step, one_factor_brute_force, one_factor_grads, theorem_grads

pytestmark = pytest.mark.usefixtures("single_thread")


# -- models ----------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def lora_net(dtype=torch.float64, seed=0, r=3, adapters=("default",), **kwargs) -> nn.Module:
    """LoRA on two Linear layers, B random (away from PEFT's B = 0 start)."""
    torch.manual_seed(seed)
    net = Net().to(dtype)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["inp", "hidden"], init_lora_weights=False, **kwargs
    )
    model = get_peft_model(net, config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def data(seed=0, n=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, seed=0, dtype=torch.float64, penalty=0.0):
    x, y = data(seed, dtype=dtype)
    loss = F.cross_entropy(model(x), y)
    if penalty:
        loss = loss + penalty * sum((p**2).sum() for n, p in model.named_parameters() if "lora_" in n)
    return loss


def lora_layers(model) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer, adapter="default"):
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy().copy()  # a copy: the tensor may be updated later


def expected(model, raw_grads: dict[str, tuple], x_mode="sylvester", adapter="default"):
    """Theorem 2.1 (reference) for every LoRA layer of ``model``, from the given raw gradients."""
    out = {}
    for name, layer in lora_layers(model).items():
        A, B = factors(layer, adapter)
        gA, gB = raw_grads[name]
        out[name] = theorem_grads(np64(A), np64(B), np64(gA), np64(gB), float(layer.scaling[adapter]), x_mode)
    return out


def raw_gradients(model, adapter="default", **loss_kwargs) -> dict[str, tuple]:
    """LoRA's own gradients of a copy of ``model`` (never attached), one backward."""
    raw = copy.deepcopy(model)
    for p in raw.parameters():
        p.grad = None
    loss_of(raw, **loss_kwargs).backward()
    return {
        n: tuple(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in factors(layer, adapter))
        for n, layer in lora_layers(raw).items()
    }


def assert_close(got: torch.Tensor, want: np.ndarray, rtol: float, what: str = "") -> None:
    want_t = torch.from_numpy(want)
    scale = want_t.abs().max().item()
    torch.testing.assert_close(got.detach().to(torch.float64), want_t, rtol=rtol, atol=rtol * scale, msg=what)


def assert_attached_grads(model, want: dict, rtol=1e-9, adapter="default"):
    for name, layer in lora_layers(model).items():
        A, B = factors(layer, adapter)
        assert_close(A.grad, want[name][0], rtol, f"{name} A")
        assert_close(B.grad, want[name][1], rtol, f"{name} B")


def zero_grad(model):
    for p in model.parameters():
        p.grad = None


# -- 1. factors written through .data ------------------------------------------------------------------
def test_writes_through_data_never_leave_a_stale_cache():
    """A hand-written update loop (no torch.optim) and a loader that copies other weights in, both through
    .data: every backward after them still gives Theorem 2.1 for the factors as they are now."""
    model = lora_net()
    lorapro.attach(model)
    for step in range(3):
        want = expected(model, raw_gradients(model, seed=step))
        loss_of(model, seed=step).backward()
        assert_attached_grads(model, want)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-0.05)
        zero_grad(model)
    other = lora_net(seed=5)
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        if "lora_" in name:
            p.data.copy_(q.data)  # a custom checkpoint loader
    want = expected(model, raw_gradients(model, seed=9))
    loss_of(model, seed=9).backward()
    assert_attached_grads(model, want)


# -- 2. a factor frozen later --------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", ["A", "B"])
def test_factor_frozen_after_attach_gets_the_one_factor_optimum(frozen):
    model = lora_net()
    lorapro.attach(model)
    loss_of(model).backward()
    zero_grad(model)
    layer = lora_layers(model)["base_model.model.hidden"]
    A, B = factors(layer)
    (A if frozen == "A" else B).requires_grad_(False)
    raw = raw_gradients(model)
    loss_of(model).backward()
    gA, gB = raw["base_model.model.hidden"]
    s = float(layer.scaling["default"])
    want_A, want_B = one_factor_grads(np64(A), np64(B), np64(gA), np64(gB), s, frozen)
    if frozen == "A":
        assert A.grad is None
        assert_close(B.grad, want_B, 1e-9)
    else:
        assert B.grad is None
        assert_close(A.grad, want_A, 1e-9)
    # the other layer is still a two-factor pair
    other = lora_layers(model)["base_model.model.inp"]
    want = theorem_grads(
        *(np64(t) for t in (*factors(other), *raw["base_model.model.inp"])), 2.0, "sylvester"
    )
    assert_close(factors(other)[0].grad, want[0], 1e-9)


def test_one_factor_reference_is_the_least_squares_optimum():
    """The reference itself: the closed form equals the vectorised least-squares solution."""
    rng = np.random.default_rng(0)
    A, B, g = rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), rng.standard_normal((4, 5))
    s = 1.5
    gA_lora, gB_lora = s * B.T @ g, s * g @ A.T
    np.testing.assert_allclose(
        one_factor_grads(A, B, gA_lora, gB_lora, s, "A")[1],
        one_factor_brute_force(A, B, g, s, "A"),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        one_factor_grads(A, B, gA_lora, gB_lora, s, "B")[0],
        one_factor_brute_force(A, B, g, s, "B"),
        atol=1e-12,
    )


@pytest.mark.parametrize("frozen", ["A", "B"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_factor_frozen_after_building_the_optimizer_never_moves(frozen, optimizer):
    model = lora_net()
    lr = 0.05
    opt = LoRAProSGD(model, lr=lr) if optimizer == "sgd" else LoRAProAdamW(model, lr=lr)
    loss_of(model).backward()
    opt.step()
    opt.zero_grad()
    layer = lora_layers(model)["base_model.model.hidden"]
    A, B = factors(layer)
    frozen_factor, trained = (A, B) if frozen == "A" else (B, A)
    frozen_factor.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = raw_gradients(model)
    loss_of(model).backward()
    opt.step()
    assert torch.equal(frozen_factor, before[f"base_model.model.hidden.lora_{frozen}.default.weight"])
    if optimizer == "sgd":
        gA, gB = raw["base_model.model.hidden"]
        want = one_factor_grads(np64(A), np64(B), np64(gA), np64(gB), 2.0, frozen)[1 if frozen == "A" else 0]
        other = "B" if frozen == "A" else "A"
        moved = before[f"base_model.model.hidden.lora_{other}.default.weight"] - trained.detach()
        assert_close(moved, lr * want, 1e-9)
    else:
        assert not torch.equal(
            trained, before[f"base_model.model.hidden.lora_{'B' if frozen == 'A' else 'A'}.default.weight"]
        )


def test_one_frozen_factor_in_factored_mode_is_refused_before_anything_changes():
    model = lora_net()
    opt = LoRAProAdamW(model, lr=1e-3, mode="factored")
    factors(lora_layers(model)["base_model.model.hidden"])[0].requires_grad_(False)
    loss_of(model).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoRAProConfigError, match=r"frozen.*mode='factored'"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- 3. a loss term in the factors; bf16 autocast -----------------------------------------------------
def test_penalty_on_the_factors_is_refused_by_attach_before_the_step():
    """attach adjusts B before A's gradient exists, taking X's right-hand side from B^T gB; a loss term in
    the factors makes it differ from gA A^T, so attach refuses at optimizer.step(), before any change."""
    model = lora_net()
    lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of(model, penalty=1e-2).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoRAProConfigError, match=r"weight_decay.*LoRAProSGD.*x_mode='zero'"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_penalty_in_one_accumulated_micro_batch_is_refused_at_the_step():
    """The right-hand sides are summed over the micro-batches of a step: a penalty in any one of them
    (here the first of three) is seen at optimizer.step(), before any change."""
    model = lora_net()
    lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for micro_batch in range(3):
        loss_of(model, seed=micro_batch, penalty=1e-2 if micro_batch == 0 else 0.0).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoRAProConfigError, match="weight_decay"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_many_micro_batches_keep_the_penalty_visible_and_the_memory_bounded():
    """More backward passes between two steps than attach keeps right-hand sides for: the ones kept are
    folded into their sum, so memory stays bounded and a penalty in the first pass is still seen at the
    step; without the penalty the step goes through."""
    from lorapro.backward_hooks import RHS_KEPT

    passes = 2 * RHS_KEPT + 3
    for penalty in (1e-2, 0.0):
        model = lora_net()
        handle = lorapro.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for micro_batch in range(passes):
            loss_of(model, seed=micro_batch, penalty=penalty if micro_batch == 0 else 0.0).backward()
        kept = [len(t) for e in handle._entries.values() for t in (e.rhs_a, e.rhs_b)]
        assert 0 < max(kept) <= RHS_KEPT
        if penalty:
            with pytest.raises(LoRAProConfigError, match="weight_decay"):
                opt.step()
        else:
            opt.step()


def test_penalty_with_an_optimizer_outside_torch_optim_is_refused_at_the_next_backward():
    """A hand-written update (no torch.optim step, so no step pre-hook): the penalty is refused at the
    first backward pass after the factors moved, before that pass adjusts any gradient. Without the
    penalty the same loop runs and gives LoRA-Pro's gradients."""
    lr = 0.1

    def manual_step(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
                    p.grad = None

    model = lora_net()
    plain = copy.deepcopy(model)
    lorapro.attach(model)
    loss_of(model, penalty=1e-2).backward()
    manual_step(model)
    with pytest.raises(LoRAProConfigError, match=r"weight_decay.*this backward pass"):
        loss_of(model, seed=1).backward()

    lorapro.attach(plain)
    for step in range(2):
        loss_of(plain, seed=step).backward()
        if step == 0:
            manual_step(plain)
    raw = raw_gradients(plain, seed=1)
    assert_attached_grads(plain, expected(plain, raw))


def test_a_refused_backward_leaves_no_stale_cache_behind():
    """A hand-written update through .data (no version counter moves) after a backward with a penalty:
    the next backward is refused before it adjusts anything. Run again without the penalty, the
    gradients are Theorem 2.1 for the factors as they are now: the refused pass validated nothing."""
    model = lora_net()
    lorapro.attach(model)
    loss_of(model, penalty=1e-2).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-0.1)
    zero_grad(model)
    with pytest.raises(LoRAProConfigError, match=r"weight_decay.*this backward pass"):
        loss_of(model, seed=1).backward()
    zero_grad(model)
    want = expected(model, raw_gradients(model, seed=2))
    loss_of(model, seed=2).backward()
    assert_attached_grads(model, want)


def test_penalty_on_the_factors_with_x_zero_or_an_optimizer_is_lora_pro():
    """X = 0 needs no right-hand side, so attach is exact; the optimizers see both gradients."""
    model = lora_net()
    raw = raw_gradients(model, penalty=1e-2)
    attached = copy.deepcopy(model)
    lorapro.attach(attached, x_mode="zero")
    loss_of(attached, penalty=1e-2).backward()
    assert_attached_grads(attached, expected(model, raw, "zero"))
    torch.optim.SGD(attached.parameters(), lr=0.1).step()  # no refusal: nothing depends on X

    lr = 0.1
    opt = LoRAProSGD(model, lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = expected(model, raw)
    loss_of(model, penalty=1e-2).backward()
    opt.step()
    for name, layer in lora_layers(model).items():
        for i, p in enumerate(factors(layer)):
            key = f"{name}.lora_{'AB'[i]}.default.weight"
            assert_close(before[key] - p.detach(), lr * want[name][i], 1e-9, key)


def test_bf16_autocast_warns_once_and_is_within_bf16_precision():
    """Under bf16 autocast LoRA's gradients carry bf16 rounding, so gA A^T and B^T gB differ in their last
    bits: A's adjusted gradient is Theorem 2.1 on the gradients it gets to float32 precision, B's to bf16
    precision, and attach says so once."""
    model = lora_net(dtype=torch.float32)
    raw = copy.deepcopy(model)
    lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            for m in (raw, model):
                zero_grad(m)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_of(m, seed=step, dtype=torch.float32)
                loss.backward()
            grads.append(
                {n: tuple(p.grad.clone() for p in factors(layer)) for n, layer in lora_layers(raw).items()}
            )
            opt.step()
    precision = [w for w in caught if issubclass(w.category, lorapro.LoRAProWarning)]
    assert len(precision) == 1, [str(w.message) for w in caught]
    assert "bfloat16" in str(precision[0].message)
    want = expected(model, grads[-1])
    for name, layer in lora_layers(model).items():
        A, B = factors(layer)
        assert_close(A.grad, want[name][0], 1e-5, f"{name} A")
        assert_close(B.grad, want[name][1], 2**-6, f"{name} B")


# -- 4. MoE experts (PEFT target_parameters on a 3-D expert weight) --------------------------------------
class Experts(nn.Module):
    """E experts stored as one (E, out, in) parameter, every token sent to every expert, weighted."""

    def __init__(self, experts=3, d_in=6, d_out=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_out, d_in) / d_in**0.5)

    def forward(self, x):  # (tokens, d_in) -> (tokens, d_out)
        per_expert = torch.einsum("ti,eoi->teo", x, self.weight)
        gate = torch.softmax(x[:, : self.weight.shape[0]], dim=-1)
        return (per_expert * gate[..., None]).sum(1)


class MoENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.experts(x)))


def moe_model(seed=0, r=2):
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_parameters=["experts.weight"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(MoENet().double(), config)
    return model.double()


def expert_slices(layer, tensor_A, tensor_B):
    """PEFT's layout (peft.tuners.lora.ParamWrapper.get_delta_weight): A's rows grouped by expert, B's
    columns interleaved by expert."""
    E = layer.num_experts
    A = tensor_A.reshape(E, -1, tensor_A.shape[-1])
    B = tensor_B.reshape(tensor_B.shape[0], -1, E).permute(2, 0, 1)
    return A, B


def test_expert_slices_are_peft_layout():
    model = moe_model()
    (layer,) = lora_layers(model).values()
    A, B = expert_slices(layer, *factors(layer))
    delta = layer.get_delta_weight("default")
    for e in range(layer.num_experts):
        product = float(layer.scaling["default"]) * B[e] @ A[e]
        assert torch.allclose(delta[e], product) or torch.allclose(delta[e], product.T)


def per_expert_reference(layer, raw_A, raw_B, x_mode="sylvester"):
    A, B = expert_slices(layer, *factors(layer))
    gA, gB = expert_slices(layer, raw_A, raw_B)
    s = float(layer.scaling["default"])
    pairs = [
        theorem_grads(np64(A[e]), np64(B[e]), np64(gA[e]), np64(gB[e]), s, x_mode) for e in range(len(A))
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def moe_loss(model, seed=0):
    x, y = data(seed)
    return F.cross_entropy(model(x), y)


def raw_moe_grads(model, seed=0):
    raw = copy.deepcopy(model)
    moe_loss(raw, seed).backward()
    (layer,) = lora_layers(raw).values()
    return tuple(p.grad.clone() for p in factors(layer))


def test_moe_experts_attach_is_lora_pro_per_expert():
    model = moe_model()
    raw_A, raw_B = raw_moe_grads(model)
    lorapro.attach(model)
    moe_loss(model).backward()
    (layer,) = lora_layers(model).values()
    want_A, want_B = per_expert_reference(layer, raw_A, raw_B)
    got_A, got_B = expert_slices(layer, *(p.grad for p in factors(layer)))
    assert_close(got_A, want_A, 1e-9, "A")
    assert_close(got_B, want_B, 1e-9, "B")


def test_moe_experts_right_hand_sides_are_checked_per_expert():
    """The right-hand-side check on expert pairs: LoRA's gradients step (over two accumulated
    micro-batches); a penalty on the factors is refused at the step, nothing modified."""
    model = moe_model()
    lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(2):
        moe_loss(model, seed).backward()
    opt.step()  # no refusal: R and S agree expert by expert
    opt.zero_grad()
    (layer,) = lora_layers(model).values()
    penalty = 1e-2 * sum((p**2).sum() for p in factors(layer))
    (moe_loss(model) + penalty).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoRAProConfigError, match="weight_decay"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_moe_experts_efficient_and_full_mode_are_lora_pro_per_expert():
    lr = 0.01
    for mode in ("sgd", "full"):
        model = moe_model()
        raw_A, raw_B = raw_moe_grads(model)
        (layer,) = lora_layers(model).values()
        A, B = expert_slices(layer, *factors(layer))
        A0, B0 = np64(A), np64(B)
        opt = LoRAProSGD(model, lr=lr) if mode == "sgd" else LoRAProAdamW(model, lr=lr, mode="full")
        moe_loss(model).backward()
        opt.step()
        A1, B1 = expert_slices(layer, *factors(layer))
        gA, gB = expert_slices(layer, raw_A, raw_B)
        s = float(layer.scaling["default"])
        for e in range(layer.num_experts):
            if mode == "sgd":
                uA, uB = theorem_grads(A0[e], B0[e], np64(gA[e]), np64(gB[e]), s, "sylvester")
                want_A, want_B = A0[e] - lr * uA, B0[e] - lr * uB
            else:
                want_A, want_B = full_mode_first_step(A0[e], B0[e], np64(gA[e]), np64(gB[e]), s, lr)
            assert_close(A1[e], want_A, 1e-9, f"{mode} A[{e}]")
            assert_close(B1[e], want_B, 1e-9, f"{mode} B[{e}]")


def test_moe_experts_in_factored_mode_are_refused():
    model = moe_model()
    opt = LoRAProAdamW(model, lr=1e-3, mode="factored")
    moe_loss(model).backward()
    with pytest.raises(LoRAProConfigError, match=r"experts.*mode='factored'"):
        opt.step()


def tiny_mixtral_with_expert_lora(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    config._experts_implementation = "eager"  # the grouped-mm kernels take no float64
    base = MixtralForCausalLM(config).double()
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, lora).double()


def test_moe_experts_of_a_transformers_model_attach_per_expert():
    """A tiny random Mixtral (Transformers 5 stores its experts as 3-D parameters), LoRA on q_proj and on
    the expert weights through target_parameters: each expert's pair gets its own Theorem 2.1."""
    model = tiny_mixtral_with_expert_lora()
    tokens = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    raw = copy.deepcopy(model)
    raw(input_ids=tokens, labels=tokens).loss.backward()
    lorapro.attach(model)
    model(input_ids=tokens, labels=tokens).loss.backward()
    raw_layers = lora_layers(raw)
    experts_seen = 0
    for name, layer in lora_layers(model).items():
        raw_A, raw_B = (p.grad for p in factors(raw_layers[name]))
        got_A, got_B = (p.grad for p in factors(layer))
        if getattr(layer, "num_experts", 1) > 1:
            experts_seen += 1
            want_A, want_B = per_expert_reference(layer, raw_A, raw_B)
            got_A, got_B = expert_slices(layer, got_A, got_B)
        else:
            A, B = factors(layer)
            want_A, want_B = theorem_grads(
                np64(A), np64(B), np64(raw_A), np64(raw_B), float(layer.scaling["default"]), "sylvester"
            )
        assert_close(got_A, want_A, 1e-8, f"{name} A")
        assert_close(got_B, want_B, 1e-8, f"{name} B")
    assert experts_seen == 4  # gate_up_proj and down_proj in each of 2 layers


# -- 5. copies and saving -------------------------------------------------------------------------------
def test_deepcopy_of_an_attached_model_is_plain_and_never_touches_the_original():
    model = lora_net(adapters=("default", "other"))
    handle = lorapro.attach(model)
    ema = copy.deepcopy(model)
    raw = raw_gradients(ema)
    loss_of(ema).backward()
    for name, layer in lora_layers(ema).items():
        for p, g in zip(factors(layer), raw[name], strict=True):
            assert torch.equal(p.grad, g), name  # plain LoRA gradients: the copy is not attached
    handle.remove()
    ema.set_adapter("other")
    model.set_adapter("other")
    loss_of(ema).backward()  # must not re-hook the original model
    opt = LoRAProAdamW(model, lr=1e-3)  # accepted: nothing adjusts the original's gradients any more
    raw = raw_gradients(model, adapter="other")
    loss_of(model).backward()
    for name, layer in lora_layers(model).items():
        for p, g in zip(factors(layer, "other"), raw[name], strict=True):
            assert torch.equal(p.grad, g), name
    opt.step()
    lorapro.attach(ema)  # a copy is attached like any model


def test_torch_save_of_an_attached_model_loads_plain():
    model = lora_net()
    lorapro.attach(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    raw = raw_gradients(loaded)
    loss_of(loaded).backward()
    for name, layer in lora_layers(loaded).items():
        for p, g in zip(factors(layer), raw[name], strict=True):
            assert torch.equal(p.grad, g), name


# -- 6. extreme scales -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scale_A", "scale_B"), [(1e-10, 1e-10), (1e-20, 1e20), (1e15, 1e-15)])
def test_rescaled_factors_give_the_float64_answer_to_float32_precision(scale_A, scale_B):
    """B A is unchanged by A -> cA, B -> B/c, and so is the equivalent gradient; the Gram matrices then span
    up to 1e+-40. attach and the optimizers give the float64 answer for the float32 factors and gradients."""
    model = lora_net(dtype=torch.float32, seed=2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            A, B = factors(layer)
            A.mul_(scale_A)
            B.mul_(scale_B)
    raw = raw_gradients(model, dtype=torch.float32)
    want = expected(model, raw)
    attached = copy.deepcopy(model)
    lorapro.attach(attached)
    loss_of(attached, dtype=torch.float32).backward()
    assert_attached_grads(attached, want, rtol=1e-4)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LoRAProSGD(model, lr=1.0)  # the step is the adjusted gradient itself
    loss_of(model, dtype=torch.float32).backward()
    opt.step()
    for name, layer in lora_layers(model).items():
        for i, p in enumerate(factors(layer)):
            key = f"{name}.lora_{'AB'[i]}.default.weight"
            assert_close(before[key] - p.detach(), want[name][i], 1e-3, key)


# -- 7. forwards that bypass the wrapper -----------------------------------------------------------------
def test_forward_through_the_base_model_after_set_adapter_follows_the_adapter():
    model = lora_net(adapters=("default", "other"))
    plain = copy.deepcopy(model)  # copied before attaching
    lorapro.attach(model)
    loss_of(model).backward()
    zero_grad(model)
    for m in (model, plain):
        m.set_adapter("other")
    base = model.get_base_model()
    want = expected(model, raw_gradients(plain, adapter="other"), adapter="other")
    x, y = data()
    F.cross_entropy(base(x), y).backward()
    assert_attached_grads(model, want, adapter="other")


def assert_refused_at_the_step_then_synced(model, handle, opt, layer, x, adapter="default", *, match):
    """A LoRA layer called directly trains factors no hook sits on: optimizer.step() refuses, before
    changing anything; after handle.sync() the same batch gives Theorem 2.1's gradients."""
    layer(x).square().sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoRAProConfigError, match=match):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.zero_grad()
    raw_layer = copy.deepcopy(layer)  # a copy is never attached: LoRA's own gradients
    raw_layer(x).square().sum().backward()
    raw_A, raw_B = (p.grad for p in factors(raw_layer, adapter))
    handle.sync()
    A, B = factors(layer, adapter)
    layer(x).square().sum().backward()
    want = theorem_grads(
        np64(A), np64(B), np64(raw_A), np64(raw_B), float(layer.scaling[adapter]), "sylvester"
    )
    assert_close(A.grad, want[0], 1e-9)
    assert_close(B.grad, want[1], 1e-9)


def test_adapter_added_after_attach_and_used_only_through_a_layer_is_refused_at_the_step():
    """An adapter added after attach, made active, and trained through something other than the attached
    model (here a LoRA layer called directly): its factors were never hooked, so attach cannot adjust them;
    optimizer.step() says so, before changing anything, and handle.sync() fixes it."""
    model = lora_net()
    handle = lorapro.attach(model)
    model.add_adapter(
        "late", LoraConfig(r=2, lora_alpha=4, target_modules=["inp", "hidden"], init_lora_weights=False)
    )
    model.double()
    model.set_adapter("late")
    layer = lora_layers(model)["base_model.model.hidden"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_refused_at_the_step_then_synced(model, handle, opt, layer, x, "late", match=r"handle\.sync\(\)")


def test_factor_frozen_at_attach_and_unfrozen_later_is_hooked_then():
    """torch hooks only tensors that require grad: a factor frozen when attached is hooked at the first
    forward pass after it is unfrozen, and gets Theorem 2.1's two-factor gradient from then on."""
    model = lora_net()
    layer = lora_layers(model)["base_model.model.hidden"]
    A = factors(layer)[0]
    A.requires_grad_(False)
    lorapro.attach(model)
    loss_of(model).backward()
    assert A.grad is None
    zero_grad(model)
    A.requires_grad_(True)
    want = expected(model, raw_gradients(model))
    loss_of(model).backward()
    assert_attached_grads(model, want)


def test_a_hook_that_changes_the_factors_gradients_is_refused_like_a_penalty():
    """A user's own gradient hook registered before attach (here: scaling A's gradient) hands attach
    gradients that are not LoRA's own; the step is refused, as for a penalty."""
    model = lora_net()
    for layer in lora_layers(model).values():
        factors(layer)[0].register_hook(lambda g: 0.5 * g)
    lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of(model).backward()
    with pytest.raises(LoRAProConfigError, match="hook that changes their gradients"):
        opt.step()


def test_factor_unfrozen_and_trained_only_through_a_layer_is_refused_at_the_step():
    """A factor frozen when attached and held by the optimizer, unfrozen later and trained through a LoRA
    layer called directly (no forward pass through the attached model hooks it): its gradient is LoRA's
    own, and its partner's was adjusted as if it stayed frozen, so optimizer.step() refuses, before changing
    anything; after handle.sync() both gradients are Theorem 2.1's."""
    model = lora_net()
    layer = lora_layers(model)["base_model.model.hidden"]
    A = factors(layer)[0]
    A.requires_grad_(False)
    handle = lorapro.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the frozen A too
    loss_of(model).backward()
    opt.step()  # a first step: the optimizer's factors are looked at here
    opt.zero_grad()
    A.requires_grad_(True)
    x = torch.randn(4, 8, dtype=A.dtype)
    refusal = r"never hooked.*handle\.sync\(\)"
    assert_refused_at_the_step_then_synced(model, handle, opt, layer, x, match=refusal)
