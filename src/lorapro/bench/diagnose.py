"""`lorapro diagnose`: train with LoRA or LoRA-Pro and record, on chosen steps, how far each
layer's equivalent gradient is from the full gradient (the paper's Appendix D.2 / Figure 4).

Whatever the training method, every measured step records *both* LoRA's and LoRA-Pro's
equivalent gradients for the current A, B and batch; the method only decides the trajectory
of A and B. ``--method lora,lorapro`` runs both trajectories from the same initial weights,
data order and schedule, and adds the paper's view: each method's own equivalent gradient
along its own training (``distances_paper.png``).

The training loop is written here rather than reused from :mod:`lorapro.bench.train`
because the monitor must wrap the forward and backward pass of chosen steps; otherwise it
follows that loop (same builders, same seeding, cosine schedule with 3% warm-up).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorapro.diagnostics import GradientMonitor, LayerRecord, parse_steps, read_jsonl, summarize, write_csv

from .data import MOVIE_REVIEW_LABELS, MissingAssetError, movie_review_splits
from .models import load_minilm
from .options import parse_lrs
from .train import MethodUnavailableError, TrainConfig, encode, evaluate_accuracy, get_method

__all__ = ["TASKS", "DiagnoseConfigError", "DiagnoseReport", "add_arguments", "diagnose", "replot", "run"]

TASKS: dict[str, str] = {"mr": "movie-review sentence polarity (Hutto & Gilbert 2014), all-MiniLM-L6-v2"}
DEFAULT_STEPS = "0,1,2,5:300:5"
DEFAULT_VAL_SIZE = 500
DEFAULT_TEST_SIZE = 1000  # carved out (and unused) so the training pool matches `lorapro demo`


class DiagnoseConfigError(ValueError):
    """Inconsistent options (unknown task or method, bad step list, ...)."""


@dataclass
class RunInfo:
    method: str
    lr: float
    steps: int
    measured_steps: int
    seconds_measured: float  # wall time of measured steps (forward + backward + measurement + update)
    seconds_other: float
    val_accuracy: float | None
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


def _train_one(
    method: str,
    lr: float,
    cfg_kwargs: Mapping[str, Any],
    train: Any,
    validation: Any,
    steps: Sequence[int],
    max_steps: int,
    jsonl: Path,
    select: str | None,
    progress: bool,
) -> tuple[list[LayerRecord], RunInfo]:
    from transformers import get_cosine_schedule_with_warmup

    spec = get_method(method)
    cfg = TrainConfig(lr=lr, **cfg_kwargs)
    # Same seeding as bench.train.train_and_evaluate: identical head, LoRA A and data order
    # for every method at a given seed.
    torch.manual_seed(cfg.seed)
    model, optimizer = spec.build(load_minilm(len(MOVIE_REVIEW_LABELS))[0], cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * max_steps), max_steps)
    monitor = GradientMonitor(model, steps, select=select, run=method, jsonl=jsonl)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc=f"{method} lr={lr:g}", unit="step")
    losses: list[float] = []
    t_measured = t_other = 0.0
    n_measured = 0
    step = 0
    model.train()
    try:
        while step < max_steps:
            for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
                if step >= max_steps:
                    break
                batch = train.batch(idx.tolist())
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with monitor.measure(step) as measured:
                    loss = model(**batch).loss
                    loss.backward()
                optimizer.step()
                scheduler.step()
                dt = time.perf_counter() - t0
                if measured:
                    t_measured += dt
                    n_measured += 1
                else:
                    t_other += dt
                losses.append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        monitor.close()
        if bar is not None:
            bar.close()
    val_acc = evaluate_accuracy(model, validation, cfg.eval_batch_size) if validation is not None else None
    info = RunInfo(method, lr, step, n_measured, t_measured, t_other, val_acc, losses)
    return monitor.records, info


def diagnose(
    *,
    task: str = "mr",
    methods: Sequence[str] = ("lora",),
    steps: Sequence[int] | str = DEFAULT_STEPS,
    max_steps: int | None = None,
    train_size: int | None = None,
    val_size: int = DEFAULT_VAL_SIZE,
    batch_size: int = 32,
    max_length: int = 64,
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
) -> DiagnoseReport:
    """Train each method on ``task`` and write records and figures into ``out``.

    Writes ``records.jsonl``, ``records.csv``, ``summary.md``, ``run.json`` (configuration,
    environment, timings, accuracy, loss curves) and the figures of
    :func:`lorapro.diagnostics_plot.write_figures` (with both lora and lorapro, also
    ``distances_paper.png``, the paper's Figure 4 view).
    """
    if task not in TASKS:
        raise DiagnoseConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise DiagnoseConfigError("no method given")
    try:
        specs = [get_method(m) for m in methods]
    except ValueError as exc:
        raise DiagnoseConfigError(str(exc)) from None
    for spec in specs:
        if spec.check is not None:
            spec.check()
    lrs = dict(lrs or {})
    if set(lrs) - set(methods):
        raise DiagnoseConfigError(
            f"learning rate given for a method not run: {sorted(set(lrs) - set(methods))}"
        )
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

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "records.jsonl"
    jsonl.unlink(missing_ok=True)
    try:
        splits = movie_review_splits(train_size, val_size, DEFAULT_TEST_SIZE, seed=seed)
    except ValueError as exc:
        raise DiagnoseConfigError(f"cannot split the movie reviews that way: {exc}") from None
    _, tokenizer = load_minilm(len(MOVIE_REVIEW_LABELS))
    train_enc = encode(tokenizer, splits.train, max_length)
    val_enc = encode(tokenizer, splits.validation, max_length) if len(splits.validation) else None
    cfg_kwargs = {
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
    }
    env = _environment()
    log(
        f"Task: {TASKS[task]}\nData: {len(splits.train)} train / {len(splits.validation)} validation "
        f"sentences (seed {seed}); {max_steps} steps at batch {batch_size}; LoRA r={rank}, alpha={alpha}, "
        f"dropout={dropout}\nMeasured steps: {len([s for s in step_list if s < max_steps])} "
        f"({_compact(step_list)}); methods: {', '.join(methods)}; torch threads {env['torch_threads']}"
    )

    records: list[LayerRecord] = []
    runs: list[RunInfo] = []
    for spec in specs:
        lr = lrs.get(spec.name, spec.default_lr)
        recs, info = _train_one(
            spec.name, lr, cfg_kwargs, train_enc, val_enc, step_list, max_steps, jsonl, select, progress
        )
        records += recs
        runs.append(info)
        acc = "n/a" if info.val_accuracy is None else f"{info.val_accuracy:.4f}"
        per_measured = info.seconds_measured / max(1, info.measured_steps)
        per_other = info.seconds_other / max(1, info.steps - info.measured_steps)
        log(
            f"{spec.name}: {info.steps} steps, final loss {_tail_mean(info.loss_curve):.4f}, validation "
            f"accuracy {acc}; {per_measured:.2f} s per measured step vs {per_other:.2f} s per other step"
        )

    write_csv(records, out / "records.csv")
    summary = summarize(records)
    table = summary_table(summary)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    figures = _figures(records, out, layers, log)
    config = {
        "task": task,
        "task_description": TASKS[task],
        "methods": methods,
        "lrs": {r.method: r.lr for r in runs},
        "steps": step_list,
        "max_steps": max_steps,
        "train_size": len(splits.train),
        "val_size": len(splits.validation),
        "batch_size": batch_size,
        "max_length": max_length,
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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
        "Fine-tune all-MiniLM-L6-v2 with LoRA on a task and record, on chosen steps, each LoRA layer's "
        "full gradient g against LoRA's and LoRA-Pro's equivalent gradients (relative distance, cosine) "
        "and the singular values of A and B. Writes records (JSONL, CSV) and figures in the paper's "
        "layout (rows: module kind, columns: shallow/middle/deep layer)."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--task", default="mr", choices=sorted(TASKS), help="mr: movie-review polarity")
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
        "--train-size", type=_positive_int, help="training sentences (default: all not held out, ~9.1k)"
    )
    parser.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE, help="validation sentences")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--max-length", type=_positive_int, default=64, help="tokens per sentence")
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
    if args.from_records:
        try:
            replot(args.from_records, args.out, layers=args.layers)
        except (OSError, ValueError) as exc:
            print(f"lorapro diagnose: error: {exc}", file=sys.stderr)
            return 2
        return 0
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    try:
        diagnose(
            task=args.task,
            methods=methods,
            steps=args.steps,
            max_steps=args.max_steps,
            train_size=args.train_size,
            val_size=args.val_size,
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
    except (DiagnoseConfigError, MissingAssetError, MethodUnavailableError) as exc:
        # Set-up problems and bad options: show the fix, not a traceback.
        print(f"lorapro diagnose: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorapro.bench.diagnose``: the command without the ``lorapro`` front end."""
    parser = argparse.ArgumentParser(prog="lorapro diagnose")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
