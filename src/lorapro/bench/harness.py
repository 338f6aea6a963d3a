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

from .config import DTYPES, BenchConfig, BenchConfigError, resolve_device
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
from .run_plan import describe_sizes, interrupted_message, pace_estimate, plan_text, run_plan
from .run_store import RunStore
from .stats import spread
from .tasks import PreparedTask, Task, TaskOptions, get_task
from .train import RunResult, TrainConfig, train_and_evaluate

__all__ = [
    "BenchResult",
    "MethodOutcome",
    "environment",
    "run_benchmark",
    "run_hash",
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
    options, prepared = _prepare(cfg, task)
    check_labels(prepared, BenchConfigError)  # classes the training split cannot teach: refused
    overlap = split_overlap(prepared)
    out = Path(cfg.out)
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
    runner = _Runner(cfg, task, prepared, RunStore(out / "runs"), env, base_key, device, report_only, log)
    if progress:
        runner.show_progress()
    log(_opening(cfg, task, prepared, env, device, out))
    data_warnings = unseen_test_classes(prepared) + overlap_warnings(overlap)
    for warning in data_warnings:
        log(f"warning: {warning}")
    if not report_only:
        log(plan_text(cfg, len(runner.grid), runner.planned, runner.at_most, out))
    # Two phases, so that an interrupted benchmark has tuned every method before it spends
    # time on extra seeds: first the whole grid at seed 0 for all methods, then the seeds.
    outcomes = [MethodOutcome(m, get_method(m).description) for m in cfg.methods]
    try:
        tuning = {outcome.method: runner.tune(outcome) for outcome in outcomes}
        for outcome in outcomes:
            runner.repeat_best(outcome, tuning[outcome.method])
    except KeyboardInterrupt:
        runner.close_progress()  # before the message, so that it is not drawn over
        log(interrupted_message(out, runner.executed, resume_command))
        raise
    finally:
        runner.close_progress()

    result = BenchResult(
        config=cfg,
        task=task,
        task_info=prepared.info,
        outcomes=outcomes,
        all_runs=runner.all_runs,
        out=out,
        environment=env,
        runs_executed=runner.executed,
        runs_reused=runner.reused,
        data_warnings=data_warnings,
        overlap=overlap,
    )
    write_reports(result, log=log)
    return result


def _prepare(cfg: BenchConfig, task: Task) -> tuple[TaskOptions, PreparedTask]:
    """The task checked with its options, and its data prepared once for every run."""
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
    return options, prepared


def _opening(
    cfg: BenchConfig, task: Task, prepared: PreparedTask, env: dict[str, Any], device: str, out: Path
) -> str:
    """The lines that say what the benchmark runs: the task, data, methods, grid and device."""
    grid = sorted(cfg.lr_grid)
    accumulate = f", {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else ""
    steps = f", {cfg.max_steps} steps per run" if cfg.max_steps is not None else ""
    return (
        f"Task {task.name}: {task.description}\n"
        f"Data: {describe_sizes(prepared.info.get('sizes'))}; methods: {', '.join(cfg.methods)}; lr grid: "
        f"{', '.join(f'{x:g}' for x in grid)}; seeds: {cfg.seeds}; results under {out}\n"
        f"Device: {env.get('cuda_device', device)}, {cfg.dtype}{accumulate}{steps}\n"
        f"{grid_plan(cfg.lr_grid, cfg.extend_grid, cfg.refine)}"
    )


class _Runner:
    """The benchmark's runs, one at a time: each reused from the store when its hash is there,
    else trained and stored, and counted (executed or reused) and shown in the progress bar."""

    def __init__(
        self,
        cfg: BenchConfig,
        task: Task,
        prepared: PreparedTask,
        store: RunStore,
        env: dict[str, Any],
        base_key: dict[str, Any],
        device: str,
        report_only: bool,
        log: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.prepared = prepared
        self.store = store
        self.env = env
        #: What every run's hash covers besides its method and training config.
        self.base_key = base_key
        self.device = device
        self.report_only = report_only
        self.log = log
        self.seeds = list(range(cfg.seeds))
        self.grid = sorted(cfg.lr_grid)  # ascending: ties then keep the smaller rate
        self.planned, self.at_most = run_plan(cfg)
        self.executed = self.reused = 0
        self.all_runs: list[RunResult] = []
        self.bar: Any = None

    def show_progress(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=len(self.cfg.methods) * (len(self.grid) + len(self.seeds) - 1),
            desc=f"bench {self.task.name}",
            unit="run",
            position=0,
            dynamic_ncols=True,
        )

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def run(self, method: str, lr: float, seed: int) -> RunResult:
        """The run of ``method`` at ``lr`` and ``seed``: stored, or trained now and stored."""
        train_cfg = _train_config(self.cfg, self.task, lr, seed, len(self.prepared.train))
        key = {**self.base_key, "method": method, "train": train_cfg.to_dict()}
        digest = run_hash(key)
        path = self.store.path(method, lr, seed, digest)
        result = self.store.load(path, digest)
        refused = self.store.refusal(path, digest, self.env)
        if refused is not None:
            raise MethodUnavailableError(refused)
        if result is None and self.report_only:
            raise _NotRunYet(f"lr {lr:g} seed {seed}")
        if result is None:
            result = self._train(method, train_cfg, path, digest, key)
        else:
            self.reused += 1
        if self.bar is not None:
            self.bar.update(1)
        self.all_runs.append(result)
        return result

    def _train(self, method: str, train_cfg: TrainConfig, path: Path, digest: str, key: dict) -> RunResult:
        started = time.perf_counter()
        try:
            result = train_and_evaluate(
                method,
                self.prepared,
                train_cfg,
                progress=self.bar is not None,
                progress_position=1,
                max_steps=self.cfg.max_steps,
                device=self.device,
                dtype=DTYPES[self.cfg.dtype],
                grad_accum=self.cfg.grad_accum,
                eval_every=self.cfg.eval_every,
            )
        except MethodUnavailableError as exc:
            self.store.save_refusal(path, digest, str(exc), self.env)
            raise
        self.store.save(path, digest, key, result, self.env)
        self.executed += 1
        if self.executed == 1:
            seconds = time.perf_counter() - started
            bar = self.bar
            left = (bar.total - bar.n - 1) if bar is not None else self.planned - len(self.all_runs) - 1
            note = pace_estimate(seconds, max(0, left), max(0, self.at_most - self.planned))
            (bar.write if bar is not None else self.log)(note)
        return result

    def tune(self, outcome: MethodOutcome) -> dict[float, RunResult]:
        """The method's runs at seed 0 over the grid, its extension at the edges and refinement;
        a method not stored yet (``report_only``) or unavailable is marked so on ``outcome``."""
        runs: dict[float, RunResult] = {}
        try:
            for lr in self.grid:
                runs[lr] = self.run(outcome.method, lr, self.seeds[0])
                outcome.origins[lr] = COARSE
            selection = self.task.selection_metric
            at_seed0 = lambda lr, m=outcome.method: self.run(m, lr, self.seeds[0])  # noqa: E731
            for lr in extend_at_edges(runs, self.cfg.extend_grid, selection, self.bar, at_seed0):
                outcome.origins[lr] = EDGE
            for lr in refine_around_best(runs, self.cfg.refine, selection, self.bar, at_seed0):
                outcome.origins[lr] = REFINED
        except _NotRunYet as missing:
            outcome.pending = f"tuning not finished ({missing} not run yet)"
        except MethodUnavailableError as exc:
            outcome.unavailable = str(exc)
            self.log(f"{outcome.method}: not run: {exc}")
            if self.bar is not None:
                self.bar.update(len(self.grid) + len(self.seeds) - 1 - len(runs))
        return runs

    def repeat_best(self, outcome: MethodOutcome, runs: dict[float, RunResult]) -> None:
        """Record the tuning on ``outcome``, choose its rate, and run that rate on the other seeds."""
        outcome.grid = {lr: runs[lr].validation for lr in sorted(runs)}
        outcome.diverged = [lr for lr in sorted(runs) if runs[lr].diverged]
        if outcome.unavailable or outcome.pending:
            return
        selection = self.task.selection_metric
        best = best_lr(runs, selection)
        outcome.chosen_lr = best
        scores = {lr: runs[lr].validation.get(selection.name, math.nan) for lr in runs}
        outcome.rule = choice_rule(scores, best, selection, outcome.origins, outcome.diverged)
        outcome.runs = [runs[best]]
        for seed in self.seeds[1:]:
            with contextlib.suppress(_NotRunYet):  # report_only: show the seeds run so far
                outcome.runs.append(self.run(outcome.method, best, seed))
        if len(outcome.runs) < len(self.seeds):
            outcome.pending = f"{len(outcome.runs)} of {len(self.seeds)} seeds run so far"
        values = outcome.test_values(self.task.report_metric.name)
        self.log(f"{outcome.method}: {outcome.rule}; test {self.task.report_metric.name} {spread(values)}")


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
