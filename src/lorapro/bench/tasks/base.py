"""What a benchmark task is: data splits, a fresh model, where LoRA goes, a loss and metrics.

A task is one small module under ``lorapro.bench.tasks`` that subclasses :class:`Task`
and registers itself; the runner, the methods and the reports never look inside it.
:meth:`Task.prepare` does the expensive, method-independent work once (reading and
splitting the data, tokenising) and returns a :class:`PreparedTask` that every run of
every method shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "Batchable",
    "Metric",
    "PreparedTask",
    "Task",
    "TaskOptions",
    "hf_model_loss",
]


class Batchable(Protocol):
    """A split the training loop can draw batches from."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Metric:
    """A named score and its direction (learning rates are chosen by the task's selection metric)."""

    name: str
    higher_is_better: bool = True

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` beats ``b`` (NaN never wins)."""
        if a != a:  # NaN
            return False
        if b != b:
            return True
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class TaskOptions:
    """Size options every task honours; ``None`` means the task's own default."""

    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    max_length: int | None = None
    #: Seed of the train/validation/test split. It stays fixed while training seeds vary,
    #: so the seeds measure the spread of training, not of the data draw.
    data_seed: int = 0


def hf_model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from the batch's ``labels``: the training
    loss of every task whose model has the head for it (sequence classification, causal LM)."""
    return model(**batch).loss


@dataclass
class PreparedTask:
    """Everything a run needs from the task, built once and shared by all runs."""

    train: Batchable
    validation: Batchable
    test: Batchable
    #: Returns a new, unwrapped model each call (called under ``torch.manual_seed``).
    load_model: Callable[[], nn.Module]
    #: Names of the modules that get LoRA (every linear or 1x1 conv of the body).
    lora_targets: Callable[[nn.Module], list[str]]
    #: Training loss of one batch.
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    #: Metrics of a model on ``"validation"`` or ``"test"``.
    evaluate: Callable[[nn.Module, str], dict[str, float]]
    #: PEFT task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None for a plain module.
    peft_task_type: str | None = None
    #: A weightless model of the same structure (on the meta device), for checking module
    #: names before anything trains; None: the harness uses ``load_model``.
    model_skeleton: Callable[[], nn.Module] | None = None
    #: Modules trained in full next to LoRA (a freshly initialised head).
    modules_to_save: list[str] | None = None
    #: Facts about the data and model for the report (sizes, sources, notes).
    info: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A benchmark task. Subclasses set the class attributes and implement :meth:`prepare`."""

    name: str = ""
    description: str = ""
    #: Chooses the learning rate on the validation split.
    selection_metric: Metric = Metric("accuracy")
    #: Headline test metric of the tables and the gap-closed column.
    report_metric: Metric = Metric("accuracy")
    #: Defaults of the options, chosen so that one run takes about a minute on 2 CPU cores.
    default_train_size: int = 1000
    default_val_size: int = 500
    default_test_size: int = 1000
    default_max_length: int = 64
    default_epochs: int = 2
    default_batch_size: int = 32
    model_name: str = ""
    #: The dtype a task that reads a model folder loads its weights in (the harness sets it
    #: from ``--dtype``). Not part of the task's identity: the run's precision is hashed apart.
    load_dtype: torch.dtype = torch.float32

    def configure(self, **options: Any) -> None:
        """Take options of ``lorapro bench`` beyond :class:`TaskOptions` (``model``,
        ``eval_file``, ``answer_regex``); a task refuses those it does not take, and raises
        ValueError naming the fix. This base class takes none.

        Called once, before :meth:`check`. Whatever changes the data or the model must
        enter :meth:`identity`.
        """
        if options:
            names = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(options))
            raise ValueError(f"task {self.name} does not take {names}")

    @abstractmethod
    def prepare(self, options: TaskOptions) -> PreparedTask:
        """Read, split and encode the data; raise ``MissingAssetError`` naming the package to install."""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise ``MissingAssetError`` if the data or model cannot be found (cheap; no loading)."""

    def identity(self) -> dict[str, Any]:
        """What distinguishes this task's data in a run's config hash (e.g. a CSV's path and checksum)."""
        return {"task": self.name}
