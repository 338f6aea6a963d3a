"""`lorapro demo`: a short, fair comparison on real data, runnable offline on a laptop CPU.

Every method gets the same seed, the same initial weights, the same data in the same
order and the same step budget; only the optimizer (and with it the learning rate,
which has a different natural scale per method) differs. One seed and one learning rate
per method make this a smoke-level comparison, not a benchmark: the benchmark harness
tunes learning rates on a grid and reports mean +- std over seeds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SetupError
from .figures import smooth
from .harness import environment
from .opening import opening_checks
from .tasks import TaskOptions
from .train import RunResult, TrainConfig, train_and_evaluate

__all__ = [
    "DEFAULT_METHODS",
    "DEMO_LRS",
    "DemoConfigError",
    "DemoReport",
    "markdown_table",
    "plot_loss_curves",
    "run_demo",
]

DEFAULT_METHODS: tuple[str, ...] = ("full", "lora", "lorapro")
# 4000 sentences = 125 steps, ~2 min per method on 2 idle cores. With 2000 (63 steps) both
# methods were still on the initial loss plateau (~0.69 for the first ~40 steps) when
# training ended, so the comparison said little; 3000 was barely past it.
#: Learning rates the benchmark chose for these methods on this task
#: (`scripts/results.sh mr`, results/mr: best validation accuracy on a common grid).
#: Other methods use their registered default.
DEMO_LRS: dict[str, float] = {"full": 5e-4, "lora": 2e-3, "lorapro": 2e-3}
DEFAULT_TRAIN_SIZE = 4000
DEFAULT_VAL_SIZE = 500
DEFAULT_TEST_SIZE = 1000
TASK = "movie-review sentence polarity (Hutto & Gilbert 2014), all-MiniLM-L6-v2"


class DemoConfigError(SetupError):
    """The demo's options are inconsistent (unknown method, more sentences than exist, ...)."""


@dataclass
class DemoReport:
    results: list[RunResult]
    config: dict[str, Any]
    json_path: Path
    plot_path: Path
    table: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def markdown_table(results: Sequence[RunResult]) -> str:
    lines = [
        "| method | lr | final train loss | test accuracy | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        acc = "n/a" if "accuracy" not in r.test else f"{r.test['accuracy']:.4f}"
        lines.append(f"| {r.method} | {r.lr:g} | {r.final_train_loss:.4f} | {acc} | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot_loss_curves(results: Sequence[RunResult], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or CI; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, r in enumerate(results):
        color = f"C{i}"
        steps = range(1, len(r.loss_curve) + 1)
        window = max(1, len(r.loss_curve) // 15)
        acc = "" if "accuracy" not in r.test else f", test acc {r.test['accuracy']:.3f}"
        ax.plot(steps, r.loss_curve, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            steps,
            smooth(r.loss_curve, window),
            color=color,
            linewidth=2,
            label=f"{r.method} (lr {r.lr:g}{acc})",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (faint: per step; solid: moving average)")
    ax.set_title(title or "Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    train_size: int = DEFAULT_TRAIN_SIZE,
    val_size: int = DEFAULT_VAL_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    epochs: int = 1,
    seed: int = 0,
    out: str | Path = "demo-output",
    lrs: Mapping[str, float] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoReport:
    """Fine-tune MiniLM-L6 on movie-review polarity with each method and compare.

    ``lrs`` overrides the per-method default learning rate. Writes ``results.json`` and
    ``loss_curves.png`` into ``out`` and returns them with the results.
    """
    t0 = time.perf_counter()
    # Before the first (minutes-long) run: --out, every method (a later one may not run at all), the data.
    opening = opening_checks(out=out, methods=methods, task="mr", error=DemoConfigError)
    specs, task = opening.methods, opening.task
    methods = [spec.name for spec in specs]  # order kept, repeats dropped
    lrs = dict(lrs or {})
    unknown = set(lrs) - set(methods)
    if unknown:
        raise DemoConfigError(f"learning rate given for method(s) not run: {', '.join(sorted(unknown))}")
    options = TaskOptions(train_size=train_size, val_size=val_size, test_size=test_size, max_length=64)
    try:
        prepared = task.prepare(options)
    except ValueError as exc:
        raise DemoConfigError(f"cannot split the movie reviews that way: {exc}") from None
    sizes = prepared.info["sizes"]
    data_notes = prepared.info["data_notes"]
    base = TrainConfig(lr=0.0, epochs=epochs, seed=seed)
    log(
        f"Task: {TASK}\n"
        f"Data: {sizes['train']} train / {sizes['validation']} validation / "
        f"{sizes['test']} test sentences (split seed 0; {'; '.join(data_notes)}); "
        f"{epochs} epoch(s) of {math.ceil(sizes['train'] / base.batch_size)} steps at batch "
        f"{base.batch_size}, cosine schedule, 3% warm-up, torch threads {torch.get_num_threads()}\n"
        f"Methods: {', '.join(methods)}"
    )

    results: list[RunResult] = []
    for spec in specs:
        lr = lrs.get(spec.name, DEMO_LRS.get(spec.name, spec.default_lr))
        cfg = TrainConfig(lr=lr, epochs=epochs, seed=seed)
        evaluate_on = ("validation", "test") if sizes["validation"] else ("test",)
        result = train_and_evaluate(spec, prepared, cfg, evaluate_on=evaluate_on, progress=progress)
        if result.diverged:
            log(f"warning: {spec.name} produced a non-finite training loss (diverged?)")
        results.append(result)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    title = f"MiniLM-L6 on movie reviews: {sizes['train']} sentences x {epochs} epoch(s), seed {seed}"
    plot_path = plot_loss_curves(results, out / "loss_curves.png", title)
    config = {
        "task": TASK,
        "train_size": sizes["train"],
        "val_size": sizes["validation"],
        "test_size": sizes["test"],
        "seed": seed,
        "methods": methods,
        "data_notes": data_notes,
        "train_config": {k: v for k, v in asdict(base).items() if k != "lr"},
        "versions": environment(),
    }
    json_path = out / "results.json"
    payload = {"config": config, "results": [r.to_dict() for r in results]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    seconds = time.perf_counter() - t0
    log("")
    log(table)
    log("")
    log(
        "One seed and one learning rate per method: a quick look, not a ranking. A fair "
        "comparison tunes each method's learning rate and averages over seeds."
    )
    log(f"Results: {json_path}")
    log(f"Loss curves: {plot_path}")
    log(f"Total wall time: {seconds:.1f} s")
    return DemoReport(results, config, json_path, plot_path, table, seconds)
