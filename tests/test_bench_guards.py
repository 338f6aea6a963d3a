"""What keeps a benchmark's verdict from misleading, and what a user sees before and while it runs:
test (and validation) examples that also occur in training are warned about and mark the verdict
as contaminated; labels the training split cannot teach are refused before training; the run plan
and a time estimate are printed before the runs; Ctrl-C says how many runs are stored and how to
resume; a single seed shows no ±."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import lorapro.bench.harness as harness
from bench_tiny import TinyTask
from lorapro.bench.data_checks import check_labels, split_overlap
from lorapro.bench.harness import BenchConfig, BenchConfigError, run_benchmark
from lorapro.bench.report import combined_table, load_summary
from lorapro.cli import main
from tiny_llama import save_tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(tmp_path, **kw):
    base = dict(
        task="tiny", methods=("lora", "lorapro"), seeds=1, lr_grid=(1e-2,), extend_grid=0, out=str(tmp_path),
    )  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


class ContaminatedTask(TinyTask):
    """The tiny task with its test split replaced by training examples (and 5 validation examples too)."""

    def prepare(self, options):
        prepared = super().prepare(options)
        train, val = prepared.train, prepared.validation
        test = dataclasses.replace(train, input_ids=train.input_ids[:32], labels=train.labels[:32])
        val = dataclasses.replace(
            val, input_ids=train.input_ids[:5] + val.input_ids[5:], labels=train.labels[:5] + val.labels[5:]
        )
        return dataclasses.replace(prepared, test=test, validation=val)


class ManyLabelsTask(TinyTask):
    """The tiny task whose data declare ``classes`` classes; ``unseen`` test examples get classes that
    never occur in training."""

    def __init__(self, classes: int, unseen: int = 0) -> None:
        super().__init__()
        self.classes, self.unseen = classes, unseen

    def prepare(self, options):
        prepared = super().prepare(options)
        test = prepared.test
        labels = [2 + i if i < self.unseen else y for i, y in enumerate(test.labels)]
        prepared.info["classes"] = [f"c{i}" for i in range(self.classes)]
        return dataclasses.replace(prepared, test=dataclasses.replace(test, labels=labels))


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(harness, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))


# --------------------------------------------------------------------------- overlap


def test_test_examples_seen_in_training_mark_the_verdict_contaminated(tmp_path):
    logs: list[str] = []
    run_benchmark(_config(tmp_path), task=ContaminatedTask(), progress=False, log=logs.append)
    # Warned on the console before anything trains, with the counts.
    first_run = next(i for i, line in enumerate(logs) if line.startswith("First run"))
    warnings = [line for line in logs[:first_run] if line.startswith("warning: ")]
    assert any("the test set is contaminated: 32 of 32 test examples also occur in the training" in w
               for w in warnings), warnings  # fmt: skip
    assert any("5 of 32 validation examples also occur in the training split" in w for w in warnings)
    # The verdict line says it, and every verdict cell.
    heading = next(line for line in logs if line.startswith("Verdict on test accuracy"))
    assert "NOT A MEASURE OF GENERALISATION: the test set is contaminated: 32 of 32" in heading
    table = next(line for line in logs if "\n| lorapro | lora |" in line)
    assert "(contaminated test set)" in table.split("| lorapro | lora |")[1].splitlines()[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overlap"] == {
        "validation": {"in_training": 5, "examples": 32},
        "test": {"in_training": 32, "examples": 32},
    }
    assert summary["verdict"]["test_set_contaminated"].startswith("the test set is contaminated: 32 of 32")
    assert any("contaminated" in w for w in summary["verdict"]["warnings"])
    md = (tmp_path / "results.md").read_text()
    assert "**Not a measure of generalisation: the test set is contaminated: 32 of 32" in md


def test_disjoint_splits_give_a_plain_verdict(tmp_path):
    logs: list[str] = []
    run_benchmark(_config(tmp_path), task=TinyTask(), progress=False, log=logs.append)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overlap"]["test"] == {"in_training": 0, "examples": 32}
    assert summary["verdict"]["test_set_contaminated"] is None
    assert "Verdict on test accuracy (95% intervals):" in logs
    assert not any("contaminated" in line for line in logs)


def test_an_eval_file_that_repeats_training_prompts_is_caught_end_to_end(tmp_path, capsys):
    # The user's case: a jsonl eval file whose prompts all occur in the training file.
    pairs = [(a, b) for a in range(5) for b in range(4)]
    train = [{"prompt": f"what is {a} plus {b} ?", "response": f"{a + b}"} for a, b in pairs]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in train[:8]) + "\n")
    model = save_tiny_llama(tmp_path / "llm")
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["bench", "--task", f"jsonl:{tmp_path / 'train.jsonl'}", "--eval-file",
            str(tmp_path / "eval.jsonl"), "--model", str(model), "--methods", "lora,lorapro",
            "--seeds", "1", "--lr-grid", "1e-3",
            "--extend-grid", "0", "--refine", "0", "--max-steps", "2", "--no-progress", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "warning: the test set is contaminated: 4 of 4 test examples also occur" in printed
    assert "4 of 4 validation examples also occur in the training split" in printed
    assert "NOT A MEASURE OF GENERALISATION" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overlap"]["test"] == {"in_training": 4, "examples": 4}


def test_overlap_is_counted_by_input_for_each_kind_of_split():
    from types import SimpleNamespace

    import torch

    texts = SimpleNamespace(train=SimpleNamespace(input_ids=[[1, 2], [3]]),
                            validation=SimpleNamespace(input_ids=[[9]]),
                            test=SimpleNamespace(input_ids=[[3], [1, 2], [1]]))  # fmt: skip
    assert split_overlap(texts) == {
        "validation": {"in_training": 0, "examples": 1},
        "test": {"in_training": 2, "examples": 3},
    }
    images = torch.arange(24.0).view(3, 1, 2, 4)
    pictures = SimpleNamespace(train=SimpleNamespace(images=images[:2]),
                               validation=SimpleNamespace(images=images[2:]),
                               test=SimpleNamespace(images=images[1:]))  # fmt: skip
    assert split_overlap(pictures)["test"] == {"in_training": 1, "examples": 2}
    prompts = SimpleNamespace(train=SimpleNamespace(prompts=[[5, 6]]), validation=SimpleNamespace(prompts=[]),
                              test=SimpleNamespace(prompts=[[5, 6], [5]]))  # fmt: skip
    assert split_overlap(prompts)["test"] == {"in_training": 1, "examples": 2}
    assert split_overlap(SimpleNamespace(train=[1], validation=[1], test=[1])) == {}


# --------------------------------------------------------------------------- labels


def test_fewer_training_examples_than_classes_is_refused_before_training(tmp_path, no_training):
    with pytest.raises(BenchConfigError) as refused:
        run_benchmark(_config(tmp_path), task=ManyLabelsTask(classes=500), progress=False, log=lambda _: None)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the training split has 64 examples for 500 classes (2 of them occur in it)")
    assert "--train-size" in message
    assert not (tmp_path / "runs").exists()


def test_most_test_examples_in_unseen_classes_is_refused(tmp_path, no_training):
    refusal = r"^20 of 32 test examples belong to 20 classes that never occur"
    with pytest.raises(BenchConfigError, match=refusal):
        run_benchmark(_config(tmp_path), task=ManyLabelsTask(classes=40, unseen=20), progress=False,
                      log=lambda _: None)  # fmt: skip


def test_a_few_unseen_test_classes_are_one_short_warning_printed_once(tmp_path):
    logs: list[str] = []
    task = ManyLabelsTask(classes=40, unseen=12)
    run_benchmark(_config(tmp_path), task=task, progress=False, log=logs.append)
    unseen = [line for line in logs if "never seen in training" in line]
    assert len(unseen) == 1 and len(unseen[0]) < 400, unseen  # once, and short: 5 classes named
    assert "and 7 more" in unseen[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert any("never seen in training" in w for w in summary["verdict"]["warnings"])


def test_a_csv_with_more_labels_than_training_rows_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import lorapro.bench.train as train

    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    rows = [f"a good film number {i},label{i % 500}" for i in range(600)]
    csv = tmp_path / "many.csv"
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    out, model = tmp_path / "out", save_tiny_llama(tmp_path / "llm")
    capsys.readouterr()
    code = main(["bench", "--task", f"text-csv:{csv}", "--model", str(model),
                 "--methods", "lora", "--no-progress", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("lorapro bench: error: the training split has 420 examples for 500 classes"), err
    assert not out.exists()  # nothing written, and no empty folder left


def test_check_labels_passes_tasks_without_labels():
    from types import SimpleNamespace

    check_labels(SimpleNamespace(train=SimpleNamespace(), test=SimpleNamespace(), info={}))


# --------------------------------------------------------------------------- plan, Ctrl-C


def test_the_plan_and_an_estimate_come_before_the_runs(tmp_path, monkeypatch):
    logs: list[str] = []
    calls: list[int] = []
    real = harness.train_and_evaluate

    def counted(*args, **kwargs):
        calls.append(len(logs))  # how many lines were printed when this run began
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "train_and_evaluate", counted)
    cfg = _config(tmp_path, methods=("full", "lora", "lorapro"), seeds=2, lr_grid=(1e-3, 1e-2), extend_grid=2,
                  refine=1)  # fmt: skip
    run_benchmark(cfg, task=TinyTask(), progress=False, log=logs.append)
    plan = [i for i, line in enumerate(logs) if line.startswith("Plan: ")]
    assert len(plan) == 1 and plan[0] < calls[0]
    assert logs[plan[0]].startswith(
        "Plan: 3 methods x 2 rates on seed 0, then each method's chosen rate on 1 more seed: 9 runs, "
        "and up to 12 more"
    ), logs[plan[0]]
    estimate = [i for i, line in enumerate(logs) if line.startswith("First run: ")]
    assert len(estimate) == 1 and calls[0] <= estimate[0] < calls[1]
    assert "the 8 remaining planned runs take about" in logs[estimate[0]]


def test_ctrl_c_says_how_many_runs_are_stored_and_how_to_resume(tmp_path, monkeypatch):
    real = harness.train_and_evaluate
    calls = []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "train_and_evaluate", interrupted_at_the_third)
    logs: list[str] = []
    cfg = _config(tmp_path, lr_grid=(1e-3, 1e-2))
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, task=TinyTask(), progress=False, log=logs.append, resume_command="lorapro bench X")
    assert logs[-1].strip().startswith(f"Interrupted: 2 finished runs stored under {tmp_path / 'runs'}")
    assert "To resume, rerun `lorapro bench X`: stored runs are reused" in logs[-1]
    # ... and they are: the same benchmark trains only what is missing.
    monkeypatch.setattr(harness, "train_and_evaluate", real)
    again = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None)
    assert (again.runs_reused, again.runs_executed) == (2, 2)


def test_ctrl_c_in_the_command_exits_130_naming_the_command(tmp_path, capsys, monkeypatch):
    from lorapro.bench.tasks.registry import TASKS, register_task

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "train_and_evaluate", interrupted)
    register_task("tiny", TinyTask)
    try:
        argv = ["bench", "--task", "tiny", "--methods", "lora", "--no-progress", "--out", str(tmp_path / "o")]
        assert main(argv) == 130
    finally:
        TASKS.pop("tiny")
    printed = capsys.readouterr().out
    assert "Interrupted: 0 finished runs stored" in printed
    assert f"rerun `lorapro bench --task tiny --methods lora --no-progress --out {tmp_path / 'o'}`" in printed


# --------------------------------------------------------------------------- one seed


def test_one_seed_shows_no_plus_minus(tmp_path, capsys):
    logs: list[str] = []
    run_benchmark(_config(tmp_path), task=TinyTask(), progress=False, log=logs.append)
    md = (tmp_path / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "±" not in row and "(1 seed)" in row, row
    assert any(line.startswith("lora: ") and line.endswith("(1 seed)") for line in logs), logs
    table = combined_table([load_summary(tmp_path)])
    assert "±" not in table and "(n=1, lr 0.01)" in table
    # The Data line is words, not a Python dict.
    data = next(line for line in md.splitlines() if line.startswith("Data: "))
    assert data.startswith("Data: 64 train / 32 validation / 32 test examples") and "{" not in data, data


def test_several_seeds_keep_their_spread(tmp_path):
    run_benchmark(_config(tmp_path, seeds=2), task=TinyTask(), progress=False, log=lambda _: None)
    lines = (tmp_path / "results.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| lora |"))
    assert "±" in row and "(2 seeds)" in row
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())["methods"][0]["test_std"])


# --------------------------------------------------------------------------- papercuts


def test_two_benchmarks_of_one_task_get_their_own_columns(tmp_path):
    def summary(spec: str, folder: str) -> dict:
        row = {"method": "lora", "unavailable": None, "pending": None, "test_values": [0.5], "test_mean": 0.5,
               "test_std": 0.0, "chosen_lr": 1e-3, "gap_closed": None}  # fmt: skip
        return {"task": "jsonl", "report_metric": "loss", "config": {"task": spec}, "methods": [row],
                "folder": folder}  # fmt: skip

    a, b, a_again = (
        summary("jsonl:a.jsonl", "out-a"),
        summary("jsonl:b.jsonl", "out-b"),
        summary("jsonl:a.jsonl", "out-b"),
    )
    head = combined_table([a, b]).splitlines()[0]
    assert "| jsonl:a.jsonl (loss) | jsonl:b.jsonl (loss) |" in head, head
    head = combined_table([a, a_again]).splitlines()[0]
    assert "jsonl:a.jsonl, out-a (loss)" in head and "jsonl:a.jsonl, out-b (loss)" in head, head


def test_a_rate_chosen_at_the_edge_of_the_grid_is_warned_about(tmp_path):
    logs: list[str] = []
    run_benchmark(_config(tmp_path, lr_grid=(1e-7, 1e-6)), task=TinyTask(), progress=False, log=logs.append)
    edge = [line for line in logs if "the edge of its grid" in line]
    assert edge and all(line.startswith("warning: ") for line in edge), logs


def test_options_say_what_they_do_and_take_the_usual_spellings(capsys):
    from lorapro.cli import build_parser

    assert build_parser().parse_args(["bench", "--dtype", "bf16"]).dtype == "bfloat16"
    assert build_parser().parse_args(["bench", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--dtype", "fp8"])
    assert "expected float32 or bfloat16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    bench = " ".join(capsys.readouterr().out.split())
    for option in ("--weight-decay WEIGHT_DECAY AdamW weight decay", "--data-seed DATA_SEED seed of the"):
        assert option in bench, bench
    assert "(default: the task's: mr 64, trec 48, text-csv 128" in bench
    with pytest.raises(SystemExit):
        build_parser().parse_args(["diagnose", "--help"])
    diagnose = capsys.readouterr().out
    assert "(default: None)" not in diagnose and "--model PATH" in diagnose
    assert "(default: 500)" in diagnose  # a real default is still shown


def test_diagnose_takes_your_model(tmp_path, capsys):
    label = {0: ("dull", "neg"), 1: ("great", "pos")}
    rows = [f"a {label[i % 2][0]} film number {i},{label[i % 2][1]}" for i in range(40)]
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    model = save_tiny_llama(tmp_path / "llm")
    out = tmp_path / "diag"
    argv = ["diagnose", "--task", f"text-csv:{csv}", "--model", str(model), "--method", "lora",
            "--steps", "0,1", "--val-size", "4", "--test-size", "4", "--batch-size", "4", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model"] == str(model) and run["runs"][0]["measured_steps"] == 2
    assert "llm" in run["config"]["task_description"]
