"""Tests of lorapro.pairs: finding PEFT's LoRA (A, B) factors by module.

Every model is built here from a tiny config (no download) and wrapped with PEFT. Expected values
come from PEFT itself (module names, ``get_delta_weight``, ``merge_and_unload``, the layer's own
``lora_A`` / ``lora_B`` parameters) or from autograd on the base weight, never from lorapro.
``init_lora_weights=False`` gives a random, non-zero B so that the products are not trivially 0.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import peft
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from torch import nn

import lorapro
from lorapro import LoRAPair, LoRAProConfigError, find_lora_pairs

PREFIX = "base_model.model."
BERT_TARGETS = ("query", "key", "value", "dense")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("single_thread")


# -- model builders ---------------------------------------------------------------------------------
def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k_proj / v_proj are (16, 32): not square
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


class ConvNet(nn.Module):
    """3x3 and 1x1 Conv2d, a Conv1d with kernel 3, and a grouped conv that is only targeted on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv1 = nn.Conv2d(5, 4, 1)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.tanh(self.conv3(x)))
        y = self.grouped(y)
        return self.conv1d(y.flatten(2))


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def wrap(model: nn.Module, **kwargs) -> peft.PeftModel:
    kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def by_name(pairs: list[LoRAPair]) -> dict[str, LoRAPair]:
    out = {p.name: p for p in pairs}
    assert len(out) == len(pairs), "a layer appears in more than one pair"
    return out


def peft_factors(pair: LoRAPair) -> tuple[nn.Parameter, nn.Parameter]:
    """The layer's own A and B parameters for the pair's adapter, looked up through PEFT's attributes."""
    layer, adapter = pair.layer, pair.adapter
    if pair.kind == "embedding":
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def delta_as_base(pair: LoRAPair) -> torch.Tensor:
    """s * B @ A from lorapro's matrix views, put back into the layout of the base weight."""
    delta = pair.scaling * pair.matrix_B() @ pair.matrix_A()
    if pair.kind == "embedding":
        return delta.T  # the embedding table is (num_embeddings, dim) = W.T
    return delta.reshape(pair.base_weight.shape)


def grad_as_matrix(pair: LoRAPair, grad: torch.Tensor) -> torch.Tensor:
    """The (m, n) gradient of W from the gradient of the base weight (same layout as delta_as_base)."""
    if pair.kind == "embedding":
        return grad.T
    return grad.reshape(grad.shape[0], -1)


def assert_gradient_relation(model: nn.Module, pairs: list[LoRAPair], run) -> None:
    """LoRA's gradients must be gA = s B^T g and gB = s g A^T in the matrix views, g the full gradient.

    The gradient of W = W0 + delta equals the gradient of W0, so autograd on the base weight gives g.
    """
    for pair in pairs:
        pair.base_weight.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    run().backward()
    for pair in pairs:
        g = grad_as_matrix(pair, pair.base_weight.grad)
        A, B, s = pair.matrix_A(), pair.matrix_B(), pair.scaling
        assert g.shape == (B.shape[0], A.shape[1]), pair.name
        torch.testing.assert_close(pair.matrix_A(pair.A.grad), s * B.T @ g, msg=pair.name)
        torch.testing.assert_close(pair.matrix_B(pair.B.grad), s * g @ A.T, msg=pair.name)


def assert_pairs_match_peft(model: nn.Module, pairs: list[LoRAPair], adapter: str = "default") -> None:
    modules = dict(model.named_modules())
    for pair in pairs:
        assert pair.adapter == adapter
        assert modules[pair.name] is pair.layer
        A, B = peft_factors(pair)
        assert pair.A is A and pair.B is B, pair.name
        assert pair.base_weight is pair.layer.get_base_layer().weight


# -- Linear (BERT-like) ------------------------------------------------------------------------------
def test_bert_linear_pairs_names_shapes_and_orientation():
    base = tiny_bert()
    targeted = {
        PREFIX + name
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in BERT_TARGETS
    }
    assert len(targeted) == 2 * 6 + 1  # q, k, v + 3 dense per layer + pooler.dense
    r, alpha = 4, 12  # s = 3
    model = wrap(
        base, r=r, lora_alpha=alpha, target_modules=list(BERT_TARGETS), modules_to_save=["classifier"]
    )
    model.double()
    pairs = find_lora_pairs(model)

    assert [p.name for p in pairs] == [n for n in lora_layers(model)]  # module order, each once
    assert set(by_name(pairs)) == targeted
    assert_pairs_match_peft(model, pairs)
    merged = copy.deepcopy(model).merge_and_unload()
    merged_modules = dict(merged.named_modules())
    for pair in pairs:
        assert pair.kind == "linear"
        assert pair.scaling == alpha / r
        assert pair.rank == r
        out_f, in_f = pair.base_weight.shape
        assert pair.matrix_A().shape == (r, in_f)
        assert pair.matrix_B().shape == (out_f, r)
        delta = delta_as_base(pair)
        torch.testing.assert_close(delta, pair.layer.get_delta_weight("default"))
        merged_weight = merged_modules[pair.name.removeprefix(PREFIX)].weight
        torch.testing.assert_close(pair.base_weight + delta, merged_weight)
        assert delta.abs().max() > 1e-3  # the check above is not vacuous


def test_bert_classifier_head_and_biases_are_not_in_any_pair():
    model = wrap(
        tiny_bert(), r=4, lora_alpha=8, target_modules=list(BERT_TARGETS), modules_to_save=["classifier"]
    )
    pairs = find_lora_pairs(model)
    in_pairs = {id(t) for p in pairs for t in (p.A, p.B)}
    name_of = {id(param): name for name, param in model.named_parameters()}
    assert len(in_pairs) == 2 * len(pairs)
    for pair in pairs:
        assert name_of[id(pair.A)] == f"{pair.name}.lora_A.default.weight"
        assert name_of[id(pair.B)] == f"{pair.name}.lora_B.default.weight"
    classifier = [n for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert classifier  # the head is trainable (modules_to_save) ...
    biases = [n for n in name_of.values() if n.endswith("bias")]
    assert biases
    for param in model.parameters():
        name = name_of[id(param)]
        if "classifier" in name or name.endswith("bias") or "lora_" not in name:
            assert id(param) not in in_pairs, name  # ... but no pair holds it, nor any bias


def test_bert_gradients_match_the_matrix_view():
    model = wrap(tiny_bert(), r=3, lora_alpha=7, target_modules=list(BERT_TARGETS))
    model.double()
    pairs = find_lora_pairs(model)
    ids = torch.randint(0, 100, (2, 5))
    assert_gradient_relation(model, pairs, lambda: model(input_ids=ids).logits.square().sum())


# -- Linear (Llama-like) -----------------------------------------------------------------------------
def test_llama_all_projections():
    r, alpha = 4, 8
    model = wrap(tiny_llama(), r=r, lora_alpha=alpha, target_modules=list(LLAMA_TARGETS))
    model.double()
    pairs = find_lora_pairs(model)
    assert len(pairs) == 2 * len(LLAMA_TARGETS)
    assert_pairs_match_peft(model, pairs)
    for i in range(2):
        found = {p.name.split(".")[-1] for p in pairs if f".layers.{i}." in p.name}
        assert found == set(LLAMA_TARGETS)
    shapes = {p.name.split(".")[-1]: tuple(p.base_weight.shape) for p in pairs}
    assert shapes["k_proj"] == (16, 32) and shapes["down_proj"] == (32, 48)
    for pair in pairs:
        assert pair.kind == "linear"
        out_f, in_f = pair.base_weight.shape
        assert pair.matrix_A().shape == (r, in_f) and pair.matrix_B().shape == (out_f, r)
        torch.testing.assert_close(delta_as_base(pair), pair.layer.get_delta_weight("default"))
    ids = torch.randint(0, 64, (2, 6))
    assert_gradient_relation(model, pairs, lambda: model(input_ids=ids).logits.square().sum())


def test_gpt2_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores W0 as (in, out); LoRA's A / B are still (r, in) / (out, r)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wrap(transformers.GPT2LMHeadModel(config), r=2, lora_alpha=4, target_modules=["c_attn"])
    model.double()
    (pair,) = find_lora_pairs(model)
    assert pair.kind == "linear"
    assert pair.base_weight.shape == (32, 96)
    assert pair.matrix_A().shape == (2, 32) and pair.matrix_B().shape == (96, 2)
    delta = pair.scaling * pair.matrix_B() @ pair.matrix_A()  # (out, in)
    torch.testing.assert_close(delta.T, pair.layer.get_delta_weight("default"))  # PEFT gives it as (in, out)
    # Here the base weight is W0.T, so the (out, in) gradient is its gradient transposed.
    pair.base_weight.requires_grad_(True)
    ids = torch.randint(0, 50, (2, 5))
    model(input_ids=ids).logits.square().sum().backward()
    g = pair.base_weight.grad.T
    torch.testing.assert_close(pair.A.grad, pair.scaling * pair.B.T @ g)
    torch.testing.assert_close(pair.B.grad, pair.scaling * g @ pair.A.T)


# -- Conv --------------------------------------------------------------------------------------------
def test_conv_pairs_flatten_kernel_and_match_peft_delta():
    r, alpha = 2, 5
    model = wrap(ConvNet(), r=r, lora_alpha=alpha, target_modules=["conv3", "conv1", "conv1d"])
    model.double()
    pairs = by_name(find_lora_pairs(model))
    assert set(pairs) == {PREFIX + n for n in ("conv3", "conv1", "conv1d")}
    assert_pairs_match_peft(model, list(pairs.values()))
    expected_n = {"conv3": 3 * 9, "conv1": 5, "conv1d": 4 * 3}
    merged = dict(copy.deepcopy(model).merge_and_unload().named_modules())
    for short, n in expected_n.items():
        pair = pairs[PREFIX + short]
        assert pair.kind == "conv"
        out_c = pair.base_weight.shape[0]
        assert pair.matrix_A().shape == (r, n)
        assert pair.matrix_B().shape == (out_c, r)
        assert pair.scaling == alpha / r
        delta = delta_as_base(pair)
        torch.testing.assert_close(delta, pair.layer.get_delta_weight("default"))
        torch.testing.assert_close(pair.base_weight + delta, merged[short].weight)
        # matrix views also apply to tensors shaped like A / B (their gradients)
        t = torch.randn_like(pair.A)
        assert torch.equal(pair.matrix_A(t), t.reshape(r, n))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert_gradient_relation(model, list(pairs.values()), lambda: model(x).square().sum())


def test_grouped_conv_raises_mentioning_groups():
    model = wrap(ConvNet(), r=2, lora_alpha=4, target_modules=["conv3", "grouped"])
    with pytest.raises(LoRAProConfigError, match=r"groups=2") as info:
        find_lora_pairs(model)
    assert "grouped" in str(info.value)  # names the layer
    with pytest.raises(LoRAProConfigError, match="group"):
        lorapro.LoRAProAdamW(model, lr=1e-3)


def test_grouped_conv_with_both_factors_frozen_is_left_out():
    model = wrap(ConvNet(), r=2, lora_alpha=4, target_modules=["conv3", "grouped"])
    model.base_model.model.grouped.lora_A["default"].weight.requires_grad_(False)
    model.base_model.model.grouped.lora_B["default"].weight.requires_grad_(False)
    assert [p.name for p in find_lora_pairs(model)] == [PREFIX + "conv3"]


# -- Embedding ---------------------------------------------------------------------------------------
def test_embedding_pair_orientation():
    r, alpha = 3, 6
    model = wrap(EmbedNet(), r=r, lora_alpha=alpha, target_modules=["emb"])
    model.double()
    (pair,) = find_lora_pairs(model)
    assert pair.name == PREFIX + "emb"
    assert pair.kind == "embedding"
    assert_pairs_match_peft(model, [pair])
    assert pair.A.shape == (r, 10) and pair.B.shape == (6, r)
    assert pair.matrix_A().shape == (r, 10) and pair.matrix_B().shape == (6, r)
    assert pair.base_weight.shape == (10, 6)
    delta_table = (pair.scaling * pair.matrix_B() @ pair.matrix_A()).T
    torch.testing.assert_close(delta_table, pair.layer.get_delta_weight("default"))
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(pair.base_weight + delta_table, merged.emb.weight)
    ids = torch.tensor([[0, 3, 3, 9], [1, 2, 5, 7]])
    assert_gradient_relation(model, [pair], lambda: model(ids).square().sum())


# -- scaling -----------------------------------------------------------------------------------------
def test_rslora_scaling():
    r, alpha = 4, 6
    model = wrap(tiny_bert(), r=r, lora_alpha=alpha, target_modules=["query", "value"], use_rslora=True)
    pairs = find_lora_pairs(model)
    assert len(pairs) == 4
    for pair in pairs:
        assert pair.scaling == pytest.approx(alpha / math.sqrt(r))
        assert pair.scaling != pytest.approx(alpha / r)


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_give_per_layer_scaling(rslora):
    r, alpha = 4, 8
    model = wrap(
        tiny_bert(),
        r=r,
        lora_alpha=alpha,
        target_modules=["query", "value"],
        rank_pattern={"layer.0.attention.self.query": 2, "layer.1.attention.self.value": 1},
        alpha_pattern={"value": 10},
        use_rslora=rslora,
    )
    pairs = find_lora_pairs(model)
    assert len(pairs) == 4
    seen = set()
    for pair in pairs:
        r_l = 2 if pair.name.endswith("layer.0.attention.self.query") else r
        r_l = 1 if pair.name.endswith("layer.1.attention.self.value") else r_l
        alpha_l = 10 if pair.name.endswith("value") else alpha
        expected = alpha_l / (math.sqrt(r_l) if rslora else r_l)
        assert pair.rank == r_l and pair.matrix_A().shape[0] == r_l and pair.matrix_B().shape[1] == r_l
        assert pair.scaling == pytest.approx(expected), pair.name
        seen.add(round(pair.scaling, 9))
    assert len(seen) >= 3  # the scalings really differ between layers


def test_scaling_is_read_live_from_the_layer():
    r, alpha = 4, 8
    model = wrap(tiny_bert(), r=r, lora_alpha=alpha, target_modules=["query", "value"])
    pairs = find_lora_pairs(model)
    first, others = pairs[0], pairs[1:]
    assert first.scaling == 2.0

    first.layer.set_scale("default", 0.25)
    assert first.scaling == pytest.approx(0.25 * alpha / r)
    assert all(p.scaling == 2.0 for p in others)
    first.layer.scale_layer(3.0)
    assert first.scaling == pytest.approx(3 * 0.25 * alpha / r)
    first.layer.unscale_layer()
    assert first.scaling == 2.0
    first.layer.scaling["default"] = 7.5  # any change of the layer's dict is seen
    assert first.scaling == 7.5
    assert isinstance(first.scaling, float)

    # The optimizer holds the same pair objects, so it sees the change too.
    opt = lorapro.LoRAProAdamW(model, lr=1e-3)
    opt_pair = next(p for p in opt.pairs if p.layer is first.layer)
    first.layer.set_scale("default", 4.0)
    assert opt_pair.scaling == pytest.approx(4.0 * alpha / r)


# -- several adapters --------------------------------------------------------------------------------
def test_only_active_adapters_are_paired():
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["query"]))
    default_names = {p.name for p in find_lora_pairs(model)}
    assert len(default_names) == 4

    # Inactive, even when its factors are made trainable by hand: not paired.
    for name, param in model.named_parameters():
        if ".second." in name:
            param.requires_grad_(True)
    pairs = find_lora_pairs(model)
    assert {p.adapter for p in pairs} == {"default"}
    assert {p.name for p in pairs} == default_names

    model.base_model.set_adapter(["default", "second"])
    assert model.base_model.active_adapters == ["default", "second"]
    pairs = find_lora_pairs(model)
    assert len(pairs) == 4 + 2
    keyed = {(p.name, p.adapter): p for p in pairs}
    assert len(keyed) == len(pairs)
    second = [p for p in pairs if p.adapter == "second"]
    assert {p.name for p in second} == {n for n in default_names if n.endswith("query")}
    for pair in second:
        assert pair.A is pair.layer.lora_A["second"].weight and pair.B is pair.layer.lora_B["second"].weight
        assert pair.rank == 2 and pair.scaling == 1.0
        assert keyed[(pair.name, "default")].A is pair.layer.lora_A["default"].weight
    for pair in pairs:
        assert_pairs_match_peft(model, [pair], adapter=pair.adapter)

    model.set_adapter("second")
    pairs = find_lora_pairs(model)
    assert {p.adapter for p in pairs} == {"second"} and len(pairs) == 2


# -- unsupported set-ups -----------------------------------------------------------------------------
def test_dora_raises():
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True)
    with pytest.raises(LoRAProConfigError, match="DoRA"):
        find_lora_pairs(model)
    with pytest.raises(LoRAProConfigError, match="DoRA"):
        lorapro.LoRAProAdamW(model, lr=1e-3)


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_one_frozen_factor_is_kept_as_a_one_factor_pair(frozen):
    """With one factor frozen the pair is still trained (Theorem 2.1's one-factor optimum for the
    other factor), so it is found like any pair; the frozen flag is read live at each step."""
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"])
    name, layer = next(iter(lora_layers(model).items()))
    getattr(layer, f"lora_{frozen}")["default"].weight.requires_grad_(False)
    pairs = {p.name: p for p in find_lora_pairs(model)}
    assert list(pairs) == list(lora_layers(model))
    assert not getattr(pairs[name], frozen).requires_grad


def test_one_frozen_embedding_factor_is_kept():
    model = wrap(EmbedNet(), r=2, lora_alpha=4, target_modules=["emb"])
    model.base_model.model.emb.lora_embedding_B["default"].requires_grad_(False)
    (pair,) = find_lora_pairs(model)
    assert pair.kind == "embedding" and not pair.B.requires_grad


def test_both_factors_frozen_pair_is_omitted():
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"])
    layers = lora_layers(model)
    frozen_name, frozen_layer = next(iter(layers.items()))
    frozen_layer.lora_A["default"].weight.requires_grad_(False)
    frozen_layer.lora_B["default"].weight.requires_grad_(False)
    names = [p.name for p in find_lora_pairs(model)]
    assert names == [n for n in layers if n != frozen_name]

    for param in model.parameters():
        param.requires_grad_(False)
    assert find_lora_pairs(model) == []
    with pytest.raises(LoRAProConfigError, match="get_peft_model"):
        lorapro.LoRAProAdamW(model, lr=1e-3)


def test_dora_with_both_factors_frozen_is_left_out():
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True)
    for name, param in model.named_parameters():
        if re.search(r"lora_(A|B)\.default", name):
            param.requires_grad_(False)
    assert find_lora_pairs(model) == []


@pytest.mark.parametrize("make", [tiny_bert, ConvNet], ids=["bert", "convnet"])
def test_model_without_lora(make):
    model = make()
    assert find_lora_pairs(model) == []
    with pytest.raises(LoRAProConfigError, match="get_peft_model"):
        lorapro.LoRAProAdamW(model, lr=1e-3)


# -- found by module, not by parameter order ---------------------------------------------------------
def test_pairs_do_not_depend_on_parameter_order():
    """Register lora_B before lora_A in every other layer and add a second active adapter on some
    layers: the flat list of trainable parameters no longer alternates A, B, A, B."""
    model = wrap(tiny_bert(), r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["value"]))
    model.base_model.set_adapter(["default", "second"])
    layers = list(lora_layers(model).values())
    for layer in layers[::2]:
        layer._modules["lora_A"] = layer._modules.pop("lora_A")  # now after lora_B
    flat = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    kinds = [re.search(r"lora_(A|B)\.", name).group(1) for name in flat]
    assert kinds[:2] == ["B", "A"]  # the reordering took effect
    assert kinds != ["A", "B"] * (len(kinds) // 2)

    pairs = find_lora_pairs(model)
    assert len(pairs) == len(layers) + 2  # two value layers carry 'second'
    name_of = {id(param): name for name, param in model.named_parameters()}
    for pair in pairs:
        assert name_of[id(pair.A)] == f"{pair.name}.lora_A.{pair.adapter}.weight"
        assert name_of[id(pair.B)] == f"{pair.name}.lora_B.{pair.adapter}.weight"
        assert pair.A is pair.layer.lora_A[pair.adapter].weight
        assert pair.B is pair.layer.lora_B[pair.adapter].weight
        assert pair.A.shape[0] == pair.B.shape[1] == pair.rank
