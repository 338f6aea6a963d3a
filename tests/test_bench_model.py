"""`lorapro bench` on the user's model folder and device: --model, --target-modules, --device,
--dtype, --grad-accum, --max-steps (tiny random models built in the test; CPU only)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench_runs import quick_bench_argv as _bench
from bench_tiny import TinyTask
from lorapro.bench.harness import BenchConfig, BenchConfigError, _runtime_key, resolve_device, run_benchmark
from lorapro.bench.train import TrainConfig, train_and_evaluate
from lorapro.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.fixture
def csv_file(tmp_path):
    words = {0: ["dull", "boring", "awful", "bad"], 1: ["great", "lovely", "superb", "good"]}
    rows = [f"a {words[i % 2][i % 4]} film number {i % 20},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- --model


def test_text_csv_on_a_model_folder_end_to_end(tmp_path, llama_dir, csv_file, capsys):
    out = tmp_path / "out"
    argv = _bench("--task", f"text-csv:{csv_file}", "--model", str(llama_dir), "--methods", "lora,lorapro",
                  "--lr-grid", "1e-3,1e-2", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "2",
                  "--out", str(out))  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_info"]["model"].startswith(f"{llama_dir.name} (--model {llama_dir})")
    device = resolve_device("auto")  # the CPU here; a GPU where torch sees one
    assert summary["config"]["model"] == str(llama_dir) and summary["environment"]["device"] == device
    for row in summary["methods"]:
        assert row["chosen_lr"] in (1e-3, 1e-2) and 0.0 <= row["test_mean"] <= 1.0
        assert all(math.isfinite(x) for x in row["final_train_loss"])
        # LoRA on the 7 projections of both layers (r=8), plus the new 2-class head in full.
        per_layer = 8 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
        assert row["trainable_params"] == 2 * per_layer + 2 * 32
    records = [json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")]
    assert len(records) == 4
    for record in records:
        assert record["result"]["steps"] == 3
        extra = record["result"]["extra"]
        assert extra["device"].startswith(device) and (extra["dtype"], extra["grad_accum"]) == ("float32", 2)
        on_gpu = {"device": "cuda"} if device == "cuda" else {}
        assert record["key"]["runtime"] == {"grad_accum": 2, "max_steps": 3, **on_gpu}
        assert record["key"]["task"]["model"]["path"] == str(llama_dir.resolve())
    assert "| lorapro |" in capsys.readouterr().out


def test_target_modules_select_by_name_suffix(tmp_path, llama_dir, csv_file):
    out = tmp_path / "out"
    argv = _bench("--task", f"text-csv:{csv_file}", "--model", str(llama_dir), "--methods", "lora",
                  "--lr-grid", "1e-3", "--max-steps", "1", "--rank", "4", "--out", str(out),
                  "--target-modules", "q_proj,layers.1.mlp.down_proj")  # fmt: skip
    assert main(argv) == 0
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")]
    assert record["key"]["target_modules"] == ["q_proj", "layers.1.mlp.down_proj"]
    # Two query projections and one down projection at rank 4, plus the head.
    assert record["result"]["trainable_params"] == 4 * (2 * (32 + 32) + (64 + 32)) + 2 * 32


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("qproj", r"'qproj' matches no module of LlamaForSequenceClassification; its linear layers end in "
                  r"q_proj, k_proj"),
        ("layers.0", r"'layers.0' names model.layers.0 \(LlamaDecoderLayer\), not a linear layer"),
    ],
)  # fmt: skip
def test_bad_target_modules_fail_before_anything_is_written(tmp_path, llama_dir, csv_file, capsys, targets,
                                                             message):  # fmt: skip
    out = tmp_path / "out"
    argv = _bench("--task", f"text-csv:{csv_file}", "--model", str(llama_dir), "--methods", "lora",
                  "--target-modules", targets, "--out", str(out))  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lorapro bench: error: --target-modules"), err
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing written, no empty folder left


def test_default_targets_are_what_the_bundled_models_use():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from lorapro.bench.models import encoder_linear_names
    from lorapro.bench.smollm2 import decoder_linear_names
    from lorapro.bench.targets import body_linear_names

    bert = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))  # fmt: skip
    assert body_linear_names(bert) == encoder_linear_names(bert)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1))  # fmt: skip
    assert body_linear_names(llama) == decoder_linear_names(llama)
    with pytest.raises(ValueError, match="--target-modules"):
        body_linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent", "does not exist"),
        (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is a file"),
        (lambda d: d, "has no config.json"),
    ],
)
def test_a_bad_model_folder_is_one_line(tmp_path, csv_file, capsys, make, message):
    folder = tmp_path / "model"
    folder.mkdir()
    out = tmp_path / "out"
    argv = _bench("--task", f"text-csv:{csv_file}", "--model", str(make(folder)), "--out", str(out))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorapro bench: error: --model") and message in err and "\n" not in err, err
    assert not out.exists()  # nothing written, no empty folder left


def test_model_folder_without_weights_or_tokenizer(tmp_path, llama_dir):
    import shutil

    from lorapro.bench.model_folder import ModelFolder, ModelFolderError

    folder = tmp_path / "copy"
    shutil.copytree(llama_dir, folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer files"):
        ModelFolder(folder).check()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"no weights \(\*\.safetensors"):
        ModelFolder(folder).check()


def test_model_identity_changes_with_new_weights(tmp_path, llama_dir):
    import os
    import shutil

    from lorapro.bench.model_folder import ModelFolder

    folder = tmp_path / "copy"
    shutil.copytree(llama_dir, folder)
    before = ModelFolder(folder).identity()
    assert ModelFolder(folder).identity() == before
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert ModelFolder(folder).identity() != before


def test_tasks_with_their_own_model_refuse_model(tmp_path, llama_dir, capsys):
    out = tmp_path / "out"
    assert main(_bench("--task", "gsm", "--model", str(llama_dir), "--out", str(out))) == 2
    assert "task gsm does not take --model" in capsys.readouterr().err


def test_diagnose_refuses_the_options_it_does_not_carry(tmp_path, llama_dir, capsys):
    argv = _bench("--task", "mr", "--model", str(llama_dir), "--diagnose", "--out", str(tmp_path / "o"))
    assert main(argv) == 2
    assert "--diagnose does not take --model yet" in capsys.readouterr().err


# --------------------------------------------------------------------------- device


@no_cuda
def test_device_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


@no_cuda
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_bench("--task", "mr", "--device", "cuda", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorapro bench: error: --device cuda:") and "--device cpu" in err, err
    assert "\n" not in err and not out.exists()
    with pytest.raises(BenchConfigError, match="--device cuda"):
        BenchConfig(device="cuda").validate()


def test_new_options_keep_the_hashes_of_earlier_runs():
    # Defaults add nothing to a run's key, so runs stored before these options existed are reused.
    assert _runtime_key(BenchConfig(), "cpu") == {}
    assert _runtime_key(BenchConfig(dtype="bfloat16", grad_accum=4, max_steps=9), "cuda") == {
        "runtime": {"device": "cuda", "dtype": "bfloat16", "grad_accum": 4, "max_steps": 9}
    }
    assert _runtime_key(BenchConfig(target_modules=("q_proj",)), "cpu") == {"target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"grad_accum": 0}, "--grad-accum"),
        ({"max_steps": 0}, "--max-steps"),
        ({"dtype": "float16"}, "--dtype"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_bad_runtime_options_name_the_option(kw, message):
    with pytest.raises(BenchConfigError, match=message):
        BenchConfig(**kw).validate()


def test_gradient_accumulation_matches_one_large_batch():
    from transformers import BertConfig, BertForSequenceClassification

    from lorapro.bench.tasks import TaskOptions

    prepared = TinyTask().prepare(TaskOptions())
    # No dropout: two micro-batches of 8 draw other masks than one batch of 16.
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    prepared.load_model = lambda: BertForSequenceClassification(config)
    whole = train_and_evaluate(
        "lora", prepared, TrainConfig(lr=1e-2, epochs=1, batch_size=16), progress=False
    )
    accumulated = train_and_evaluate(
        "lora", prepared, TrainConfig(lr=1e-2, epochs=1, batch_size=8), progress=False, grad_accum=2
    )
    assert accumulated.steps == whole.steps == 4
    assert accumulated.loss_curve == pytest.approx(whole.loss_curve, rel=1e-5)
    assert accumulated.validation == whole.validation


def test_max_steps_replaces_the_epochs(tmp_path):
    cfg = BenchConfig(task="tiny", methods=("lora",), seeds=1, lr_grid=(1e-3,), extend_grid=0,
                      out=str(tmp_path), train_size=16, batch_size=16, max_steps=3)  # fmt: skip
    result = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None)
    (run,) = result.all_runs
    assert run.steps == 3 and len(run.loss_curve) == 3  # one step per epoch: three epochs


def test_bfloat16_stores_frozen_weights_in_bf16_and_trains_in_float32():
    from lorapro.bench.tasks import TaskOptions

    prepared = TinyTask().prepare(TaskOptions())
    seen = {}

    def evaluate(model, split):
        seen[split] = (
            {p.dtype for p in model.parameters() if p.requires_grad},
            {p.dtype for p in model.parameters() if not p.requires_grad},
        )
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return {"accuracy": 0.5}

    prepared.evaluate = evaluate
    result = train_and_evaluate(
        "lorapro",
        prepared,
        TrainConfig(lr=1e-3, epochs=1, batch_size=16),
        progress=False,
        dtype=torch.bfloat16,
    )
    assert seen["validation"] == ({torch.float32}, {torch.bfloat16}) and seen["autocast"]
    assert all(math.isfinite(x) for x in result.loss_curve) and result.extra["dtype"] == "bfloat16"
