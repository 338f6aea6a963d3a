"""What one run is given and what it returns: :class:`TrainConfig` and :class:`RunResult`, and
:class:`Scores`, a split's metrics with the per-example outcomes behind them.

A leaf module (it imports nothing of the bench), so that the methods, the training loop, the
harness and the reports share these types without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "EXAMPLES_KEY",
    "VALIDATION_CURVE_KEY",
    "RunResult",
    "Scores",
    "TrainConfig",
    "accuracy_scores_of",
    "example_outcomes",
    "examples_of",
    "validation_curve_of",
]

#: Where a run record keeps its per-example test outcomes: under ``extra``, so that records
#: written before they existed load unchanged, and records with them load in older versions.
EXAMPLES_KEY = "test_examples"
#: Where a run record keeps its validation curve (``--eval-every``), under ``extra`` for the same
#: reason: ``{"split": "validation", "every": N, "steps": [...], "metrics": {name: [...]}}``, one
#: value per step in ``steps`` (every N optimizer steps, and the last step).
VALIDATION_CURVE_KEY = "validation_curve"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the method and the task; identical across methods.

    Its :meth:`to_dict` enters every stored run's hash: a new field changes every hash.
    """

    lr: float
    epochs: int = 2
    batch_size: int = 32
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # None: no clipping (the default for every method)
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def example_outcomes(values: Sequence[float], weights: Sequence[float] | None = None) -> dict[str, list]:
    """One metric's outcome per example, in the split's order: the metric is
    ``sum(w * v) / sum(w)`` (weights 1 when absent, e.g. 0/1 correctness for accuracy; the
    number of scored tokens for a loss per token)."""
    if weights is not None and len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    out: dict[str, list] = {"values": [_compact(v) for v in values]}
    if weights is not None:
        out["weights"] = [_compact(w) for w in weights]
    return out


def _compact(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


class Scores(dict):
    """A split's metrics (name -> value), as a task's ``evaluate`` returns them, optionally with
    ``examples``: name -> :func:`example_outcomes`, which the verdict's paired bootstrap uses.

    A plain dict to every reader that only wants the metrics.
    """

    def __init__(self, metrics: Mapping[str, float], examples: Mapping[str, dict] | None = None) -> None:
        super().__init__(metrics)
        self.examples: dict[str, dict] = dict(examples or {})


def accuracy_scores_of(correct: Sequence[int]) -> Scores:
    """``{"accuracy": ...}`` from each example's 0/1 correctness, kept for the paired bootstrap."""
    if not correct:
        return Scores({"accuracy": float("nan")})
    return Scores({"accuracy": sum(correct) / len(correct)}, {"accuracy": example_outcomes(correct)})


@dataclass
class RunResult:
    method: str
    lr: float
    seed: int
    validation: dict[str, float]
    test: dict[str, float]
    final_train_loss: float  # mean of the last 10% of steps: a single step is too noisy
    loss_curve: list[float]
    steps: int
    trainable_params: int
    optimizer_state_bytes: int
    train_seconds: float
    seconds: float  # training plus evaluation, excluding model loading
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    diverged: bool = False  # a non-finite training loss was seen
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def test_examples(self) -> dict[str, dict]:
        """Per-example test outcomes by metric (see :func:`example_outcomes`); empty for runs
        stored before they were recorded."""
        return examples_of(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def examples_of(run: Any) -> dict[str, dict]:
    """``run.test_examples`` for any run result with an ``extra`` dict, including one built by an
    earlier version of this class (a long benchmark started on an older checkout)."""
    return (getattr(run, "extra", None) or {}).get(EXAMPLES_KEY) or {}


def validation_curve_of(run: Any) -> dict[str, Any]:
    """The run's validation curve (see :data:`VALIDATION_CURVE_KEY`); empty when none was recorded."""
    return (getattr(run, "extra", None) or {}).get(VALIDATION_CURVE_KEY) or {}
