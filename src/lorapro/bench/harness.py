"""The benchmark: tune each method's learning rate on one grid, then run the winner on N seeds.

Fairness rules, the same for every method:
- one learning-rate grid; each method's rate is chosen on the *validation* split, with
  seed 0, by the task's selection metric;
- the chosen rate then runs on seeds 1..N-1 as well, and methods are compared on the
  *test* split (mean +- std over the N seeds; the seed-0 tuning run is one of them);
- same data, splits, initial weights per seed, step budget, schedule and LoRA placement.

Every run is stored as one JSON file named by the hash of everything that determines it
(task and its data, sizes, method, learning rate, seed, hyper-parameters, library
version), so an interrupted or extended benchmark never repeats a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_LR_GRID, DEVICES, DTYPES, BenchConfig, BenchConfigError, resolve_device
from .data_checks import check_labels, overlap_warnings, split_overlap, unseen_test_classes
from .errors import MethodUnavailableError
from .grid import (
    COARSE,
    EDGE,
    REFINED,
    best_lr,
    choice_rule,
    extend_at_edges,
    grid_plan,
    refine_around_best,
    round_rate,
)
from .methods import get_method
from .opening import check_methods, check_task
from .outcomes import BenchResult, MethodOutcome
from .report import write_reports
from .stats import spread
from .tasks import Task, TaskOptions, get_task
from .train import RunResult, TrainConfig, train_and_evaluate

__all__ = [
    "DEFAULT_LR_GRID",
    "DEVICES",
    "DTYPES",
    "BenchConfig",
    "BenchConfigError",
    "BenchResult",
    "MethodOutcome",
    "resolve_device",
    "run_benchmark",
    "run_hash",
    "run_plan",
    "unseen_test_classes",
]

#: Bump when a change to the loop or a method would change results: stored runs with an
#: older version are then not reused.
HARNESS_VERSION = 1


def run_hash(key: dict[str, Any]) -> str:
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def environment() -> dict[str, Any]:
    import peft
    import transformers

    import lorapro

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "lorapro": getattr(lorapro, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


class _RunStore:
    """One JSON file per finished run under ``out/runs/<method>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, method: str, lr: float, seed: int, digest: str) -> Path:
        return self.root / method / f"lr{lr:g}-seed{seed}-{digest}.json"

    def load(self, path: Path, digest: str) -> RunResult | None:
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a torn file from a killed run: run it again
        if payload.get("hash") != digest:
            return None
        return RunResult.from_dict(payload["result"])

    @staticmethod
    def _refusal_path(path: Path) -> Path:
        return path.with_name(path.stem + ".unavailable.json")

    def refusal(self, path: Path, digest: str, env: dict) -> str | None:
        """Why this run could not be built, if an earlier invocation found out with the same PEFT."""
        marker = self._refusal_path(path)
        if not marker.is_file():
            return None
        try:
            payload = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if payload.get("hash") != digest or payload.get("peft") != env.get("peft"):
            return None  # another configuration or PEFT release: try again
        return str(payload["reason"])

    def save_refusal(self, path: Path, digest: str, reason: str, env: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"hash": digest, "reason": reason, "peft": env.get("peft")}
        self._refusal_path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    def save(self, path: Path, digest: str, key: dict[str, Any], result: RunResult, env: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "hash": digest,
            "key": key,
            "result": result.to_dict(),
            "environment": env,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a killed run leaves no half-written result


def _train_config(cfg: BenchConfig, task: Task, lr: float, seed: int, n_train: int) -> TrainConfig:
    epochs = cfg.epochs or task.default_epochs
    batch_size = cfg.batch_size or task.default_batch_size
    if cfg.max_steps is not None:
        # Enough epochs to reach max_steps; the loop stops there (and lays its schedule out for it).
        per_epoch = math.ceil(math.ceil(n_train / batch_size) / cfg.grad_accum)
        epochs = math.ceil(cfg.max_steps / per_epoch)
    return TrainConfig(
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=cfg.weight_decay,
        seed=seed,
        lora_rank=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
    )


class _NotRunYet(Exception):
    """A run the report needs is not stored (``report_only``)."""


def run_benchmark(
    cfg: BenchConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    task: Task | None = None,
    report_only: bool = False,
    resume_command: str | None = None,
) -> BenchResult:
    """Run (or resume) the benchmark described by ``cfg`` and write its reports.

    ``task`` overrides ``cfg.task``'s registry lookup (tests pass a tiny task object).
    With ``report_only`` nothing is trained: the reports show the stored runs, and methods
    whose tuning or seeds are unfinished are marked pending. ``resume_command``: the command
    line that resumes this benchmark, named when it is interrupted (Ctrl-C).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    task = task or _get_task(cfg.task)
    task.load_dtype = DTYPES[cfg.dtype]
    given = {"model": cfg.model, "eval_file": cfg.eval_file, "answer_regex": cfg.answer_regex}
    check_task(task, BenchConfigError, **given)
    check_methods(cfg.methods, BenchConfigError)
    options = TaskOptions(
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
        max_length=cfg.max_length,
        data_seed=cfg.data_seed,
    )
    try:
        prepared = task.prepare(options)
        if cfg.target_modules is not None:
            prepared = _with_targets(prepared, cfg.target_modules)
    except ValueError as exc:
        raise BenchConfigError(str(exc)) from None
    check_labels(prepared, BenchConfigError)  # classes the training split cannot teach: refused
    overlap = split_overlap(prepared)
    out = Path(cfg.out)
    store = _RunStore(out / "runs")
    env = environment()
    env["device"] = device
    if device == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name()
    base_key = {
        "harness_version": HARNESS_VERSION,
        "task": task.identity(),
        "options": asdict(options),
        # Sizes, not the whole info dict: rewording a note must not invalidate finished runs.
        "sizes": prepared.info.get("sizes"),
        **_runtime_key(cfg, device),
    }
    seeds = list(range(cfg.seeds))
    grid = sorted(cfg.lr_grid)  # ascending: ties then keep the smaller rate
    selection = task.selection_metric

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(cfg.methods) * (len(grid) + len(seeds) - 1),
            desc=f"bench {task.name}",
            unit="run",
            position=0,
            dynamic_ncols=True,
        )
    accumulate = f", {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else ""
    steps = f", {cfg.max_steps} steps per run" if cfg.max_steps is not None else ""
    log(
        f"Task {task.name}: {task.description}\n"
        f"Data: {describe_sizes(prepared.info.get('sizes'))}; methods: {', '.join(cfg.methods)}; lr grid: "
        f"{', '.join(f'{x:g}' for x in grid)}; seeds: {cfg.seeds}; results under {out}\n"
        f"Device: {env.get('cuda_device', device)}, {cfg.dtype}{accumulate}{steps}\n"
        f"{grid_plan(cfg.lr_grid, cfg.extend_grid, cfg.refine)}"
    )
    data_warnings = unseen_test_classes(prepared) + overlap_warnings(overlap)
    for warning in data_warnings:
        log(f"warning: {warning}")
    planned, at_most = run_plan(cfg)
    if not report_only:
        log(_plan_text(cfg, len(grid), planned, at_most, out))
    counters = {"executed": 0, "reused": 0}
    all_runs: list[RunResult] = []

    def run(method: str, lr: float, seed: int) -> RunResult:
        train_cfg = _train_config(cfg, task, lr, seed, len(prepared.train))
        key = {**base_key, "method": method, "train": train_cfg.to_dict()}
        digest = run_hash(key)
        path = store.path(method, lr, seed, digest)
        result = store.load(path, digest)
        refused = store.refusal(path, digest, env)
        if refused is not None:
            raise MethodUnavailableError(refused)
        if result is None and report_only:
            raise _NotRunYet(f"lr {lr:g} seed {seed}")
        if result is None:
            started = time.perf_counter()
            try:
                result = train_and_evaluate(
                    method,
                    prepared,
                    train_cfg,
                    progress=progress,
                    progress_position=1,
                    max_steps=cfg.max_steps,
                    device=device,
                    dtype=DTYPES[cfg.dtype],
                    grad_accum=cfg.grad_accum,
                    eval_every=cfg.eval_every,
                )
            except MethodUnavailableError as exc:
                store.save_refusal(path, digest, str(exc), env)
                raise
            store.save(path, digest, key, result, env)
            counters["executed"] += 1
            if counters["executed"] == 1:
                seconds = time.perf_counter() - started
                left = (bar.total - bar.n - 1) if bar is not None else planned - len(all_runs) - 1
                note = _estimate(seconds, max(0, left), max(0, at_most - planned))
                (bar.write if bar is not None else log)(note)
        else:
            counters["reused"] += 1
        if bar is not None:
            bar.update(1)
        all_runs.append(result)
        return result

    # Two phases, so that an interrupted benchmark has tuned every method before it spends
    # time on extra seeds: first the whole grid at seed 0 for all methods, then the seeds.
    outcomes = [MethodOutcome(m, get_method(m).description) for m in cfg.methods]
    tuning: dict[str, dict[float, RunResult]] = {m: {} for m in cfg.methods}
    try:
        for outcome in outcomes:
            runs = tuning[outcome.method]
            try:
                for lr in grid:
                    runs[lr] = run(outcome.method, lr, seeds[0])
                    outcome.origins[lr] = COARSE
                at_seed0 = lambda lr, m=outcome.method: run(m, lr, seeds[0])  # noqa: E731
                for lr in extend_at_edges(runs, cfg.extend_grid, selection, bar, at_seed0):
                    outcome.origins[lr] = EDGE
                for lr in refine_around_best(runs, cfg.refine, selection, bar, at_seed0):
                    outcome.origins[lr] = REFINED
            except _NotRunYet as missing:
                outcome.pending = f"tuning not finished ({missing} not run yet)"
            except MethodUnavailableError as exc:
                outcome.unavailable = str(exc)
                log(f"{outcome.method}: not run: {exc}")
                if bar is not None:
                    bar.update(len(grid) + len(seeds) - 1 - len(runs))
        for outcome in outcomes:
            runs = tuning[outcome.method]
            outcome.grid = {lr: runs[lr].validation for lr in sorted(runs)}
            outcome.diverged = [lr for lr in sorted(runs) if runs[lr].diverged]
            if outcome.unavailable or outcome.pending:
                continue
            best = best_lr(runs, selection)
            outcome.chosen_lr = best
            scores = {lr: runs[lr].validation.get(selection.name, math.nan) for lr in runs}
            outcome.rule = choice_rule(scores, best, selection, outcome.origins, outcome.diverged)
            outcome.runs = [runs[best]]
            for seed in seeds[1:]:
                with contextlib.suppress(_NotRunYet):  # report_only: show the seeds run so far
                    outcome.runs.append(run(outcome.method, best, seed))
            if len(outcome.runs) < len(seeds):
                outcome.pending = f"{len(outcome.runs)} of {len(seeds)} seeds run so far"
            values = outcome.test_values(task.report_metric.name)
            log(f"{outcome.method}: {outcome.rule}; test {task.report_metric.name} {spread(values)}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()  # before the message, so that it is not drawn over
        log(_interrupted(out, counters["executed"], resume_command))
        raise
    finally:
        if bar is not None:
            bar.close()

    result = BenchResult(
        config=cfg,
        task=task,
        task_info=prepared.info,
        outcomes=outcomes,
        all_runs=all_runs,
        out=out,
        environment=env,
        runs_executed=counters["executed"],
        runs_reused=counters["reused"],
        data_warnings=data_warnings,
        overlap=overlap,
    )
    write_reports(result, log=log)
    return result


def describe_sizes(sizes: dict[str, int] | None) -> str:
    """``1000 train / 300 validation / 1000 test examples (of 5000)``; the sizes as a task gives them."""
    if not sizes:
        return "sizes not given"
    text = " / ".join(f"{sizes[k]} {k}" for k in ("train", "validation", "test") if k in sizes) + " examples"
    return text + (f" (of {sizes['pool']})" if "pool" in sizes else "")


def run_plan(cfg: BenchConfig) -> tuple[int, int]:
    """The runs the benchmark plans (every method: the grid on seed 0, then its chosen rate on the
    other seeds), and the most it can take when every method's grid extends and refines."""
    per_method = len(cfg.lr_grid) + cfg.seeds - 1
    extra = cfg.extend_grid + 2 * cfg.refine
    return len(cfg.methods) * per_method, len(cfg.methods) * (per_method + extra)


def _plan_text(cfg: BenchConfig, n_rates: int, planned: int, at_most: int, out: Path) -> str:
    seeds = cfg.seeds - 1
    then = f", then each method's chosen rate on {seeds} more seed{'s' if seeds > 1 else ''}" if seeds else ""
    text = f"Plan: {len(cfg.methods)} methods x {n_rates} rates on seed 0{then}: {planned} runs"
    more = []
    if cfg.extend_grid:
        more.append(f"up to {cfg.extend_grid} per method where a best rate sits at the grid's edge")
    if cfg.refine:
        more.append(f"{2 * cfg.refine} per method for refinement")
    if at_most > planned:
        text += f", and up to {at_most - planned} more ({'; '.join(more)})"
    return text + f". Runs stored under {out / 'runs'} are reused, not repeated."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _estimate(first: float, left: int, extra: int) -> str:
    """The time the remaining runs take at the first run's pace (methods differ in speed)."""
    text = f"First run: {_duration(first)}; at that pace the {left} remaining planned runs take about "
    text += _duration(first * left)
    if extra:
        text += f" ({_duration(first * (left + extra))} if every grid extends and refines)"
    return text + "."


def _stored_runs(out: Path) -> int:
    root = out / "runs"
    if not root.is_dir():
        return 0
    return sum(1 for p in root.glob("*/*.json") if not p.name.endswith(".unavailable.json"))


def _interrupted(out: Path, executed: int, resume_command: str | None) -> str:
    stored = _stored_runs(out)
    again = f"rerun `{resume_command}`" if resume_command else "rerun the same command"
    return (
        f"\nInterrupted: {stored} finished run{'s' if stored != 1 else ''} stored under {out / 'runs'} "
        f"({executed} of them trained in this invocation; the run in progress is lost). To resume, {again}: "
        "stored runs are reused, not repeated."
    )


def _runtime_key(cfg: BenchConfig, device: str) -> dict[str, Any]:
    """The options beyond the task and the training config that change a run, for its hash.

    Each enters only when it differs from what every run stored before these options
    existed did (CPU, float32, no accumulation, epochs, the task's LoRA targets), so those
    runs keep their hashes and are reused.
    """
    runtime: dict[str, Any] = {}
    if device != "cpu":
        runtime["device"] = device
    if cfg.dtype != "float32":
        runtime["dtype"] = cfg.dtype
    if cfg.grad_accum != 1:
        runtime["grad_accum"] = cfg.grad_accum
    if cfg.max_steps is not None:
        runtime["max_steps"] = cfg.max_steps
    if cfg.eval_every:
        # Training is unchanged, but the record then holds a validation curve: a stored run
        # without one must not stand in for it.
        runtime["eval_every"] = cfg.eval_every
    key: dict[str, Any] = {"runtime": runtime} if runtime else {}
    if cfg.target_modules is not None:
        key["target_modules"] = [t.strip() for t in cfg.target_modules if t.strip()]
    return key


def _with_targets(prepared: Any, patterns: Sequence[str]) -> Any:
    """``prepared`` with LoRA on the modules ``--target-modules`` names, checked on the model's
    structure now (a skeleton without weights where the task has one), before anything trains."""
    from .targets import select_modules

    model = prepared.model_skeleton() if prepared.model_skeleton is not None else prepared.load_model()
    names = tuple(select_modules(model, [p for p in patterns if p.strip()]))
    del model
    return dataclasses.replace(prepared, lora_targets=lambda _model: list(names))


# Kept for callers of the earlier private names.
_best_lr = best_lr
_extend_at_edges = extend_at_edges
_round_rate = round_rate


def _get_task(spec: str) -> Task:
    try:
        return get_task(spec)
    except ValueError as exc:
        raise BenchConfigError(str(exc)) from None
