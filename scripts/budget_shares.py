"""The share of full mode's gain over LoRA that each method keeps, per task and training budget.

Usage:
    python scripts/budget_shares.py --out results/budget_shares.png \
        results/trec results/trec-long results/fashion results/fashion-long

Each folder is one `lorapro bench` output (its summary.json and runs/). Folders of the same task
are that task's budgets, labelled by the number of optimizer steps per run. The share is
(method - LoRA) / (lorapro-full - LoRA) on the test mean over seeds: LoRA is 0%, full mode 100%.
It is undefined where full mode does not beat LoRA, and says little where full mode's gain over
LoRA is within noise (the bench's verdict), so the figure and the table say which case each
budget is in. Prints the table as markdown and draws a bar chart (bars from zero, values
written on them).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lorapro.bench.report import gap_closed, load_summary

REFERENCE, FULL_MODE = "lora", "lorapro-full"
DEFAULT_METHODS = ("full", "lorapro", "lorapro-factored", "riemannian")


def steps_per_run(folder: Path) -> int | None:
    """Optimizer steps of one stored LoRA run (all methods of a folder train the same steps)."""
    for path in sorted((Path(folder) / "runs" / REFERENCE).glob("*.json")):
        return int(json.loads(path.read_text(encoding="utf-8"))["result"]["steps"])
    return None


def _row(summary: dict[str, Any], method: str) -> dict[str, Any] | None:
    for row in summary["methods"]:
        if row["method"] == method and row.get("test_values"):
            return row
    return None


def _verdict(summary: dict[str, Any], method: str, reference: str) -> dict[str, Any] | None:
    for c in summary.get("verdict", {}).get("comparisons", []):
        if c["method"] == method and c["reference"] == reference:
            return c
    return None


def budget(folder: Path, methods: list[str]) -> dict[str, Any]:
    """One task at one budget: full mode's gain over LoRA, its verdict, and each method's share."""
    summary = load_summary(folder)
    lora, full_mode = _row(summary, REFERENCE), _row(summary, FULL_MODE)
    out: dict[str, Any] = {"task": summary["task"], "folder": str(folder), "steps": steps_per_run(folder)}
    out["metric"] = summary["report_metric"]
    if lora is None or full_mode is None:
        out.update(gain=None, verdict=None, shares={m: None for m in methods}, means={}, missing={})
        return out
    higher = summary.get("report_metric_higher_is_better", True)
    gain = (full_mode["test_mean"] - lora["test_mean"]) * (1 if higher else -1)  # > 0: full mode is better
    verdict = _verdict(summary, FULL_MODE, REFERENCE)
    out.update(gain=gain, verdict=verdict, means={}, missing={})
    shares: dict[str, float | None] = {}
    for m in methods:
        row = _row(summary, m)
        if row is None:
            unavailable = any(r["method"] == m and r.get("unavailable") for r in summary["methods"])
            out["missing"][m] = "unavailable" if unavailable else "not run"
        out["means"][m] = (
            None if row is None else (row["test_mean"], len(row["test_values"]), row["chosen_lr"])
        )
        # the bench's gap closed, with full mode in full fine-tuning's place (None when gain <= 0)
        shares[m] = (
            None
            if row is None
            else gap_closed(row["test_mean"], lora["test_mean"], full_mode["test_mean"], higher)
        )
    out["shares"] = shares
    return out


def _state(b: dict[str, Any]) -> str:
    """How far a budget's shares can be read: 'resolved', 'within noise' or 'undefined'."""
    if b["gain"] is None or b["gain"] <= 0:
        return "undefined"
    v = b["verdict"]
    return "resolved" if v is not None and v["verdict"] == "better" else "within noise"


def _gain_text(b: dict[str, Any]) -> str:
    if b["gain"] is None:
        return "full mode or LoRA not run"
    v = b["verdict"]
    # accuracy in points (x100); any other metric in its own units
    scale, unit = (100, " points") if b["metric"] == "accuracy" else (1, f" {b['metric']}")
    interval = ""
    if v is not None and v.get("low") is not None:
        interval = f", 95% interval {scale * v['low']:+.3g} to {scale * v['high']:+.3g}"
    if interval and v.get("kind") == "seeds":
        interval += " over seeds"
    return f"{scale * b['gain']:+.3g}{unit}{interval} ({v['verdict'] if v else 'no verdict'})"


def markdown(budgets: list[dict[str, Any]], methods: list[str]) -> str:
    head = "| task | steps per run | full mode - LoRA (test) | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for b in budgets:
        cells = []
        for m in methods:
            share = b["shares"].get(m)
            mean = b["means"].get(m)
            if mean is None:
                cells.append(b["missing"].get(m, "not run"))
            elif share is None:
                cells.append(f"undefined ({mean[0]:.3f})")
            else:
                cells.append(f"{100 * share:.0f}% ({mean[0]:.3f}, n={mean[1]}, lr {mean[2]:g})")
        lines.append(f"| {b['task']} | {b['steps']} | {_gain_text(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(budgets: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tasks = list(dict.fromkeys(b["task"] for b in budgets))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 6), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = sorted((b for b in budgets if b["task"] == task), key=lambda b: b["steps"] or 0)
        width = 0.8 / max(1, len(mine))
        values: list[float] = [0.0, 1.0]
        legend: list[Any] = []
        for j, b in enumerate(mine):
            state = _state(b)
            xs = [i + (j - (len(mine) - 1) / 2) * width for i in range(len(methods))]
            hatch = "//" if state != "resolved" else None
            # one legend entry per budget, drawn or not: it says what the budget's gain was
            legend.append(Patch(facecolor=f"C{j}", hatch=hatch, edgecolor="black", linewidth=0.5,
                                label=f"{b['steps']} steps: full mode {_gain_text(b)}"))  # fmt: skip
            for x, m in zip(xs, methods, strict=True):
                share = b["shares"].get(m)
                if b["means"].get(m) is None or share is None or not math.isfinite(share):
                    why = b["missing"].get(m, "not run") if b["means"].get(m) is None else "undefined"
                    ax.text(x, 0.02, why, rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                values.append(share)
                ax.bar(
                    x, share, width=width * 0.95, color=f"C{j}", hatch=hatch, edgecolor="black",
                    linewidth=0.5,
                )  # fmt: skip
                ax.text(
                    x,
                    share,
                    f"{100 * share:.0f}%",
                    ha="center",
                    va="bottom" if share >= 0 else "top",
                    fontsize=8,
                )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        low, high = min(values), max(values)
        pad = 0.12 * (high - low)
        ax.set_ylim(min(0.0, low) - pad, high + pad)  # zero always on the axis
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_xticks(range(len(methods)), methods, rotation=15)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_ylabel("share of full mode's gain over LoRA\n(test mean; LoRA 0%, full mode 100%, dashed)")
        ax.set_title(task)
        ax.legend(
            handles=legend, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
            title="hatched: full mode's gain over LoRA within noise or absent", title_fontsize=7,
        )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="lorapro bench output folders")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to show"
    )
    parser.add_argument("--out", type=Path, help="where to write the bar chart (PNG)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    budgets = [budget(folder, methods) for folder in args.folders]
    print(markdown(budgets, methods))
    if args.out is not None:
        draw(budgets, methods, args.out)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
