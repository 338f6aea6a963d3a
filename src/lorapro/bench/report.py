"""The benchmark's outputs: ``summary.json``, ``results.md`` and its PNG figures.

The table follows the paper's layout (one row per method, the task's test metric as
mean +- std over seeds) and adds what a fair comparison needs next to it: the chosen
learning rate and how finely it was located, the validation score of every grid point, and
the share of the LoRA-to-full-fine-tuning gap each method closes, (method - LoRA) / (full -
LoRA), where the verdict resolves that gap (a ratio over a difference within noise can take any
value). The verdict follows it: each method's difference from LoRA (and full fine-tuning) on
the selection metric with a 95% interval and one word, and what the verdict cannot tell.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .data_checks import contaminated_test_set
from .figures import smooth, write_figures
from .grid import choice_rule, grid_plan, resolution, selection_rule
from .outcomes import BenchResult
from .records import examples_of
from .stats import BETTER, mean, spread, std
from .verdict import comparisons, verdict_warnings

__all__ = [
    "column_labels",
    "combined_table",
    "describe_data",
    "gap_closed",
    "gap_undefined",
    "load_summary",
    "markdown_table",
    "smooth",
    "summarize",
    "verdict_heading",
    "verdict_table",
    "write_reports",
]


def gap_closed(value: float, lora: float, full: float, higher_is_better: bool = True) -> float | None:
    """(value - LoRA) / (full - LoRA); None when undefined.

    Undefined means a missing baseline, or no gap to close: when full fine-tuning does not
    beat LoRA, the ratio would call a method that is *worse* than LoRA "closer to full".
    """
    if any(not math.isfinite(x) for x in (value, lora, full)):
        return None
    gap = full - lora if higher_is_better else lora - full
    if gap <= 0:
        return None
    return (value - lora) / (full - lora)


def gap_undefined(comparisons: Sequence[dict[str, Any]], metric: str) -> str | None:
    """Why no method's gap closed is shown, or None when it is.

    The ratio divides by full fine-tuning's gain over LoRA; where the verdict cannot tell that
    gain from noise, the ratio can take any value (-17 for a method one point behind LoRA when
    full is 0.1 points ahead), so it is shown only when the verdict on the same metric says
    full fine-tuning is **better** than LoRA. ``comparisons``: the verdict's, as in
    ``summary.json``; ``metric``: the table's (report) metric.
    """
    full = next((c for c in comparisons if c["method"] == "full" and c["reference"] == "lora"), None)
    if full is None:
        return "full fine-tuning and LoRA did not both run"
    if full["metric"] != metric:
        return f"the verdict compares test {full['metric']}, not the table's {metric}"
    if full["verdict"] == BETTER:
        return None
    interval = (
        "no interval"
        if full["low"] is None
        else f"95% interval [{_signed(full['low'], 3)}, {_signed(full['high'], 3)}]"
    )
    return (
        f"the verdict does not find full fine-tuning better than LoRA on test {metric} "
        f"({_signed(full['difference'], 3)}, {interval}: {full['verdict']})"
    )


def summarize(result: BenchResult, found: Sequence[Any] | None = None) -> dict[str, Any]:
    """Everything the reports show, as JSON-ready data (``summary.json``). ``found``: the
    verdict's comparisons when already computed (else they are computed here)."""
    metric = result.task.report_metric.name
    selection = result.task.selection_metric
    means = {o.method: mean(o.test_values(metric)) for o in result.outcomes if o.runs}
    lora, full = means.get("lora", math.nan), means.get("full", math.nan)
    higher = result.task.report_metric.higher_is_better
    found = comparisons(result) if found is None else found
    undefined = gap_undefined([c.to_dict() for c in found], metric)
    cfg = result.config
    methods = []
    for o in result.outcomes:
        values = o.test_values(metric)
        selected = o.test_values(selection.name)
        row: dict[str, Any] = {
            "method": o.method,
            "description": o.description,
            "unavailable": o.unavailable,
            "pending": o.pending,
            "chosen_lr": o.chosen_lr,
            "grid_validation": {f"{lr:g}": m for lr, m in o.grid.items()},
            "grid_origin": {f"{lr:g}": origin for lr, origin in sorted(o.origins.items())},
            "diverged_lrs": list(o.diverged),
            "choice_rule": o.rule or None,
            "lr_resolution": resolution(list(o.grid), o.chosen_lr) if o.chosen_lr is not None else None,
            "test_values": values,
            "test_mean": mean(values) if values else None,
            "test_std": std(values) if values else None,
            "selection_test_values": selected,
            "selection_test_mean": mean(selected) if selected else None,
            "selection_test_std": std(selected) if selected else None,
            "per_example_outcomes": bool(o.runs) and all(selection.name in examples_of(r) for r in o.runs),
            "seeds": [r.seed for r in o.runs],
            "gap_closed": gap_closed(mean(values), lora, full, higher) if values and not undefined else None,
            "test_metrics_per_seed": [r.test for r in o.runs],
            "final_train_loss": [r.final_train_loss for r in o.runs],
            "train_seconds_mean": mean([r.train_seconds for r in o.runs]) if o.runs else None,
            "peak_memory_mb_max": max(
                (r.peak_memory_bytes / 2**20 for r in o.runs if r.peak_memory_bytes is not None), default=None
            ),
            "peak_memory_kind": o.runs[0].peak_memory_kind if o.runs else None,
            "trainable_params": o.runs[0].trainable_params if o.runs else None,
            "optimizer_state_bytes": o.runs[0].optimizer_state_bytes if o.runs else None,
            "diverged_runs": sum(r.diverged for r in o.runs),
        }
        methods.append(row)
    return {
        "task": result.task.name,
        "task_description": result.task.description,
        "report_metric": metric,
        "report_metric_higher_is_better": higher,
        "selection_metric": {
            "name": selection.name,
            "higher_is_better": selection.higher_is_better,
            "split": "validation",
        },
        "selection_rule": selection_rule(selection),
        "grid_plan": grid_plan(cfg.lr_grid, cfg.extend_grid, getattr(cfg, "refine", 0)),
        "task_info": result.task_info,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(result.config).items()},
        "environment": result.environment,
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs_executed": result.runs_executed,
        "runs_reused": result.runs_reused,
        "methods": methods,
        "gap_closed_undefined": undefined,
        "overlap": getattr(result, "overlap", {}),
        "verdict": {
            "metric": selection.name,
            "split": "test",
            "level": 0.95,
            "comparisons": [c.to_dict() for c in found],
            # None, or why the verdict does not measure generalisation (test examples seen in training).
            "test_set_contaminated": contaminated_test_set(getattr(result, "overlap", {})),
            "warnings": verdict_warnings(result, found),
        },
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _chosen(row: dict[str, Any]) -> str:
    """The chosen rate and the largest ratio to a tried neighbour (how finely it is located)."""
    res = row.get("lr_resolution") or {}
    factor = res.get("factor")
    if factor is None:
        return f"{row['chosen_lr']:g}"
    edge = "" if res.get("bracketed") else ", edge"
    return f"{row['chosen_lr']:g} (x{factor:.2g}{edge})"


def markdown_table(summary: dict[str, Any]) -> str:
    metric = summary["report_metric"]
    sel = summary["selection_metric"]["name"]
    # Every rate any method tried: the common grid plus edge extensions and refinements.
    grid = sorted({float(lr) for row in summary["methods"] for lr in row["grid_validation"]})
    head = (
        f"| method | chosen lr (resolution) | test {metric} (mean ± std over seeds) | gap closed | "
        + " | ".join(f"val {sel} @ {lr:g}" for lr in grid)
        + " | other test metrics (mean) | train s/run | peak MB |"
    )
    lines = [head, "| " + " | ".join(["---"] + ["---:"] * (len(grid) + 6)) + " |"]
    for row in summary["methods"]:
        vals = [
            _fmt(row["grid_validation"][f"{lr:g}"].get(sel)) if f"{lr:g}" in row["grid_validation"] else "—"
            for lr in grid
        ]
        if row["unavailable"] or (row.get("pending") and not row["test_values"]):
            why = f"not run: {row['unavailable']}" if row["unavailable"] else f"pending: {row['pending']}"
            cells = ["—", why.replace("|", "/"), "—", *vals, "", "", ""]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
            continue
        score = spread(row["test_values"])
        gap = "—" if row["method"] in ("lora", "full") else _fmt(row["gap_closed"], 2)
        if row["diverged_runs"]:
            score += f" ⚠ {row['diverged_runs']} diverged"
        if row.get("pending"):
            score += f" ({row['pending']})"
        peak = _fmt(row["peak_memory_mb_max"], 0)
        others = _other_means(row["test_metrics_per_seed"], metric)
        lines.append(
            f"| {row['method']} | {_chosen(row)} | {score} | {gap} | "
            + " | ".join(vals)
            + f" | {others} | {_fmt(row['train_seconds_mean'], 1)} | {peak} |"
        )
    return "\n".join(lines)


def _signed(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def verdict_table(summary: dict[str, Any]) -> str:
    """Each method against LoRA (and full fine-tuning): the difference on the test split's
    selection metric, its 95% interval, the word, and what the interval is over."""
    verdict = summary.get("verdict") or {}
    rows = verdict.get("comparisons") or []
    if not rows:
        return ""
    metric = verdict["metric"]
    direction = "higher" if summary["selection_metric"]["higher_is_better"] else "lower"
    lines = [
        f"| method | vs | test {metric}: method - reference ({direction} is better) | 95% interval | "
        "verdict | interval over |",
        "| --- | --- | ---: | :---: | --- | --- |",
    ]
    tainted = " (contaminated test set)" if verdict.get("test_set_contaminated") else ""
    for c in rows:
        interval = "—" if c["low"] is None else f"[{_signed(c['low'])}, {_signed(c['high'])}]"
        lines.append(
            f"| {c['method']} | {c['reference']} | {_signed(c['difference'])} | {interval} | "
            f"**{c['verdict']}**{tainted} | {c['basis']} |"
        )
    return "\n".join(lines)


def verdict_heading(summary: dict[str, Any]) -> str:
    """The line above the verdict table; it says so when the test set is contaminated."""
    verdict = summary.get("verdict") or {}
    text = f"Verdict on test {verdict.get('metric')} (95% intervals)"
    tainted = verdict.get("test_set_contaminated")
    if tainted:
        return f"{text}. NOT A MEASURE OF GENERALISATION: {tainted}:"
    return text + ":"


def describe_data(info: dict[str, Any]) -> str:
    """The Data line: sizes in words, then the task's notes."""
    sizes = info.get("sizes") or {}
    text = " / ".join(f"{sizes[k]} {k}" for k in ("train", "validation", "test") if k in sizes)
    text = f"{text} examples" if text else "sizes not recorded"
    if "pool" in sizes:
        text += f" (of {sizes['pool']})"
    notes = info.get("data_notes") or []
    if isinstance(notes, str):
        notes = [notes]
    return "; ".join([text, *notes])


def _choice_lines(summary: dict[str, Any]) -> list[str]:
    return [
        f"- {row['method']}: {row['choice_rule']}" for row in summary["methods"] if row.get("choice_rule")
    ]


def _other_means(per_seed: Sequence[dict[str, float]], skip: str) -> str:
    """Means over seeds of the test metrics besides the headline one (gsm: the test loss)."""
    names = sorted({k for m in per_seed for k in m} - {skip})
    parts = []
    for name in names:
        values = [m[name] for m in per_seed if name in m]
        parts.append(f"{name} {_fmt(sum(values) / len(values))}")
    return ", ".join(parts) or "—"


def _markdown(summary: dict[str, Any], figures: Sequence[Path]) -> str:
    info = summary["task_info"]
    env = summary["environment"]
    cfg = summary["config"]
    sel = summary["selection_metric"]["name"]
    # Runs on a GPU name it; summaries written before the device was recorded ran on the CPU.
    where = f", on {env['cuda_device']}" if env.get("cuda_device") else ""
    precision = f"; {cfg['dtype']}" if cfg.get("dtype", "float32") != "float32" else ""
    lines = [
        f"# Benchmark: {summary['task']}",
        "",
        f"{summary['task_description']}. Written {summary['written_at']} "
        f"(torch {env['torch']}, peft {env['peft']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads{where}{precision}).",
        "",
        f"Data: {describe_data(info)}.",
        f"Each method's learning rate: {summary['selection_rule']}; that rate then runs on "
        f"{cfg['seeds']} seed(s) and is scored on the test split. {summary['grid_plan']} "
        "Resolution (next to the chosen rate): the largest ratio between the chosen rate and a tried "
        "neighbour (edge: not bracketed on one side). "
        "Gap closed = (method - LoRA) / (full - LoRA) on the test mean, shown where the verdict "
        "below finds full fine-tuning better than LoRA"
        + (f"; n/a here: {summary['gap_closed_undefined']}." if summary.get("gap_closed_undefined") else "."),
        "",
        markdown_table(summary),
        "",
        f"Runs executed now: {summary['runs_executed']}; reused from earlier invocations: "
        f"{summary['runs_reused']}. Peak memory is the process's resident set sampled during the run "
        "on CPU (the allocator's peak on CUDA).",
        "",
    ]
    choices = _choice_lines(summary)
    if choices:
        lines += ["## How each rate was chosen", "", *choices, ""]
    table = verdict_table(summary)
    if table:
        tainted = (summary.get("verdict") or {}).get("test_set_contaminated")
        lines += [
            "## Verdict",
            "",
            f"Each method against LoRA (and full fine-tuning) on test {sel}, the metric the rates were "
            "chosen on: the difference of the means over the seeds both ran, a 95% interval, and "
            "**better** or **worse** when the interval excludes 0, else **within noise**.",
            "",
            *([f"**Not a measure of generalisation: {tainted}.**", ""] if tainted else []),
            table,
            "",
        ]
    warnings = (summary.get("verdict") or {}).get("warnings") or []
    if warnings:
        lines += ["Warnings:", "", *[f"- ⚠ {w}" for w in warnings], ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def _complete(result: BenchResult) -> None:
    """Give a result the fields an earlier harness did not set: a benchmark process started on an
    older checkout imports this module only when it writes its reports, at its end."""
    selection = result.task.selection_metric
    for o in result.outcomes:
        if not hasattr(o, "origins"):
            o.origins = {}
        if not hasattr(o, "diverged"):
            o.diverged = []
        if not getattr(o, "rule", ""):
            scores = {lr: m.get(selection.name, math.nan) for lr, m in o.grid.items()}
            o.rule = choice_rule(scores, o.chosen_lr, selection) if o.chosen_lr is not None else ""
    if not hasattr(result, "data_warnings"):
        result.data_warnings = []
    if not hasattr(result, "overlap"):
        result.overlap = {}


def write_reports(result: BenchResult, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    _complete(result)
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    found = comparisons(result)
    summary = summarize(result, found)
    figures = write_figures(result, summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(_markdown(summary, figures), encoding="utf-8")
    log("")
    log(summary["grid_plan"])
    log(markdown_table(summary))
    table = verdict_table(summary)
    if table:
        log("")
        log(verdict_heading(summary))
        log(table)
    printed = set(getattr(result, "data_warnings", []))  # the harness printed these before training
    for warning in summary["verdict"]["warnings"]:
        if warning not in printed:
            log(f"warning: {warning}")
    if printed:
        log(f"({len(printed)} warning(s) about the data, printed before training, are in results.md)")
    log("")
    log(f"Table: {out / 'results.md'}; summary: {out / 'summary.json'}")
    log(f"Figures: {', '.join(str(p) for p in figures)}")
    return {"summary": out / "summary.json", "markdown": out / "results.md", **{p.stem: p for p in figures}}


def column_labels(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """A column heading per summary: the task's name, its full spec (``jsonl:train.jsonl``) where
    two share a name, and its folder where two still read the same."""
    labels = [s["task"] for s in summaries]
    if len(set(labels)) < len(labels):
        labels = [str((s.get("config") or {}).get("task") or s["task"]) for s in summaries]
    if len(set(labels)) < len(labels):
        pairs = enumerate(zip(labels, summaries, strict=True))
        labels = [f"{label}, {s.get('folder', i + 1)}" for i, (label, s) in pairs]
    return [f"{label} ({s['report_metric']})" for label, s in zip(labels, summaries, strict=True)]


def combined_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The paper's layout across tasks: one row per method, one column per task (test mean ± std
    over seeds; a single seed has no ±).

    Each cell also gives the chosen learning rate; the last column averages the share of the
    LoRA-to-full gap closed over the tasks where it is defined (:func:`gap_undefined`).
    """
    methods: list[str] = []
    for s in summaries:
        for row in s["methods"]:
            if row["method"] not in methods:
                methods.append(row["method"])
    # A summary written before the rule above keeps its ratios in the rows: the verdict decides.
    why = [
        gap_undefined((s.get("verdict") or {}).get("comparisons") or [], s["report_metric"])
        for s in summaries
    ]
    head = "| method | " + " | ".join(column_labels(summaries)) + " | mean gap closed |"
    lines = [head, "| --- | " + " | ".join("---:" for _ in summaries) + " | ---: |"]
    for m in methods:
        cells, gaps = [], []
        for s, undefined in zip(summaries, why, strict=True):
            row = next((r for r in s["methods"] if r["method"] == m), None)
            if row is None:
                cells.append("—")
            elif row["unavailable"]:
                cells.append("not run")
            elif row.get("pending") and not row["test_values"]:
                cells.append("pending")
            else:
                n = len(row["test_values"])
                shown = _fmt(row["test_mean"], 3) + (f" ± {_fmt(row['test_std'], 3)}" if n > 1 else "")
                cells.append(f"{shown} (n={n}, lr {row['chosen_lr']:g})")
                if row["gap_closed"] is not None and m not in ("lora", "full") and not undefined:
                    gaps.append(row["gap_closed"])
        gap = (
            "—"
            if not gaps
            else f"{sum(gaps) / len(gaps):.2f} ({len(gaps)} task{'s' if len(gaps) > 1 else ''})"
        )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {gap} |")
    left_out = [
        f"{label}: {reason}" for label, reason in zip(column_labels(summaries), why, strict=True) if reason
    ]
    if left_out:
        lines += ["", "The mean gap closed leaves out " + "; ".join(left_out) + "."]
    return "\n".join(lines)


def load_summary(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `lorapro bench --out {folder}` first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary.setdefault("folder", str(folder))  # tells apart two benchmarks of one task in a table
    return summary
