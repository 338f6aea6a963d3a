"""`lorapro diagnose`: train with LoRA or LoRA-Pro and record, on chosen steps, how far each
layer's equivalent gradient is from the full gradient (the paper's Appendix D.2 / Figure 4).

Whatever the training method, every measured step records *both* LoRA's and LoRA-Pro's
equivalent gradients for the current A, B and batch; the method only decides the trajectory
of A and B. ``--method lora,lorapro`` runs both trajectories from the same initial weights,
data order and schedule, and adds the paper's view: each method's own equivalent gradient
along its own training (``distances_paper.png``).

Training is :func:`lorapro.bench.train.train_and_evaluate`, the benchmark's own loop (same
methods, seeding, cosine schedule with 3% warm-up), with the monitor wrapped around the
forward and backward pass of every step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorapro.diagnostics import GradientMonitor, LayerRecord, parse_steps, read_jsonl, summarize, write_csv

from .errors import SetupError, run_command
from .methods import METHODS, MethodSpec
from .opening import check_methods, check_task, opening_checks
from .options import DefaultsHelpFormatter, parse_lrs, removed_if_left_empty
from .options import positive_int as _positive_int
from .tasks import PreparedTask, Task, TaskOptions, task_names
from .train import TrainConfig, train_and_evaluate

__all__ = ["DiagnoseConfigError", "DiagnoseReport", "add_arguments", "diagnose", "replot", "run"]

DEFAULT_STEPS = "0,1,2,5:300:5"
DEFAULT_VAL_SIZE = 500


class DiagnoseConfigError(SetupError):
    """Inconsistent options (unknown task or method, bad step list, ...)."""


@dataclass
class RunInfo:
    method: str
    lr: float
    steps: int
    measured_steps: int
    seconds_measured: float  # wall time of measured steps (forward + backward + measurement + update)
    seconds_other: float
    val_accuracy: float | None  # the task's selection metric on validation (accuracy for mr, trec)
    loss_curve: list[float] = field(default_factory=list)


@dataclass
class DiagnoseReport:
    records: list[LayerRecord]
    runs: list[RunInfo]
    out: Path
    figures: list[Path]
    config: dict[str, Any]


# --------------------------------------------------------------------------- the run


def _environment() -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }


class _TimedMonitor:
    """Wraps a GradientMonitor to time forward + backward of measured and other steps apart."""

    def __init__(self, monitor: GradientMonitor) -> None:
        self.monitor = monitor
        self.seconds = {True: 0.0, False: 0.0}
        self.counts = {True: 0, False: 0}

    @contextlib.contextmanager
    def measure(self, step: int) -> Iterator[bool]:
        t0 = time.perf_counter()
        with self.monitor.measure(step) as measured:
            yield measured
        self.seconds[measured] += time.perf_counter() - t0
        self.counts[measured] += 1

    def close(self) -> None:
        self.monitor.close()


def diagnose(
    *,
    task: str = "mr",
    methods: Sequence[str] = ("lora",),
    steps: Sequence[int] | str = DEFAULT_STEPS,
    max_steps: int | None = None,
    train_size: int | None = None,
    val_size: int = DEFAULT_VAL_SIZE,
    test_size: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    lrs: Mapping[str, float] | None = None,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    seed: int = 0,
    select: str | None = None,
    layers: Sequence[int] | None = None,
    out: str | Path = "diagnose-output",
    progress: bool = True,
    log: Callable[[str], None] = print,
    model: str | None = None,
) -> DiagnoseReport:
    """Train each method on ``task`` and write records and figures into ``out``.

    Writes ``records.jsonl``, ``records.csv``, ``summary.md``, ``run.json`` (configuration,
    environment, timings, validation metrics, loss curves) and the figures of
    :func:`lorapro.diagnostics_plot.write_figures` (with both lora and lorapro, also
    ``distances_paper.png``, the paper's Figure 4 view).
    """
    specs = _diagnosable(methods)
    methods = [spec.name for spec in specs]
    lrs = dict(lrs or {})
    if set(lrs) - set(methods):
        raise DiagnoseConfigError(
            f"learning rate given for a method not run: {sorted(set(lrs) - set(methods))}"
        )
    step_list, max_steps = _step_plan(steps, max_steps, log)
    task_obj = check_task(task, DiagnoseConfigError, model=model)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "records.jsonl"
    jsonl.unlink(missing_ok=True)
    prepared = _prepare(task_obj, task, train_size, val_size, test_size, max_length)
    sizes = prepared.info["sizes"]
    env = _environment()
    log(
        f"Task: {task_obj.description}\nData: {sizes['train']} train / {sizes['validation']} validation "
        f"examples (split seed 0); {max_steps} steps at batch {batch_size}; LoRA r={rank}, alpha={alpha}, "
        f"dropout={dropout}\nMeasured steps: {len([s for s in step_list if s < max_steps])} "
        f"({_compact(step_list)}); methods: {', '.join(methods)}; torch threads {env['torch_threads']}"
    )

    records: list[LayerRecord] = []
    runs: list[RunInfo] = []
    metric = task_obj.selection_metric.name
    for spec in specs:
        cfg = TrainConfig(
            lr=lrs.get(spec.name, spec.default_lr),
            epochs=0,
            batch_size=batch_size,
            seed=seed,
            lora_rank=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
        )
        result, monitor = _train_measured(spec, prepared, cfg, max_steps, step_list, select, jsonl, progress)
        records += monitor.monitor.records
        runs.append(_run_info(spec.name, cfg.lr, result, monitor, metric, log))

    write_csv(records, out / "records.csv")
    table = summary_table(summarize(records))
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    figures = _figures(records, out, layers, log)
    config = {
        "task": task,
        "model": model,
        "task_description": task_obj.description,
        "methods": methods,
        "lrs": {r.method: r.lr for r in runs},
        "steps": step_list,
        "max_steps": max_steps,
        "train_size": sizes["train"],
        "val_size": sizes["validation"],
        "batch_size": batch_size,
        "max_length": prepared.info.get("max_length"),
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "seed": seed,
        "select": select,
        "argv": sys.argv,
        "environment": env,
        "seconds": time.perf_counter() - t_start,
    }
    payload = {"config": config, "runs": [asdict(r) for r in runs]}
    (out / "run.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    log("")
    log(table)
    log("")
    log(f"Records: {jsonl} and {out / 'records.csv'}; figures: {', '.join(p.name for p in figures)}")
    log(f"Total wall time: {config['seconds']:.1f} s")
    return DiagnoseReport(records, runs, out, figures, config)


def _diagnosable(methods: Sequence[str]) -> list[MethodSpec]:
    """The methods' specs; refused unless each has plain LoRA pairs for the monitor to measure."""
    specs = check_methods(methods, DiagnoseConfigError)
    refused = [spec.name for spec in specs if not spec.diagnosable]
    if refused:
        able = ", ".join(name for name, spec in METHODS.items() if spec.diagnosable)
        raise DiagnoseConfigError(
            f"{', '.join(refused)}: no plain LoRA pairs (W0 + s*B*A) for the gradient monitor to measure; "
            f"methods it measures: {able}"
        )
    return specs


def _step_plan(
    steps: Sequence[int] | str, max_steps: int | None, log: Callable[[str], None]
) -> tuple[list[int], int]:
    """The steps to measure, sorted, and the steps to train (by default the last measured + 1)."""
    try:
        step_list = parse_steps(steps) if isinstance(steps, str) else sorted({int(s) for s in steps})
    except ValueError as exc:
        raise DiagnoseConfigError(str(exc)) from None
    if not step_list or step_list[0] < 0:
        raise DiagnoseConfigError(f"steps must be a non-empty list of integers >= 0, got {steps!r}")
    if max_steps is None:
        max_steps = max(step_list) + 1
    if max_steps <= 0:
        raise DiagnoseConfigError("max_steps must be positive")
    if max(step_list) >= max_steps:
        log(f"note: steps >= {max_steps} are never reached (--max-steps {max_steps})")
    return step_list, max_steps


def _prepare(
    task_obj: Task,
    task: str,
    train_size: int | None,
    val_size: int,
    test_size: int | None,
    max_length: int | None,
) -> PreparedTask:
    """The task's data; the training pool is everything the task does not hold out, unless
    ``train_size`` says less."""
    options = TaskOptions(
        train_size=train_size, val_size=val_size, test_size=test_size, max_length=max_length
    )
    if train_size is None:
        probe = task_obj.prepare(replace(options, train_size=1))
        pool = probe.info["sizes"]
        options = replace(options, train_size=pool["pool"] - pool["validation"] - pool["test"])
    try:
        return task_obj.prepare(options)
    except ValueError as exc:
        raise DiagnoseConfigError(f"cannot split task {task} that way: {exc}") from None


def _train_measured(
    spec: MethodSpec,
    prepared: PreparedTask,
    cfg: TrainConfig,
    max_steps: int,
    steps: Sequence[int],
    select: str | None,
    jsonl: Path,
    progress: bool,
) -> tuple[Any, _TimedMonitor]:
    """One method's run with the gradient monitor on its model, and that monitor."""
    made: list[_TimedMonitor] = []

    def make_monitor(model: torch.nn.Module) -> _TimedMonitor:
        made.append(_TimedMonitor(GradientMonitor(model, steps, select=select, run=spec.name, jsonl=jsonl)))
        return made[0]

    result = train_and_evaluate(
        spec,
        prepared,
        cfg,
        evaluate_on=("validation",) if prepared.info["sizes"]["validation"] else (),
        max_steps=max_steps,
        make_monitor=make_monitor,
        progress=progress,
    )
    return result, made[0]


def _run_info(
    method: str, lr: float, result: Any, monitor: _TimedMonitor, metric: str, log: Callable[[str], None]
) -> RunInfo:
    """What run.json keeps of one run, also logged in one line."""
    info = RunInfo(
        method,
        lr,
        result.steps,
        monitor.counts[True],
        monitor.seconds[True],
        monitor.seconds[False],
        result.validation.get(metric),
        result.loss_curve,
    )
    acc = "n/a" if info.val_accuracy is None else f"{info.val_accuracy:.4f}"
    per_measured = info.seconds_measured / max(1, info.measured_steps)
    per_other = info.seconds_other / max(1, info.steps - info.measured_steps)
    log(
        f"{method}: {info.steps} steps, final loss {_tail_mean(info.loss_curve):.4f}, validation "
        f"{metric} {acc}; forward+backward {per_measured:.2f} s per measured step vs {per_other:.2f} s "
        "per other step"
    )
    return info


def _tail_mean(values: Sequence[float]) -> float:
    tail = max(1, math.ceil(0.1 * len(values)))
    return sum(values[-tail:]) / tail if values else math.nan


def _compact(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def _figures(
    records: Sequence[LayerRecord], out: Path, layers: Sequence[int] | None, log: Callable
) -> list[Path]:
    if not records:
        log("no records: nothing was measured (no step reached, or no LoRA layer selected)")
        return []
    from lorapro.diagnostics_plot import write_figures

    return write_figures(records, out, layers=layers)


def replot(records_path: str | Path, out: str | Path, *, layers: Sequence[int] | None = None) -> list[Path]:
    """Redraw the figures and ``summary.md`` from saved records, without training."""
    records = read_jsonl(records_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary_table(summarize(records)) + "\n", encoding="utf-8")
    return _figures(records, out, layers, print)


def _rank_b(row: Mapping[str, Any]) -> str:
    cf = row.get("min_closed_form_rank_B")
    return f"{row['min_rank_B']}" if cf is None else f"{row['min_rank_B']} ({cf})"


def summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`lorapro.diagnostics.summarize` rows."""
    lines = [
        "| run | step | layers | median rel. dist. LoRA | median rel. dist. LoRA-Pro | median cos LoRA | "
        "median cos LoRA-Pro | LoRA-Pro closer | min rank A | min rank B (closed form) | max grad mismatch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary:
        lines.append(
            f"| {r['run']} | {r['step']} | {r['layers']} | {r['lora_rel_distance']:.4g} | "
            f"{r['pro_rel_distance']:.4g} | {r['lora_cosine']:.4g} | {r['pro_cosine']:.4g} | "
            f"{r['pro_closer_fraction']:.0%} | {r['min_rank_A']} | {_rank_b(r)} | "
            f"{r['max_grad_mismatch']:.1e} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _steps(text: str) -> list[int]:
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _diagnose_lrs(values: Sequence[str] | None, methods: Sequence[str]) -> dict[str, float]:
    try:
        return parse_lrs(values, methods)
    except ValueError as exc:
        raise DiagnoseConfigError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorapro diagnose``."""
    parser.description = (
        "Fine-tune the task's model (all-MiniLM-L6-v2 for mr and trec, or --model) with LoRA and record, "
        "on chosen steps, each LoRA layer's "
        "full gradient g against LoRA's and LoRA-Pro's equivalent gradients (relative distance, cosine) "
        "and the singular values of A and B. Writes records (JSONL, CSV) and figures in the paper's "
        "layout (rows: module kind, columns: shallow/middle/deep layer)."
    )
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument(
        "--task", default="mr", help=f"task ({', '.join(task_names())}); LoRA on Linear or Conv layers"
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a Hugging Face model folder (read offline) in place of the task's model, as `lorapro bench "
        "--model` takes it: a new sequence-classification head for mr, trec, text-csv; a causal LM for jsonl",
    )
    parser.add_argument(
        "--method", default="lora", help="training method(s), comma-separated: lora, lorapro, lorapro-full"
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=DEFAULT_STEPS,
        help="steps to measure (0-based): '0,10,20', 'START:STOP:STRIDE' (stop excluded), or a mix",
    )
    parser.add_argument(
        "--max-steps", type=_positive_int, help="training steps (default: last measured step + 1)"
    )
    parser.add_argument(
        "--train-size", type=_positive_int, help="training examples (default: all the task does not hold out)"
    )
    parser.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE, help="validation sentences")
    parser.add_argument(
        "--test-size", type=_positive_int, help="test examples held out (default: the task's)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--max-length", type=_positive_int, help="tokens per example (default: the task's)")
    parser.add_argument(
        "--lr", action="append", metavar="[METHOD=]RATE", help="learning rate override (default: per method)"
    )
    parser.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha/r)")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout; > 0 makes the measurement inexact (warned)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--select", help="measure only LoRA layers whose name matches this regular expression"
    )
    parser.add_argument("--layers", type=_int_list, help="block indices for the figure columns, e.g. 0,3,5")
    parser.add_argument("--out", default="diagnose-output", help="folder for records and figures")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--from-records",
        metavar="JSONL",
        help="do not train: redraw the figures and summary.md into --out from saved records.jsonl",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lorapro diagnose``; returns the exit status."""
    return run_command("diagnose", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    with removed_if_left_empty(args.out):  # a failed command leaves no empty --out behind
        return _diagnose(args)


def _diagnose(args: argparse.Namespace) -> int:
    if args.from_records:
        opening_checks(out=args.out)  # before anything is read
        try:
            replot(args.from_records, args.out, layers=args.layers)
        except (OSError, ValueError) as exc:
            raise DiagnoseConfigError(str(exc)) from None
        return 0
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    # Before anything is loaded or trained.
    opening_checks(out=args.out, methods=methods, task=args.task, error=DiagnoseConfigError, model=args.model)
    diagnose(
        task=args.task,
        model=args.model,
        methods=methods,
        steps=args.steps,
        max_steps=args.max_steps,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lrs=_diagnose_lrs(args.lr, methods),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        seed=args.seed,
        select=args.select,
        layers=args.layers,
        out=args.out,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorapro.bench.diagnose``: the command without the ``lorapro`` front end."""
    parser = argparse.ArgumentParser(prog="lorapro diagnose")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
