"""The benchmark's figures, drawn so that they do not mislead:

- ``lr_sweep.png``: every method's validation score by learning rate, each with its own marker,
  line style and a small sideways offset (so that coinciding lines stay visible), its chosen
  rate ringed; a loss on a log axis, clipped above with the clipped points marked.
- ``test_bars.png``: the test score on the metric the rates were chosen on, bars from zero with
  their values written on them, one dot per seed.
- ``diff_vs_lora.png``: each method minus LoRA (and minus full fine-tuning) with its 95%
  interval, coloured by the verdict.
- ``loss_curves.png``: the training loss at each chosen rate (seed 0), log axis when it spans
  more than a factor of 5, the final validation score in the legend; beside it, the validation
  selection metric by step where the runs recorded it (``--eval-every N``), else a note saying
  how to record it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outcomes import BenchResult
from .records import validation_curve_of

__all__ = ["LINESTYLES", "MARKERS", "clip_top", "smooth", "style", "write_figures"]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
#: Sideways offset between neighbouring methods' markers, in points (a display offset: the
#: data, and so the rate a point stands for, are unchanged).
OFFSET_POINTS = 3.0
#: Loss axes stop at this multiple of the best value; worse points are drawn at the edge.
LOSS_CLIP = 3.0
VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "within noise": "tab:gray", "n/a": "silver"}


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: per-step losses at batch 32 are too noisy to compare by eye."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def style(i: int) -> dict[str, Any]:
    """Method i's colour, marker and line style: no two of the first 12 methods share all three."""
    return {
        "color": f"C{i % 10}",
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
    }


def clip_top(values: Sequence[float], higher_is_better: bool) -> float | None:
    """The upper axis limit of a loss sweep: LOSS_CLIP x the best value, or None to leave the axis
    alone (a score where higher is better, or nothing that far off)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if higher_is_better or not finite:
        return None
    cap = LOSS_CLIP * min(finite)
    return cap if max(finite) > cap else None


def write_figures(result: BenchResult, summary: dict[str, Any], out: Path) -> list[Path]:
    """Draw the figures into ``out``; returns their paths (none when no method has finished)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or CI; must precede pyplot's import
    import matplotlib.pyplot as plt

    done = [o for o in result.outcomes if o.runs]
    if not done:
        return []
    index = {o.method: i for i, o in enumerate(result.outcomes)}
    paths = [
        _loss_curves(plt, result, summary, done, index, out / "loss_curves.png"),
        _test_bars(plt, summary, done, index, out / "test_bars.png"),
        _lr_sweep(plt, result, summary, index, out / "lr_sweep.png"),
    ]
    diff = _differences(plt, summary, out / "diff_vs_lora.png")
    if diff is not None:
        paths.append(diff)
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _loss_curves(plt: Any, result: BenchResult, summary: dict, done: list, index: dict, path: Path) -> Path:
    sel = summary["selection_metric"]["name"]
    curves = {o.method: validation_curve_of(o.runs[0]) for o in done}
    curves = {m: c for m, c in curves.items() if sel in (c.get("metrics") or {})}
    if curves:
        fig, (ax, vax) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=120)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    window = max(1, len(done[0].runs[0].loss_curve) // 15)
    shown: list[float] = []
    for o in done:
        curve = o.runs[0].loss_curve
        smoothed = smooth(curve, max(1, len(curve) // 15))
        shown += [v for v in smoothed if math.isfinite(v) and v > 0]
        s = style(index[o.method])
        val = o.runs[0].validation.get(sel, math.nan)
        ax.plot(
            range(1, len(curve) + 1), smoothed, color=s["color"], linestyle=s["linestyle"],
            label=f"{o.method} (lr {o.chosen_lr:g}; final val {sel} {val:.4f})",
        )  # fmt: skip
    if shown and max(shown) > 5 * min(shown):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss (moving average over {window} steps)")
    title = f"{summary['task']}: training loss at each method's chosen lr, seed 0"
    if not curves:
        title += "\n(no validation curve recorded: run with --eval-every N to record it)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if curves:
        for o in done:
            if o.method not in curves:
                continue
            c, s = curves[o.method], style(index[o.method])
            vax.plot(c["steps"], c["metrics"][sel], color=s["color"], linestyle=s["linestyle"],
                     marker=s["marker"], markersize=4, label=f"{o.method} (lr {o.chosen_lr:g})")  # fmt: skip
        missing = [o.method for o in done if o.method not in curves]
        every = sorted({c.get("every") for c in curves.values()} - {None})
        note = f"every {', '.join(map(str, every))} steps and at the end" if every else "during training"
        vax.set_xlabel("training step")
        vax.set_ylabel(f"validation {sel}")
        vax.set_title(
            f"validation {sel} ({note})"
            + (f"\nnot recorded for {', '.join(missing)} (run with --eval-every N)" if missing else ""),
            fontsize=10,
        )
        vax.set_xlim(ax.get_xlim())
        vax.grid(True, alpha=0.3)
        vax.legend(fontsize=8)
    return _save(plt, fig, path)


def _test_bars(plt: Any, summary: dict, done: list, index: dict, path: Path) -> Path:
    sel = summary["selection_metric"]["name"]
    rows = {r["method"]: r for r in summary["methods"]}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(done) + 2), 4.8), dpi=120)
    means = [rows[o.method]["selection_test_mean"] for o in done]
    stds = [(rows[o.method]["selection_test_std"] or 0.0) if len(o.runs) > 1 else 0.0 for o in done]
    heights = [m if m is not None and math.isfinite(m) else 0.0 for m in means]
    colours = [style(index[o.method])["color"] for o in done]
    several = any(len(o.runs) > 1 for o in done)
    ax.bar(range(len(done)), heights, yerr=stds if several else None, capsize=4, color=colours, alpha=0.85)
    for i, o in enumerate(done):
        ax.scatter([i] * len(o.runs), o.test_values(sel), color="black", s=8, zorder=3)
        label = "n/a" if means[i] is None or not math.isfinite(means[i]) else f"{means[i]:.4f}"
        if label != "n/a" and len(o.runs) > 1:  # one seed has no spread to show
            label += f"\n± {stds[i]:.4f}"
        ax.annotate(label, (i, heights[i] + stds[i]), textcoords="offset points", xytext=(0, 3),
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(done)), [o.method for o in done], rotation=30, ha="right")
    ax.set_ylim(bottom=0, top=max(h + s for h, s in zip(heights, stds, strict=True)) * 1.18 or 1)
    what = "bars from 0: mean ± std; dots: seeds" if several else "one seed"
    ax.set_ylabel(f"test {sel} ({what})")
    note = ""
    if summary["report_metric"] != sel:
        note = f"\n(the rates were chosen on {sel}; {summary['report_metric']} is in results.md's table)"
    ax.set_title(
        f"{summary['task']}: test {sel}, tuned lr, {summary['config']['seeds']} seed(s){note}", fontsize=10
    )
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _lr_sweep(plt: Any, result: BenchResult, summary: dict, index: dict, path: Path) -> Path:
    from matplotlib.transforms import ScaledTranslation

    sel = summary["selection_metric"]["name"]
    higher = summary["selection_metric"]["higher_is_better"]
    tried = [o for o in result.outcomes if o.grid]
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    scores = [m.get(sel, math.nan) for o in tried for m in o.grid.values()]
    top = clip_top(scores, higher)
    clipped = at_edge = False
    for k, o in enumerate(tried):
        s = style(index[o.method])
        shift = (k - (len(tried) - 1) / 2) * OFFSET_POINTS / 72
        trans = ax.transData + ScaledTranslation(shift, 0, fig.dpi_scale_trans)
        lrs = sorted(o.grid)
        ys = [o.grid[lr].get(sel, math.nan) for lr in lrs]
        drawn = [min(y, top) if top is not None and math.isfinite(y) else y for y in ys]
        ax.plot(lrs, drawn, transform=trans, color=s["color"], linestyle=s["linestyle"], marker=s["marker"],
                markersize=5, linewidth=1.4, alpha=0.9, label=o.method)  # fmt: skip
        over = [
            (lr, y) for lr, y in zip(lrs, ys, strict=True) if top is not None and math.isfinite(y) and y > top
        ]
        for lr, y in over:
            clipped = True
            ax.plot([lr], [top], transform=trans, marker="^", color=s["color"], markersize=8, clip_on=False)
            # Right of the marker, clear of it and of the line, staggered by method so that two
            # clipped points at one rate keep readable values.
            ax.annotate(f"{y:.3g}", (lr, top), xycoords=trans, textcoords="offset points",
                        xytext=(7, -4 - 8 * (k % 4)), ha="left", va="top", fontsize=6,
                        color=s["color"])  # fmt: skip
        for lr in o.diverged:
            y = o.grid[lr].get(sel, math.nan)
            if math.isfinite(y):
                ax.plot(
                    [lr],
                    [min(y, top) if top else y],
                    transform=trans,
                    marker="x",
                    color="black",
                    markersize=7,
                )
        if o.chosen_lr is not None:
            y = o.grid[o.chosen_lr].get(sel, math.nan)
            ax.plot([o.chosen_lr], [min(y, top) if top else y], transform=trans, marker="o", markersize=13,
                    markerfacecolor="none", markeredgecolor=s["color"], markeredgewidth=2)  # fmt: skip
            if len(lrs) > 1 and o.chosen_lr in (lrs[0], lrs[-1]):
                at_edge = True
                ax.annotate("edge", (o.chosen_lr, min(y, top) if top else y), xycoords=trans,
                            textcoords="offset points", xytext=(0, 9), ha="center", fontsize=7,
                            fontweight="bold", color=s["color"])  # fmt: skip
    # Lines drawn with an offset transform do not widen the data limits by themselves.
    points = [(lr, min(y, top) if top is not None else y) for o in tried for lr, m in o.grid.items()
              if math.isfinite(y := m.get(sel, math.nan)) and (higher or y > 0)]  # fmt: skip
    if points:
        ax.update_datalim(points)
        ax.autoscale_view()
    ax.set_xscale("log")
    if not higher and points:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        # A loss spans less than a decade here: label the minor ticks too, as plain numbers.
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if top is not None:
        ax.set_ylim(top=top * 1.02)
    ax.set_xlabel("learning rate (markers offset sideways by a few points so that equal values stay visible)")
    notes = ["rings: each method's chosen rate"]
    if any(o.diverged for o in tried):
        notes.append("x: diverged")
    if clipped:
        notes.append(f"▲: above {LOSS_CLIP:g}x the best, value written beside it")
    if at_edge:
        notes.append("edge: chosen at the end of the rates tried, a better rate may lie beyond")
    scale = ", log scale" if not higher else ""
    ax.set_ylabel(f"validation {sel} (seed 0{scale})")
    ax.set_title(f"{summary['task']}: learning-rate sweep\n{'; '.join(notes)}", fontsize=9)
    ax.grid(True, alpha=0.3, which="both" if not higher else "major")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _basis(c: dict) -> str:
    return {
        "examples+seeds": "bootstrap over test examples and seeds",
        "examples": "bootstrap over test examples",
        "seeds": "over seeds only (no per-example outcomes stored)",
    }.get(c["kind"], "none: one seed, no per-example outcomes")


def _differences(plt: Any, summary: dict, path: Path) -> Path | None:
    verdict = summary.get("verdict") or {}
    rows = verdict.get("comparisons") or []
    if not rows:
        return None
    refs = list(dict.fromkeys(c["reference"] for c in rows))
    higher = summary["selection_metric"]["higher_is_better"]
    metric = verdict["metric"]
    height = max(2.5, 0.45 * max(sum(c["reference"] == r for c in rows) for r in refs) + 1.5)
    fig, axes = plt.subplots(1, len(refs), figsize=(6.5 * len(refs), height), dpi=120, squeeze=False)
    for ax, ref in zip(axes[0], refs, strict=True):
        mine = [c for c in rows if c["reference"] == ref]
        for y, c in enumerate(mine):
            colour = VERDICT_COLOURS.get(c["verdict"], "black")
            d = c["difference"]
            if c["low"] is not None:
                ax.errorbar(
                    [d], [y], xerr=[[d - c["low"]], [c["high"] - d]], fmt="o", color=colour, capsize=4
                )
            else:
                ax.plot([d], [y], "o", color=colour, markerfacecolor="none")
            ax.annotate(c["verdict"], (d, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color=colour)  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [c["method"] for c in mine])
        ax.set_ylim(-0.7, len(mine) - 0.3)
        ax.invert_yaxis()
        arrow = "→ better" if higher else "← better"
        bases = sorted({_basis(c) for c in mine})
        ax.set_xlabel(f"test {metric}: method - {ref}  ({arrow})\nbars: 95% interval, {'; '.join(bases)}")
        ax.set_title(f"{summary['task']}: difference from {ref}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    return _save(plt, fig, path)
