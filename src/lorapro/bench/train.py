"""One fine-tuning run: a plain PyTorch loop shared by every method and task.

No Hugging Face Trainer on purpose: the comparison must see exactly which optimizer
steps which parameters, and a short loop is easier to audit than Trainer's options.
Every method at a given seed gets the same initial head, the same LoRA A matrices, the
same data order and the same cosine schedule with 3% warm-up; only the method differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lorapro import NonFiniteGradientError

from .devices import model_device
from .memory import PeakMemory
from .methods import BuildContext, MethodSpec, get_method
from .records import EXAMPLES_KEY, VALIDATION_CURVE_KEY, RunResult, TrainConfig
from .tasks.base import PreparedTask

__all__ = [
    "RunResult",
    "TrainConfig",
    "autocast",
    "optimizer_state_bytes",
    "train_and_evaluate",
]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of the optimizer's per-parameter state (moments, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------- the loop


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward's precision: float32 as stored, or torch.autocast to a 16-bit dtype."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _on_model_device(loss: Callable[[nn.Module, dict], torch.Tensor]) -> Callable:
    """A task's loss whose batch (built on the CPU) is first moved to the model's device."""

    def moved(model: nn.Module, batch: dict) -> torch.Tensor:
        device = model_device(model)
        return loss(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})

    return moved


def _store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights in ``dtype``; trained parameters (and so their optimizer state) in float32.

    Done in place on ``.data``, after the optimizer was built on these very parameters: its
    state is created at the first step, in the parameters' (float32) dtype.
    """
    for p in model.parameters():
        want = torch.float32 if p.requires_grad else dtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def train_and_evaluate(
    method: str | MethodSpec,
    task: PreparedTask,
    cfg: TrainConfig,
    *,
    evaluate_on: Sequence[str] = ("validation", "test"),
    max_steps: int | None = None,
    make_monitor: Callable[[nn.Module], Any] | None = None,
    progress: bool = True,
    progress_position: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    grad_accum: int = 1,
    eval_every: int = 0,
) -> RunResult:
    """Fine-tune one freshly loaded model with one method, then evaluate it.

    ``max_steps`` stops early (the schedule is laid out for ``max_steps``).
    ``make_monitor(model)`` returns a :class:`lorapro.GradientMonitor`-like object whose
    ``measure(step)`` wraps forward and backward (the diagnose command uses it).

    ``device`` moves the model there after loading (batches follow it). With a 16-bit
    ``dtype`` the frozen weights are stored in it, the trained parameters and the optimizer
    state stay float32, and forward and evaluation run under ``torch.autocast``: every
    method gets the same mixed precision. ``grad_accum`` micro-batches of ``batch_size`` are
    accumulated (each loss divided by their count) into one optimizer step.

    ``eval_every`` > 0 scores the validation split every that many optimizer steps and at the
    end, recorded under ``extra[VALIDATION_CURVE_KEY]``. Training is unchanged by it: the model
    goes back to train mode and the global RNG state is restored after each evaluation, and its
    time is left out of ``train_seconds``.

    A non-finite loss, or LoRA-Pro refusing a non-finite gradient, ends training early and
    marks the run ``diverged``; the model is still evaluated, so a too-large learning rate
    shows up in the grid as the poor score it is rather than as a crash.
    """
    spec = get_method(method) if isinstance(method, str) else method
    if len(task.train) == 0:
        raise ValueError("empty training set")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    total_steps = _total_steps(len(task.train), cfg, grad_accum, max_steps)
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda":
        gc.collect()  # the previous run's model, so that it does not count in this run's peak
        task = dataclasses.replace(task, loss=_on_model_device(task.loss))
    torch.manual_seed(cfg.seed)
    model = task.load_model()
    if target is not None and model_device(model) != target:
        model = model.to(target)
    run_device = model_device(model)
    precision = dtype if dtype is not None and dtype != torch.float32 else None
    with PeakMemory(run_device) as memory:
        built = spec.build(model, BuildContext(cfg, task, total_steps))
        if precision is not None:
            _store_frozen_in(built.model, precision)
        monitor = make_monitor(built.model) if make_monitor is not None else None
        loop = _StepLoop(built, task, cfg, grad_accum, total_steps, run_device, precision, monitor)
        # Dropout masks draw from the global generator; reseed it so they match across methods.
        torch.manual_seed(cfg.seed)
        curve = _ValidationCurve(eval_every, task, built.model, run_device, precision)
        desc = f"{spec.name} lr={cfg.lr:g} seed={cfg.seed}"
        bar = _progress_bar(total_steps, desc, progress_position) if progress else None
        start = time.perf_counter()
        built.model.train()
        try:
            loop.run(curve, bar)
        finally:
            if bar is not None:
                bar.close()
            if monitor is not None and hasattr(monitor, "close"):
                monitor.close()
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        train_seconds = time.perf_counter() - start - curve.seconds
        with autocast(run_device, precision):
            metrics = {split: task.evaluate(built.model, split) for split in evaluate_on}
        if eval_every:
            curve.finish(loop.step, metrics)
        # Per-example test outcomes, where the task records them (Scores), for paired comparisons.
        examples = getattr(metrics.get("test"), "examples", None)
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        seconds = time.perf_counter() - start
        state_bytes = optimizer_state_bytes(built.optimizer)

    return RunResult(
        method=spec.name,
        lr=cfg.lr,
        seed=cfg.seed,
        validation=dict(metrics.get("validation", {})),
        test=dict(metrics.get("test", {})),
        final_train_loss=math.nan if loop.diverged else _tail_mean(loop.losses),
        loss_curve=loop.losses,
        steps=len(loop.losses),
        trainable_params=sum(p.numel() for p in loop.trainable),
        optimizer_state_bytes=state_bytes,
        train_seconds=train_seconds,
        seconds=seconds,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_kind=memory.kind,
        diverged=loop.diverged,
        extra=_extra(run_device, precision, grad_accum, examples, curve.record() if eval_every else None),
    )


def _tail_mean(losses: Sequence[float]) -> float:
    """The mean of the finite losses of the last 10% of steps: a single step is too noisy."""
    tail = max(1, math.ceil(0.1 * len(losses)))
    finite = [x for x in losses if math.isfinite(x)] or [math.nan]
    return sum(finite[-tail:]) / len(finite[-tail:])


def _extra(
    device: torch.device, precision: Any, grad_accum: int, examples: Any, curve: dict[str, Any] | None
) -> dict[str, Any]:
    """The run record's ``extra``: where and how it ran, and what only some runs record."""
    return {
        "device": str(device),
        "dtype": "float32" if precision is None else str(precision).removeprefix("torch."),
        "grad_accum": grad_accum,
        **({"cuda_device": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
        **({EXAMPLES_KEY: examples} if examples else {}),
        **({VALIDATION_CURVE_KEY: curve} if curve is not None else {}),
    }


def _total_steps(n_train: int, cfg: TrainConfig, grad_accum: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: the epochs' steps, capped by ``max_steps`` (which replaces them
    when ``cfg.epochs`` is 0)."""
    steps_per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps) if cfg.epochs > 0 else max_steps
    return total_steps


def _progress_bar(total: int, desc: str, position: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, position=position, dynamic_ncols=True)


class _ValidationCurve:
    """The validation scores every ``every`` optimizer steps and at the end (``eval_every``).

    Scoring must not change training: no dropout mask or other draw may consume the global
    generator, and the model returns to train mode. Its time is kept apart (``seconds``).
    """

    def __init__(
        self, every: int, task: PreparedTask, model: nn.Module, device: torch.device, precision: Any
    ) -> None:
        self.every = every
        self.task, self.model, self.device, self.precision = task, model, device, precision
        self.steps: list[int] = []
        self.scores: list[dict] = []
        self.seconds = 0.0

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to score after ``step``; the last step's score is the final evaluation's."""
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def score(self, at: int) -> None:
        began = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast(self.device, self.precision):
            scores = self.task.evaluate(self.model, "validation")
        self.model.train()
        self.steps.append(at)
        self.scores.append(dict(scores))
        self.seconds += time.perf_counter() - began

    def finish(self, at: int, metrics: dict[str, Any]) -> None:
        """The last point: the final evaluation's validation scores, or a scoring of its own."""
        if "validation" in metrics:
            self.steps.append(at)
            self.scores.append(dict(metrics["validation"]))
        else:
            self.score(at)

    def record(self) -> dict[str, Any]:
        names = list(dict.fromkeys(k for scores in self.scores for k in scores))
        return {
            "split": "validation",
            "every": self.every,
            "steps": self.steps,
            "metrics": {k: [float(s.get(k, math.nan)) for s in self.scores] for k in names},
            "seconds": self.seconds,
        }


class _StepLoop:
    """The optimizer steps of one run: epochs of seeded shuffles, ``grad_accum`` micro-batches a
    step, until ``total_steps`` or divergence. Records the loss of every step."""

    def __init__(
        self,
        built: Any,
        task: PreparedTask,
        cfg: TrainConfig,
        grad_accum: int,
        total_steps: int,
        device: torch.device,
        precision: Any,
        monitor: Any,
    ) -> None:
        self.model, self.optimizer, self.after_step = built.model, built.optimizer, built.after_step
        self.task, self.cfg, self.grad_accum, self.total_steps = task, cfg, grad_accum, total_steps
        self.device, self.precision, self.monitor = device, precision, monitor
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        from transformers import get_cosine_schedule_with_warmup

        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, total_steps)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.losses: list[float] = []
        self.step = 0
        self.diverged = False

    def run(self, curve: _ValidationCurve, bar: Any) -> None:
        train = self.task.train
        while self.step < self.total_steps and not self.diverged:
            micro = torch.randperm(len(train), generator=self.shuffle).split(self.cfg.batch_size)
            for first in range(0, len(micro), self.grad_accum):
                if self.step >= self.total_steps:
                    break
                if not self._optimizer_step(micro[first : first + self.grad_accum]):
                    self.diverged = True
                    break
                if curve.due(self.step, self.total_steps):
                    curve.score(self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}", refresh=False)

    def _optimizer_step(self, group: Sequence[torch.Tensor]) -> bool:
        """One optimizer step over the micro-batches of ``group``; False when it diverged."""
        self.optimizer.zero_grad(set_to_none=True)
        ctx = self.monitor.measure(self.step) if self.monitor is not None else nullcontext()
        step_loss = 0.0
        with ctx:
            for batch_idx in group:
                batch = self.task.train.batch(batch_idx.tolist())
                with autocast(self.device, self.precision):
                    loss = self.task.loss(self.model, batch)
                (loss / len(group) if len(group) > 1 else loss).backward()
                # One host sync per micro-batch for the loss curve; the benchmark
                # needs it and the training step itself dwarfs it.
                step_loss += float(loss.detach()) / len(group)
        self.losses.append(step_loss)
        if not math.isfinite(step_loss):
            return False
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        try:
            self.optimizer.step()
        except NonFiniteGradientError:
            return False
        if self.after_step is not None:
            self.after_step(self.step)
        self.scheduler.step()
        self.step += 1
        return True
