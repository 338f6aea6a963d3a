"""Figures of the gradient diagnostics in the paper's layout (Appendix D.2, Figure 4).

Rows are module kinds (q, k, v, o, up, down, gate for Llama; the BERT names map onto the
same kinds, see :func:`lorapro.diagnostics.module_kind`), columns are a shallow, a middle
and a deep block, lines are measured steps. Input is any iterable of
:class:`~lorapro.diagnostics.LayerRecord` or of their dicts (e.g. :func:`read_jsonl`), so
figures can be redrawn from saved records without re-training.

matplotlib is imported inside the functions with the Agg backend: no display is needed,
and ``import lorapro`` never pays for matplotlib.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._extras import raise_missing_extra
from .diagnostics import KIND_ORDER, LayerRecord, summarize

__all__ = ["choose_layers", "plot_distances", "plot_spectra", "plot_summary", "write_figures"]

logger = logging.getLogger(__name__)

Record = LayerRecord | Mapping[str, Any]

ESTIMATORS = {"lora": "LoRA", "pro": "LoRA-Pro"}
_EST_COLOR = {"lora": "C0", "pro": "C3"}
_RUN_STYLES = ("-", "--", ":", "-.")
METRICS = {
    "rel_distance": r"$\|\tilde g - g\|_F \,/\, \|g\|_F$",
    "distance": r"$\|\tilde g - g\|_F$",
    "cosine": r"$\cos(\tilde g, g)$",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise_missing_extra(exc, "lorapro's diagnostics figures")

    matplotlib.use("Agg")  # servers and CI have no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _label_panel(ax: Any, i: int, j: int, rows: list, cols: list) -> None:
    """Column titles on the top row, module kinds on the left, steps on the bottom."""
    if i == 0:
        ax.set_title(_col_title(cols[j], j, len(cols)), fontsize=10)
    if j == 0:
        ax.set_ylabel(rows[i], fontsize=10)
    if i == len(rows) - 1:
        ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def _panel_grid(n_rows: int, n_cols: int) -> tuple[Any, Any, Any]:
    """The paper's layout: one panel per (module kind, depth), shared step axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(3.6 * n_cols, 1.9 * n_rows + 1.0),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    return plt, fig, axes


def _dicts(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [r.to_dict() if isinstance(r, LayerRecord) else dict(r) for r in records]


def choose_layers(indices: Iterable[int]) -> list[int]:
    """Shallow, middle and deep block among the measured indices (all of them if <= 3)."""
    unique = sorted(set(indices))
    if len(unique) <= 3:
        return unique
    return [unique[0], unique[len(unique) // 2], unique[-1]]


def _row_key(d: Mapping[str, Any], multi_stack: bool) -> str:
    # Only prefix the stack when there are several (T5 encoder/decoder): BERT's
    # "bert.encoder.layer" would just clutter every label.
    return f"{d['stack'].rstrip('.')} {d['module_kind']}" if multi_stack else d["module_kind"]


def _grid(
    rows_data: list[dict[str, Any]], layers: Sequence[int] | None
) -> tuple[list[str], list[int], list[dict[str, Any]], bool]:
    indexed = [d for d in rows_data if d.get("layer_index") is not None]
    if not indexed:
        raise ValueError("no record has a block index in its module name; nothing to lay out by depth")
    multi_stack = len({d["stack"] for d in indexed}) > 1
    cols = list(layers) if layers is not None else choose_layers(d["layer_index"] for d in indexed)
    used = [d for d in indexed if d["layer_index"] in cols]
    if not used:
        raise ValueError(f"no record in layers {cols}")
    kinds = {_row_key(d, multi_stack) for d in used}

    def order(key: str) -> tuple[int, str]:
        kind = key.rsplit(" ", 1)[-1]
        stack = key[: -len(kind)]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), stack + kind)

    return sorted(kinds, key=order), cols, used, multi_stack


def _col_title(col: int, position: int, n_cols: int) -> str:
    if n_cols == 3:
        return f"{('shallow', 'middle', 'deep')[position]} (layer {col})"
    return f"layer {col}"


def _series_key(d: Mapping[str, Any], multi_adapter: bool) -> str:
    return f"{d['run']}/{d['adapter']}" if multi_adapter else d["run"]


def _finish(fig: Any, plt: Any, path: str | Path, dpi: int) -> Path:
    """Save as a 256-colour palette PNG: line plots lose nothing visible, and the file shrinks
    ~3x (a full grid drops from ~380 KB to ~120 KB), small enough to commit next to the docs."""
    from PIL import Image  # a dependency of matplotlib itself

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    return path


def plot_distances(
    records: Iterable[Record],
    path: str | Path,
    *,
    metric: str = "rel_distance",
    curves: Sequence[tuple[str, str]] | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Equivalent-gradient distance to the full gradient over training, per module kind and depth.

    Args:
        records: layer records (from :class:`~lorapro.diagnostics.GradientMonitor` or
            :func:`~lorapro.diagnostics.read_jsonl`), possibly of several runs.
        path: the PNG to write.
        metric: ``"rel_distance"`` (default, scale-free), ``"distance"`` (the paper's
            ``||g~ - g||_F``) or ``"cosine"``.
        curves: which ``(run, estimator)`` lines to draw, estimator ``"lora"`` or ``"pro"``;
            default: both estimators for every run. Colour is the estimator, line style the
            run. With runs ``"lora"`` and ``"lorapro"``, ``[("lora", "lora"), ("lorapro", "pro")]``
            is the paper's figure: each method's own equivalent gradient along its own training.
        layers: block indices for the columns (default: shallow, middle, deep).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    data = _dicts(records)
    rows, cols, used, multi_stack = _grid(data, layers)
    multi_adapter = len({d["adapter"] for d in used}) > 1
    runs = list(dict.fromkeys(_series_key(d, multi_adapter) for d in used))
    if curves is None:
        curves = [(run, est) for run in runs for est in ESTIMATORS]
    for _, est in curves:
        if est not in ESTIMATORS:
            raise ValueError(f"unknown estimator {est!r}: use 'lora' or 'pro'")
    style = {run: _RUN_STYLES[i % len(_RUN_STYLES)] for i, run in enumerate(runs)}
    if len({run for run, _ in curves}) == len(curves):
        # One curve per run (the paper's view): colour alone tells them apart.
        style = dict.fromkeys(runs, "-")

    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for d in used:
        key = (_row_key(d, multi_stack), d["layer_index"], _series_key(d, multi_adapter))
        cells.setdefault(key, []).append(d)

    plt, fig, axes = _panel_grid(len(rows), len(cols))
    finite: list[float] = []
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            for run, est in curves:
                points = sorted(cells.get((row, col, run), []), key=lambda d: d["step"])
                if not points:
                    continue
                xs = [d["step"] for d in points]
                ys = [_value(d, f"{est}_{metric}") for d in points]
                finite += [y for y in ys if math.isfinite(y) and y > 0]
                label = ESTIMATORS[est] if len(runs) == 1 else f"{ESTIMATORS[est]} $\\tilde g$, {run} run"
                ax.plot(
                    xs, ys, style.get(run, "-"), color=_EST_COLOR[est], marker=".", markersize=3, label=label
                )
            _label_panel(ax, i, j, rows, cols)
    # Distances of LoRA and LoRA-Pro can differ by orders of magnitude (LoRA's equivalent
    # gradient scales with s^2 and the factor norms); a log axis keeps both readable.
    if metric != "cosine" and finite and max(finite) / min(finite) > 20:
        for ax in axes.flat:
            ax.set_yscale("log")
    handles, labels = _legend_entries(axes)
    fig.suptitle(title or f"{METRICS[metric]} per layer", fontsize=11)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, max(1, len(labels))), fontsize=9)
    return _finish(fig, plt, path, dpi)


def _legend_entries(axes: Any) -> tuple[list[Any], list[str]]:
    """One legend entry per label over all panels (a panel may lack some curves)."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _value(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    return math.nan if v is None else float(v)


def plot_spectra(
    records: Iterable[Record],
    path: str | Path,
    *,
    run: str | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Singular values of A (blue) and B (orange) over training, per module kind and depth.

    One run per figure (``run``; default: the only run, or the first one). Each panel shows
    all r singular values of each factor on a log axis (zeros, such as PEFT's B = 0 at step
    0, cannot be drawn and leave a gap) and the numerical ranks at the last measured step.
    """
    data = _dicts(records)
    runs = list(dict.fromkeys(d["run"] for d in data))
    if not runs:
        raise ValueError("no records")
    run = runs[0] if run is None else run
    data = [d for d in data if d["run"] == run]
    if not data:
        raise ValueError(f"no records of run {run!r} (runs: {', '.join(runs)})")
    rows, cols, used, multi_stack = _grid(data, layers)
    adapter = used[0]["adapter"]  # one adapter per figure keeps the panels readable
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for d in used:
        if d["adapter"] == adapter:
            cells.setdefault((_row_key(d, multi_stack), d["layer_index"]), []).append(d)

    plt, fig, axes = _panel_grid(len(rows), len(cols))
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            points = sorted(cells.get((row, col), []), key=lambda d: d["step"])
            if points:
                steps = [d["step"] for d in points]
                for factor, color in (("A", "C0"), ("B", "C1")):
                    width = max(len(d[f"sv_{factor}"]) for d in points)
                    for k in range(width):
                        ys = [_positive(d[f"sv_{factor}"], k) for d in points]
                        ax.plot(
                            steps, ys, color=color, alpha=0.6, linewidth=1, label=factor if k == 0 else None
                        )
                last = points[-1]
                ax.text(
                    0.98,
                    0.04,
                    f"rank A {last['rank_A']}, B {last['rank_B']} / r={last['r']}",
                    transform=ax.transAxes,
                    ha="right",
                    fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
                )
                ax.set_yscale("log")
            _label_panel(ax, i, j, rows, cols)
    handles, labels = _legend_entries(axes)
    names = {"A": "singular values of A", "B": "singular values of B"}
    fig.suptitle(title or f"Singular values of the LoRA factors ({run})", fontsize=11)
    fig.legend(handles, [names[x] for x in labels], loc="outside lower center", ncol=2, fontsize=9)
    return _finish(fig, plt, path, dpi)


def _positive(values: Sequence[float], k: int) -> float:
    if k >= len(values) or values[k] is None:
        return math.nan
    v = float(values[k])
    return v if v > 0 else math.nan


def plot_summary(
    records: Iterable[Record], path: str | Path, *, title: str | None = None, dpi: int = 100
) -> Path:
    """Two panels over steps: the median over layers of the relative distance and of the cosine,
    for each run and estimator (colour: estimator, line style: run)."""
    rows = summarize(records)
    if not rows:
        raise ValueError("no records")
    runs = list(dict.fromkeys(r["run"] for r in rows))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for k, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        steps = [r["step"] for r in mine]
        for est in ESTIMATORS:
            label = ESTIMATORS[est] if len(runs) == 1 else f"{ESTIMATORS[est]} $\\tilde g$, {run} run"
            line = _RUN_STYLES[k % len(_RUN_STYLES)]
            for ax, metric in zip(axes, ("rel_distance", "cosine"), strict=True):
                ys = [r[f"{est}_{metric}"] for r in mine]
                ax.plot(steps, ys, line, color=_EST_COLOR[est], marker=".", markersize=3, label=label)
    axes[0].set_ylabel("median over layers of " + METRICS["rel_distance"])
    axes[1].set_ylabel("median over layers of " + METRICS["cosine"])
    finite = [r[f"{e}_rel_distance"] for r in rows for e in ESTIMATORS]
    finite = [v for v in finite if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        axes[0].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title or "Equivalent gradient vs full gradient, all LoRA layers", fontsize=11)
    return _finish(fig, plt, path, dpi)


def write_figures(
    records: Iterable[Record],
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    paper_runs: tuple[str, str] = ("lora", "lorapro"),
) -> list[Path]:
    """Every standard figure into ``out_dir``; returns the paths written.

    ``summary.png``; ``distances.png`` and ``cosine.png`` (every run and estimator);
    ``spectra_<run>.png`` per run; and ``distances_paper.png`` when both runs of
    ``paper_runs`` are present: LoRA's equivalent gradient along the LoRA run and LoRA-Pro's
    along the LoRA-Pro run, the comparison of the paper's Figure 4. The per-layer figures need
    block indices in the module names; without them only the summary is drawn (logged).
    """
    data = _dicts(records)
    if not data:
        raise ValueError("no records")
    out = Path(out_dir)
    paths = [plot_summary(data, out / "summary.png")]
    runs = list(dict.fromkeys(d["run"] for d in data))
    try:
        paths.append(plot_distances(data, out / "distances.png", layers=layers))
        paths.append(plot_distances(data, out / "cosine.png", metric="cosine", layers=layers))
        if all(run in runs for run in paper_runs):
            lora_run, pro_run = paper_runs
            paths.append(
                plot_distances(
                    data,
                    out / "distances_paper.png",
                    curves=[(lora_run, "lora"), (pro_run, "pro")],
                    layers=layers,
                    title="Each method's own equivalent gradient along its own training: "
                    + METRICS["rel_distance"],
                )
            )
        for run in runs:
            paths.append(plot_spectra(data, out / f"spectra_{run or 'run'}.png", run=run, layers=layers))
    except ValueError as exc:  # no block index in the module names: no depth columns
        logger.warning("lorapro diagnostics: per-layer figures skipped: %s", exc)
    return paths
