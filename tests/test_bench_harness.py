"""The benchmark harness on a tiny task: tuning, seeds, resume, reports and bad options."""

from __future__ import annotations

import json
import math

import pytest

from bench_runs import run_with_score as _fake_run
from bench_tiny import TinyTask
from lorapro.bench.harness import BenchConfig, BenchConfigError, run_benchmark
from lorapro.bench.methods import METHODS, MethodSpec, MethodUnavailableError, register_method
from lorapro.bench.report import gap_closed

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(tmp_path, **kw):
    # No grid extension by default here, so run counts are exact; one test turns it on.
    base = dict(
        task="tiny", methods=("full", "lora", "lorapro"), seeds=2, lr_grid=(1e-3, 1e-2), extend_grid=0,
        out=str(tmp_path),
    )  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


def test_benchmark_tunes_on_validation_runs_seeds_and_writes_reports(tmp_path):
    logs: list[str] = []
    result = run_benchmark(_config(tmp_path), task=TinyTask(), progress=False, log=logs.append)
    assert result.runs_executed == 3 * (2 + 1) and result.runs_reused == 0
    for outcome in result.outcomes:
        # The chosen rate is the grid point with the best validation accuracy (ties: smaller).
        scores = {lr: m["accuracy"] for lr, m in outcome.grid.items()}
        best = max(scores.values())
        assert outcome.chosen_lr == min(lr for lr, s in scores.items() if s == best)
        assert [r.seed for r in outcome.runs] == [0, 1]
        assert all(r.lr == outcome.chosen_lr for r in outcome.runs)
        assert all(0.0 <= r.test["accuracy"] <= 1.0 for r in outcome.runs)
        assert all(len(r.loss_curve) == 2 * 4 and r.steps == 8 for r in outcome.runs)
    # Seeds differ in initial weights and data order, so their loss curves differ.
    lora = next(o for o in result.outcomes if o.method == "lora")
    assert lora.runs[0].loss_curve != lora.runs[1].loss_curve

    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["methods"]}
    assert rows["lorapro"]["gap_closed"] == gap_closed(
        rows["lorapro"]["test_mean"], rows["lora"]["test_mean"], rows["full"]["test_mean"]
    )
    assert rows["lora"]["optimizer_state_bytes"] == rows["lorapro"]["optimizer_state_bytes"] > 0
    assert rows["full"]["trainable_params"] > rows["lora"]["trainable_params"]
    md = (tmp_path / "results.md").read_text()
    assert "| lorapro |" in md and "val accuracy @ 0.01" in md
    for name in ("loss_curves.png", "test_bars.png", "lr_sweep.png", "diff_vs_lora.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every run keeps its per-example test outcomes; their mean is the test accuracy.
    for outcome in result.outcomes:
        for run in outcome.runs:
            values = run.test_examples["accuracy"]["values"]
            assert len(values) == 32 and sum(values) / 32 == run.test["accuracy"]
    # The verdict: every method against LoRA, and against full fine-tuning, by a paired bootstrap
    # over test examples (2 seeds: not over seeds), with the rule that chose each rate.
    verdict = summary["verdict"]
    pairs = [(c["method"], c["reference"]) for c in verdict["comparisons"]]
    assert pairs == [("full", "lora"), ("lorapro", "lora"), ("lorapro", "full")]
    for c in verdict["comparisons"]:
        assert c["kind"] == "examples" and c["low"] <= c["high"]
        assert c["verdict"] in ("better", "within noise", "worse")
    assert "## Verdict" in md and "paired bootstrap over 32 test examples" in md
    assert "## How each rate was chosen" in md and "highest validation accuracy" in md
    assert any("\n| lorapro | lora |" in entry for entry in logs)  # the verdict table is printed
    assert rows["lora"]["choice_rule"].startswith(f"lr {rows['lora']['chosen_lr']:g}: highest validation")
    # One JSON file per run, named by method, lr, seed and config hash.
    files = sorted(p.name for p in (tmp_path / "runs" / "lora").glob("*.json"))
    assert len(files) == 3 and all(f.startswith("lr") for f in files)


def test_verdict_of_runs_without_per_example_outcomes_is_over_seeds(tmp_path):
    # Runs stored by earlier versions have no per-example outcomes: an interval over seeds, said so.
    cfg = _config(tmp_path, methods=("lora", "lorapro"), lr_grid=(1e-2,), seeds=2)
    logs: list[str] = []
    run_benchmark(cfg, task=TinyTask(per_example=False), progress=False, log=logs.append)
    (c,) = json.loads((tmp_path / "summary.json").read_text())["verdict"]["comparisons"]
    assert c["kind"] == "seeds" and "t-interval over 2 seeds" in c["basis"]
    assert any("intervals over seeds only" in line for line in logs)


def test_reports_of_a_result_from_an_earlier_harness(tmp_path):
    # A long benchmark started on an older checkout imports the report module only at its end:
    # its outcomes lack the newer fields, its runs the per-example outcomes.
    from lorapro.bench.report import write_reports

    cfg = _config(tmp_path, methods=("lora",), lr_grid=(1e-3, 1e-2), seeds=1)
    result = run_benchmark(cfg, task=TinyTask(per_example=False), progress=False, log=lambda _: None)
    (outcome,) = result.outcomes
    for name in ("origins", "diverged", "rule"):
        delattr(outcome, name)
    del result.data_warnings
    write_reports(result, log=lambda _: None)
    md = (tmp_path / "results.md").read_text()
    assert f"- lora: lr {outcome.chosen_lr:g}: highest validation accuracy" in md


def test_one_seed_and_an_unseparable_test_set_are_warned_about(tmp_path):
    cfg = _config(tmp_path, methods=("lora", "lorapro"), lr_grid=(1e-6,), seeds=1)
    logs: list[str] = []
    run_benchmark(cfg, task=TinyTask(), progress=False, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning: ")]
    assert any("one seed" in w for w in warnings)
    # At lr 1e-6 neither method learns anything: their 32 test predictions agree, within noise.
    assert any("too small to separate the methods" in w for w in warnings), warnings
    md = (tmp_path / "results.md").read_text()
    assert "Warnings:" in md and "one seed" in md


def test_refinement_adds_half_steps_around_each_best_rate(tmp_path):
    cfg = _config(tmp_path, methods=("lora",), seeds=1, lr_grid=(1e-3, 1e-2), refine=1)
    logs: list[str] = []
    result = run_benchmark(cfg, task=TinyTask(), progress=False, log=logs.append)
    (outcome,) = result.outcomes
    refined = sorted(lr for lr, origin in outcome.origins.items() if origin == "refinement")
    assert len(outcome.grid) == 4 and result.runs_executed == 4 and len(refined) == 2
    assert any("one round of half-steps in log space" in line for line in logs)
    # The same command line finds every run (refinement included) and trains nothing.
    again = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None, report_only=True)
    assert again.runs_reused == 4 and not again.outcomes[0].pending
    assert "(x" in (tmp_path / "results.md").read_text()  # the chosen rate's resolution


def test_test_classes_never_seen_in_training_are_warned_about():
    from types import SimpleNamespace

    from lorapro.bench.harness import unseen_test_classes

    prepared = SimpleNamespace(
        train=SimpleNamespace(labels=[0, 0, 1]), test=SimpleNamespace(labels=[0, 2, 2, 1]),
        info={"classes": ["a", "b", "c"]},
    )  # fmt: skip
    (warning,) = unseen_test_classes(prepared)
    assert warning.startswith("test class(es) never seen in training: 'c' (2 test examples), 50.0% of")
    prepared.test.labels = [0, 1]
    assert unseen_test_classes(prepared) == []
    assert unseen_test_classes(SimpleNamespace(train=[], test=[], info={})) == []


def test_stored_run_hashes_do_not_change():
    """A run stored under results/trec (lora, lr 1e-4, seed 0) keeps its hash: the key's layout,
    TrainConfig's fields and the default options' absence from it are what every stored run relies on."""
    from dataclasses import asdict

    from lorapro.bench.harness import HARNESS_VERSION, _runtime_key, run_hash
    from lorapro.bench.tasks import TaskOptions
    from lorapro.bench.train import TrainConfig

    cfg = BenchConfig(task="trec", train_size=1000, val_size=300, test_size=1000, epochs=2, refine=1)
    key = {
        "harness_version": HARNESS_VERSION,
        "task": {"task": "trec"},
        "options": asdict(TaskOptions(train_size=1000, val_size=300, test_size=1000)),
        "sizes": {"train": 1000, "validation": 300, "test": 1000, "pool": 5381},
        **_runtime_key(cfg, "cpu"),
        "method": "lora",
        "train": TrainConfig(lr=1e-4, epochs=2, batch_size=32, seed=0, lora_alpha=16.0).to_dict(),
    }
    assert run_hash(key) == "7d782b9fc22f4b50"


def test_finished_runs_are_reused_and_a_changed_config_is_not(tmp_path):
    run_benchmark(_config(tmp_path, methods=("lora",)), task=TinyTask(), progress=False, log=lambda _: None)
    again = run_benchmark(
        _config(tmp_path, methods=("lora",)), task=TinyTask(), progress=False, log=lambda _: None
    )
    assert again.runs_executed == 0 and again.runs_reused == 3
    # A different rank is a different run; a third seed adds one run and reuses the rest.
    more = run_benchmark(
        _config(tmp_path, methods=("lora",), seeds=3), task=TinyTask(), progress=False, log=lambda _: None
    )
    assert more.runs_executed == 1 and more.runs_reused == 3
    other = run_benchmark(
        _config(tmp_path, methods=("lora",), rank=4), task=TinyTask(), progress=False, log=lambda _: None
    )
    assert other.runs_executed == 3


def test_benchmark_extends_the_grid_beyond_an_edge_optimum(tmp_path):
    # Two grid points: the best is always at an edge, so exactly one point is added beyond it.
    cfg = _config(tmp_path, methods=("lora",), seeds=1, lr_grid=(1e-6, 1e-5), extend_grid=1)
    result = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None)
    (outcome,) = result.outcomes
    lrs = sorted(outcome.grid)
    assert len(lrs) == 3 and result.runs_executed == 3
    first_two = {lr: outcome.grid[lr]["accuracy"] for lr in (1e-6, 1e-5)}
    if first_two[1e-5] > first_two[1e-6]:  # strictly better at the top: extend upwards
        assert lrs[-1] == pytest.approx(1e-4)
    else:  # ties keep the smaller rate, which is then the bottom edge
        assert lrs[0] == pytest.approx(1e-7)
    assert "val accuracy @ " in (tmp_path / "results.md").read_text()


def test_torn_run_file_is_run_again(tmp_path):
    run_benchmark(_config(tmp_path, methods=("lora",), seeds=1, lr_grid=(1e-3,)), task=TinyTask(),
                  progress=False, log=lambda _: None)  # fmt: skip
    (path,) = (tmp_path / "runs" / "lora").glob("*.json")
    path.write_text(path.read_text()[:50])
    again = run_benchmark(_config(tmp_path, methods=("lora",), seeds=1, lr_grid=(1e-3,)), task=TinyTask(),
                          progress=False, log=lambda _: None)  # fmt: skip
    assert again.runs_executed == 1
    json.loads(path.read_text())


def test_unavailable_method_is_reported_not_fatal(tmp_path):
    def refuse(model, ctx):
        raise MethodUnavailableError("PEFT does not support this layer")

    register_method(MethodSpec("refused-test", refuse, "always refused", 1e-3), replace=True)
    try:
        result = run_benchmark(
            _config(tmp_path, methods=("lora", "refused-test"), seeds=1), task=TinyTask(), progress=False,
            log=lambda _: None,
        )  # fmt: skip
        refused = next(o for o in result.outcomes if o.method == "refused-test")
        assert refused.unavailable == "PEFT does not support this layer" and not refused.runs
        assert "not run: PEFT does not support this layer" in (tmp_path / "results.md").read_text()
        # The refusal is stored, so a report-only pass still says why the method did not run.
        again = run_benchmark(
            _config(tmp_path, methods=("lora", "refused-test"), seeds=1), task=TinyTask(), progress=False,
            log=lambda _: None, report_only=True,
        )  # fmt: skip
        assert again.outcomes[1].unavailable == "PEFT does not support this layer"
    finally:
        METHODS.pop("refused-test")


def test_divergence_is_recorded_and_loses_the_tuning(tmp_path):
    cfg = _config(tmp_path, methods=("lorapro",), seeds=1, lr_grid=(1e-3, 1e9))
    result = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None)
    (outcome,) = result.outcomes
    assert outcome.chosen_lr == 1e-3
    huge = next(r for r in result.all_runs if r.lr == 1e9)
    assert huge.diverged and math.isnan(huge.final_train_loss)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"methods": ()}, "no methods"),
        ({"methods": ("lora", "lora")}, "listed twice"),
        ({"methods": ("lora", "nope")}, "unknown method 'nope'"),
        ({"seeds": 0}, "--seeds"),
        ({"lr_grid": (1e-3, -1.0)}, "--lr-grid"),
        ({"lr_grid": (1e-3, 1e-3)}, "twice"),
        ({"train_size": 0}, "--train-size"),
        ({"rank": 0}, "--rank"),
        ({"refine": -1}, "--refine"),
    ],
)
def test_bad_options_name_the_option(tmp_path, kw, message):
    with pytest.raises(BenchConfigError, match=message):
        run_benchmark(_config(tmp_path, **kw), task=TinyTask(), progress=False, log=lambda _: None)
    assert not (tmp_path / "runs").exists()


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(BenchConfigError, match=r"unknown task 'nope'.*mr.*text-csv.*trec"):
        run_benchmark(_config(tmp_path, task="nope"), progress=False, log=lambda _: None)


@pytest.mark.parametrize(
    ("grid", "peak", "expected_new"),
    [
        ((1e-4, 5e-4, 2e-3), 1e-2, [8e-3, 3.2e-2]),  # best at the top: extend twice, up to the cap
        ((1e-4, 5e-4, 2e-3), 3e-3, [8e-3]),  # the first extension brackets the optimum
        ((1e-4, 5e-4, 2e-3), 1e-5, [2e-5, 4e-6]),  # best at the bottom: extend downwards
        ((1e-4, 5e-4, 2e-3), 5e-4, []),  # already bracketed
    ],
)
def test_grid_extends_where_the_best_rate_is_at_an_edge(grid, peak, expected_new):
    from lorapro.bench.harness import _extend_at_edges
    from lorapro.bench.tasks import Metric

    def score(lr):  # unimodal in log(lr), peaked at `peak`
        return -abs(math.log(lr / peak))

    runs = {lr: _fake_run(lr, score(lr)) for lr in grid}
    tried = []

    def run(lr):
        tried.append(lr)
        return _fake_run(lr, score(lr))

    _extend_at_edges(runs, 2, Metric("accuracy"), None, run)
    assert tried == pytest.approx(expected_new)


def test_grid_does_not_extend_past_a_diverged_top():
    from lorapro.bench.harness import _extend_at_edges
    from lorapro.bench.tasks import Metric

    runs = {1e-3: _fake_run(1e-3, 0.5), 1e-2: _fake_run(1e-2, 0.6, diverged=True)}
    _extend_at_edges(runs, 2, Metric("accuracy"), None, lambda lr: pytest.fail("extended"))


def test_gap_closed():
    assert gap_closed(0.8, 0.7, 0.9) == pytest.approx(0.5)
    assert gap_closed(0.6, 0.7, 0.9) == pytest.approx(-0.5)
    assert gap_closed(0.8, 0.7, 0.7) is None
    assert gap_closed(math.nan, 0.7, 0.9) is None
    # Full fine-tuning worse than LoRA: no gap, and a method worse than LoRA is not "closer".
    assert gap_closed(0.76, 0.79, 0.76) is None
    # Lower-is-better metrics (a loss): full 1.0, LoRA 1.2, method 1.1 closes half.
    assert gap_closed(1.1, 1.2, 1.0, higher_is_better=False) == pytest.approx(0.5)
    assert gap_closed(1.1, 1.0, 1.2, higher_is_better=False) is None


def test_gap_closed_is_shown_only_where_the_verdict_resolves_full_fine_tunings_gain(tmp_path):
    from dataclasses import replace

    from lorapro.bench.report import gap_undefined, markdown_table, summarize
    from lorapro.bench.verdict import comparisons

    result = run_benchmark(_config(tmp_path), task=TinyTask(), progress=False, log=lambda _: None)
    found = comparisons(result)
    full = next(c for c in found if (c.method, c.reference) == ("full", "lora"))
    assert full.verdict == "better"  # the tiny task resolves it: the ratios are shown
    summary = summarize(result, found)
    assert summary["gap_closed_undefined"] is None
    assert summary["methods"][2]["gap_closed"] == pytest.approx(0.0)

    # The same runs, with full fine-tuning's gain over LoRA within noise: no ratio anywhere.
    unresolved = [replace(c, low=-0.02, high=0.2, verdict="within noise") if c is full else c for c in found]
    summary = summarize(result, unresolved)
    why = summary["gap_closed_undefined"]
    assert why.startswith(
        "the verdict does not find full fine-tuning better than LoRA on test accuracy (+0.109"
    )
    assert why.endswith("[-0.020, +0.200]: within noise)")
    assert all(row["gap_closed"] is None for row in summary["methods"])
    assert markdown_table(summary).splitlines()[-1].startswith("| lorapro | 0.001 (x10, edge) | 0.3906")
    assert "| n/a |" in markdown_table(summary).splitlines()[-1]

    assert gap_undefined([], "accuracy") == "full fine-tuning and LoRA did not both run"
    on_loss = [{**full.to_dict(), "metric": "loss"}]
    assert (
        gap_undefined(on_loss, "exact_match") == "the verdict compares test loss, not the table's exact_match"
    )


def test_bench_diagnose_measures_the_lora_family_at_the_chosen_rates(tmp_path):
    from lorapro.bench.bench_cli import diagnose_benchmark, diagnose_steps
    from lorapro.bench.tasks.registry import TASKS, register_task
    from lorapro.diagnostics import read_jsonl

    assert diagnose_steps(64) == [0, 1, 2, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 63]
    assert diagnose_steps(2) == [0, 1]
    register_task("tiny", TinyTask)
    try:
        result = run_benchmark(
            _config(tmp_path, seeds=1), task=TinyTask(), progress=False, log=lambda _: None
        )
        logs: list[str] = []
        diagnose_benchmark(result, progress=False, log=logs.append)
    finally:
        TASKS.pop("tiny")
    assert any("skipping full" in line for line in logs)
    records = read_jsonl(tmp_path / "diagnose" / "records.jsonl")
    assert {r.run for r in records} == {"lora", "lorapro"}
    assert {r.step for r in records} == set(diagnose_steps(8))
    # LoRA-Pro's equivalent gradient is the least-squares optimum: never farther from g.
    assert all(r.pro_rel_distance <= r.lora_rel_distance + 1e-6 for r in records)
    run = json.loads((tmp_path / "diagnose" / "run.json").read_text())
    chosen = {o.method: o.chosen_lr for o in result.outcomes}
    assert run["config"]["lrs"] == {"lora": chosen["lora"], "lorapro": chosen["lorapro"]}


def test_combined_table_has_a_row_per_method_and_a_column_per_task(tmp_path, capsys):
    from lorapro.bench.report import combined_table
    from lorapro.cli import main

    def row(method, mean, gap=None, unavailable=None):
        return {"method": method, "test_mean": mean, "test_std": 0.01, "test_values": [mean] * 3,
                "chosen_lr": 1e-3, "gap_closed": gap, "unavailable": unavailable}  # fmt: skip

    def verdict(word):
        return {"comparisons": [{"method": "full", "reference": "lora", "metric": "accuracy",
                                 "difference": 0.1, "low": 0.05 if word == "better" else -0.05, "high": 0.15,
                                 "verdict": word}]}  # fmt: skip

    a = {"task": "mr", "report_metric": "accuracy", "verdict": verdict("better"),
         "methods": [row("full", 0.8), row("lora", 0.7), row("lorapro", 0.75, 0.5)]}  # fmt: skip
    trec_rows = [row("full", 0.92), row("lora", 0.9), row("lorapro", 0.8, -5.0),
                 row("pissa", None, unavailable="no conv")]  # fmt: skip
    # trec's summary predates the rule: its row keeps a ratio over a gain the verdict did not
    # resolve, which the mean leaves out.
    b = {
        "task": "trec",
        "report_metric": "accuracy",
        "verdict": verdict("within noise"),
        "methods": trec_rows,
    }
    table = combined_table([a, b]).splitlines()
    assert table[0] == "| method | mr (accuracy) | trec (accuracy) | mean gap closed |"
    assert table[2].startswith("| full | 0.800 ± 0.010 (n=3, lr 0.001) | 0.920 ± 0.010")
    assert table[4].endswith("| 0.50 (1 task) |")
    assert table[5] == "| pissa | — | not run | — |"
    assert table[-1] == (
        "The mean gap closed leaves out trec (accuracy): the verdict does not find full fine-tuning better "
        "than LoRA on test accuracy (+0.100, 95% interval [-0.050, +0.150]: within noise)."
    )
    for name, summary in (("mr", a), ("trec", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert (
        main(["report", str(tmp_path / "mr"), str(tmp_path / "trec"), "--out", str(tmp_path / "t.md")]) == 0
    )
    assert (tmp_path / "t.md").read_text().splitlines() == table
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "run `lorapro bench --out" in capsys.readouterr().err


def test_report_only_trains_nothing_and_marks_what_is_pending(tmp_path):
    quiet = {"task": TinyTask(), "progress": False, "log": lambda _: None}
    run_benchmark(_config(tmp_path, methods=("lora",), seeds=1), **quiet)
    result = run_benchmark(_config(tmp_path, methods=("lora", "lorapro"), seeds=3), report_only=True, **quiet)
    assert result.runs_executed == 0
    lora, pro = result.outcomes
    assert len(lora.runs) == 1 and lora.pending == "1 of 3 seeds run so far"
    assert not pro.runs and pro.pending.startswith("tuning not finished (lr 0.001 seed 0")
    md = (tmp_path / "results.md").read_text()
    assert "(1 of 3 seeds run so far)" in md and "pending: tuning not finished" in md
