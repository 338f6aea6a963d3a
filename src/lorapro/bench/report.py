"""The benchmark's outputs: ``summary.json``, ``results.md`` and three PNG figures.

The table follows the paper's layout (one row per method, the task's test metric as
mean +- std over seeds) and adds what a fair comparison needs next to it: the chosen
learning rate, the validation score of every grid point, and the share of the
LoRA-to-full-fine-tuning gap each method closes, (method - LoRA) / (full - LoRA).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .grid import grid_plan, resolution, selection_rule
from .outcomes import BenchResult, MethodOutcome
from .stats import mean, std

__all__ = [
    "combined_table",
    "gap_closed",
    "load_summary",
    "markdown_table",
    "smooth",
    "summarize",
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


def summarize(result: BenchResult) -> dict[str, Any]:
    metric = result.task.report_metric.name
    means = {o.method: mean(o.test_values(metric)) for o in result.outcomes if o.runs}
    lora, full = means.get("lora", math.nan), means.get("full", math.nan)
    higher = result.task.report_metric.higher_is_better
    methods = []
    for o in result.outcomes:
        values = o.test_values(metric)
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
            "seeds": [r.seed for r in o.runs],
            "gap_closed": gap_closed(mean(values), lora, full, higher) if values else None,
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
        "selection_metric": {
            "name": result.task.selection_metric.name,
            "higher_is_better": result.task.selection_metric.higher_is_better,
            "split": "validation",
        },
        "selection_rule": selection_rule(result.task.selection_metric),
        "grid_plan": grid_plan(result.config.lr_grid, result.config.extend_grid, result.config.refine),
        "task_info": result.task_info,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(result.config).items()},
        "environment": result.environment,
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs_executed": result.runs_executed,
        "runs_reused": result.runs_reused,
        "methods": methods,
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
        f"| method | chosen lr (resolution) | test {metric} (mean ± std, n) | gap closed | "
        + " | ".join(f"val {sel} @ {lr:g}" for lr in grid)
        + " | other test metrics (mean) | train s/run | peak MB |"
    )
    lines = [head, "| " + " | ".join(["---"] + ["---:"] * (len(grid) + 6)) + " |"]
    for row in summary["methods"]:
        if row["unavailable"] or (row.get("pending") and not row["test_values"]):
            why = f"not run: {row['unavailable']}" if row["unavailable"] else f"pending: {row['pending']}"
            vals = [
                _fmt(row["grid_validation"][f"{lr:g}"].get(sel))
                if f"{lr:g}" in row["grid_validation"]
                else "—"
                for lr in grid
            ]
            cells = ["—", why.replace("|", "/"), "—", *vals, "", "", ""]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
            continue
        n = len(row["test_values"])
        score = f"{_fmt(row['test_mean'])} ± {_fmt(row['test_std'])} ({n})"
        gap = "—" if row["method"] in ("lora", "full") else _fmt(row["gap_closed"], 2)
        vals = [
            _fmt(row["grid_validation"][f"{lr:g}"].get(sel)) if f"{lr:g}" in row["grid_validation"] else "—"
            for lr in grid
        ]
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
        f"Data: {info.get('sizes')}; {info.get('data_notes', '')}",
        f"Each method's learning rate: {summary['selection_rule']}; that rate then runs on "
        f"{cfg['seeds']} seed(s) and is scored on the test split. {summary['grid_plan']} "
        "Resolution (next to the chosen rate): the largest ratio between the chosen rate and a tried "
        "neighbour (edge: not bracketed on one side). "
        "Gap closed = (method - LoRA) / (full - LoRA) on the test mean; n/a when full fine-tuning "
        "does not beat LoRA (there is no gap to close).",
        "",
        markdown_table(summary),
        "",
        f"Runs executed now: {summary['runs_executed']}; reused from earlier invocations: "
        f"{summary['runs_reused']}. Peak memory is the process's resident set sampled during the run "
        "on CPU (the allocator's peak on CUDA).",
        "",
    ]
    choices = [
        f"- {row['method']}: {row['choice_rule']}" for row in summary["methods"] if row.get("choice_rule")
    ]
    if choices:
        lines += ["## How each rate was chosen", "", *choices, ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: per-step losses at batch 32 are too noisy to compare by eye."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plots(result: BenchResult, summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or CI; must precede pyplot's import
    import matplotlib.pyplot as plt

    done: list[MethodOutcome] = [o for o in result.outcomes if o.runs]
    if not done:
        return []
    metric = summary["report_metric"]
    sel = summary["selection_metric"]["name"]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, o in enumerate(done):
        curve = o.runs[0].loss_curve
        window = max(1, len(curve) // 15)
        ax.plot(
            range(1, len(curve) + 1),
            smooth(curve, window),
            color=f"C{i % 10}",
            label=f"{o.method} (lr {o.chosen_lr:g})",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(
        f"training loss (moving average over {max(1, len(done[0].runs[0].loss_curve) // 15)} steps)"
    )
    ax.set_title(f"{summary['task']}: training loss at each method's chosen lr, seed 0")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(done) + 2), 4.5), dpi=120)
    rows = {r["method"]: r for r in summary["methods"]}
    means = [rows[o.method]["test_mean"] for o in done]
    stds = [rows[o.method]["test_std"] for o in done]
    ax.bar(range(len(done)), means, yerr=stds, capsize=4, color=[f"C{i % 10}" for i in range(len(done))])
    for i, o in enumerate(done):
        ax.scatter([i] * len(o.runs), o.test_values(metric), color="black", s=8, zorder=3)
    ax.set_xticks(range(len(done)), [o.method for o in done], rotation=30, ha="right")
    finite = [m for m in means if m is not None and math.isfinite(m)]
    if finite:
        spread = max(finite) - min(finite)
        lo = min(finite) - max(0.05, 1.5 * spread) - max((s or 0) for s in stds)
        ax.set_ylim(bottom=max(0.0, lo) if result.task.report_metric.higher_is_better else None)
    ax.set_ylabel(f"test {metric} (mean ± std; dots: seeds)")
    ax.set_title(f"{summary['task']}: test {metric}, tuned lr, {summary['config']['seeds']} seed(s)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "test_bars.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, o in enumerate(done):
        lrs = sorted(o.grid)
        ax.plot(
            lrs, [o.grid[lr].get(sel, math.nan) for lr in lrs], marker="o", color=f"C{i % 10}", label=o.method
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {sel} (seed 0)")
    ax.set_title(f"{summary['task']}: learning-rate sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "lr_sweep.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def write_reports(result: BenchResult, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    figures = _plots(result, summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(_markdown(summary, figures), encoding="utf-8")
    log("")
    log(summary["grid_plan"])
    log(markdown_table(summary))
    log("")
    log(f"Table: {out / 'results.md'}; summary: {out / 'summary.json'}")
    log(f"Figures: {', '.join(str(p) for p in figures)}")
    return {"summary": out / "summary.json", "markdown": out / "results.md", **{p.stem: p for p in figures}}


def combined_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The paper's layout across tasks: one row per method, one column per task (test mean ± std).

    Each cell also gives the chosen learning rate; the last column averages the share of the
    LoRA-to-full gap closed over the tasks where it is defined.
    """
    methods: list[str] = []
    for s in summaries:
        for row in s["methods"]:
            if row["method"] not in methods:
                methods.append(row["method"])
    head = (
        "| method | "
        + " | ".join(f"{s['task']} ({s['report_metric']})" for s in summaries)
        + " | mean gap closed |"
    )
    lines = [head, "| --- | " + " | ".join("---:" for _ in summaries) + " | ---: |"]
    for m in methods:
        cells, gaps = [], []
        for s in summaries:
            row = next((r for r in s["methods"] if r["method"] == m), None)
            if row is None:
                cells.append("—")
            elif row["unavailable"]:
                cells.append("not run")
            elif row.get("pending") and not row["test_values"]:
                cells.append("pending")
            else:
                cells.append(
                    f"{_fmt(row['test_mean'], 3)} ± {_fmt(row['test_std'], 3)} "
                    f"(n={len(row['test_values'])}, lr {row['chosen_lr']:g})"
                )
                if row["gap_closed"] is not None and m not in ("lora", "full"):
                    gaps.append(row["gap_closed"])
        gap = (
            "—"
            if not gaps
            else f"{sum(gaps) / len(gaps):.2f} ({len(gaps)} task{'s' if len(gaps) > 1 else ''})"
        )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def load_summary(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `lorapro bench --out {folder}` first")
    return json.loads(path.read_text(encoding="utf-8"))
