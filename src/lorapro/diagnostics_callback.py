"""Gradient diagnostics inside a Hugging Face ``Trainer``: a ``TrainerCallback``.

Kept out of :mod:`lorapro.diagnostics` because it imports ``transformers`` at module level;
the core library does not need transformers to import.

Where it hooks in (transformers 5.23 ``Trainer._inner_training_loop``)::

    on_step_begin          <- arm: base weights get requires_grad (before the first forward
                              pass of the optimizer step, i.e. of the first micro-batch)
    forward / backward     (x gradient_accumulation_steps)
    clip_grad_norm_        (the captured gradients are invisible to it, see lorapro.diagnostics)
    on_pre_optimizer_step  <- measure and restore, before optimizer.step() changes A and B
    optimizer.step()
    on_step_end            <- safety net: drop a step that was armed but never measured

The step number is ``state.global_step`` at ``on_step_begin``: the number of optimizer steps
already taken, so step 0 is the first update, as in the plain-loop helper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ._extras import raise_missing_extra

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as exc:
    raise_missing_extra(exc, "lorapro.diagnostics_callback")

from .diagnostics import GradientMonitor, LayerRecord, write_csv

__all__ = ["GradientDiagnosticsCallback"]

logger = logging.getLogger(__name__)


class GradientDiagnosticsCallback(TrainerCallback):
    """Records LoRA and LoRA-Pro equivalent-gradient alignment on chosen Trainer steps.

    Example::

        callback = GradientDiagnosticsCallback(steps="0:500:25", out_dir="diag", run="lora")
        trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[callback])
        trainer.train()
        callback.records            # list of LayerRecord; also diag/records.jsonl and .csv

    Args:
        steps: steps to measure (integers, ``"0:500:25"``-style string, predicate, or None
            for every step), counted in optimizer steps from 0.
        out_dir: if given, records stream to ``out_dir/records.jsonl`` and ``records.csv`` is
            written at the end of training; with ``plot=True`` the figures too.
        run: label stored in every record (e.g. the method name).
        plot: draw the figures of :func:`lorapro.diagnostics_plot.write_figures` into
            ``out_dir`` at the end of training (needs matplotlib).
        model: the model to watch; default: the model the Trainer passes to ``on_train_begin``.
        monitor_kwargs: passed to :class:`~lorapro.diagnostics.GradientMonitor` (``select``,
            ``keep_gradients``, ``rank_rtol``, ...).
    """

    def __init__(
        self,
        steps: Iterable[int] | Callable[[int], bool] | str | None,
        *,
        out_dir: str | Path | None = None,
        run: str = "",
        plot: bool = False,
        model: nn.Module | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.steps = steps
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run = run
        self.plot = plot
        self.monitor_kwargs = monitor_kwargs
        self.monitor: GradientMonitor | None = None
        if model is not None:
            self._make_monitor(model)

    @property
    def records(self) -> list[LayerRecord]:
        return [] if self.monitor is None else self.monitor.records

    def _make_monitor(self, model: nn.Module) -> None:
        jsonl = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            jsonl = self.out_dir / "records.jsonl"
            jsonl.unlink(missing_ok=True)  # records of this training run only
        self.monitor = GradientMonitor(model, self.steps, run=self.run, jsonl=jsonl, **self.monitor_kwargs)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            model = kwargs.get("model")
            if model is None:
                raise ValueError("GradientDiagnosticsCallback: the Trainer passed no model; pass model=...")
            self._make_monitor(model)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.before_forward(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is not None and self.monitor.active_step is not None:
            self.monitor.after_backward()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Normally after_backward already ran; this only guards against a Trainer variant that
        # skips on_pre_optimizer_step, so base weights never stay trainable.
        if self.monitor is not None and self.monitor.active_step is not None:
            logger.warning(
                "lorapro diagnostics: step %s was armed but not measured", self.monitor.active_step
            )
            self.monitor.abort()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            return
        self.monitor.abort()
        if self.out_dir is None or not self.monitor.records:
            return
        write_csv(self.monitor.records, self.out_dir / "records.csv")
        if self.plot:
            from .diagnostics_plot import write_figures

            write_figures(self.monitor.records, self.out_dir)
