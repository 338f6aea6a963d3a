"""What a benchmark found: one :class:`MethodOutcome` per method and the :class:`BenchResult`
that the reports are written from. Shared by the harness (which fills them) and the reports
(which read them), so that neither imports the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import RunResult

if TYPE_CHECKING:
    from .config import BenchConfig
    from .tasks.base import Task

__all__ = ["BenchResult", "MethodOutcome"]


@dataclass
class MethodOutcome:
    """What the benchmark found for one method."""

    method: str
    description: str
    #: lr -> validation metrics of the seed-0 tuning run (None for an unavailable method).
    grid: dict[float, dict[str, float]] = field(default_factory=dict)
    chosen_lr: float | None = None
    runs: list[RunResult] = field(default_factory=list)  # the chosen lr, one per seed
    unavailable: str | None = None  # why the method could not run here
    pending: str | None = None  # report_only: what is not run yet
    #: lr -> where it came from: "grid", "edge" (extension) or "refinement".
    origins: dict[float, str] = field(default_factory=dict)
    #: Rates whose tuning run diverged.
    diverged: list[float] = field(default_factory=list)
    #: Why the chosen rate won, in words (the score, the runner-up, ties).
    rule: str = ""

    def test_values(self, metric: str) -> list[float]:
        return [r.test.get(metric, math.nan) for r in self.runs]


@dataclass
class BenchResult:
    config: BenchConfig
    task: Task
    task_info: dict[str, Any]
    outcomes: list[MethodOutcome]
    all_runs: list[RunResult]
    out: Path
    environment: dict[str, Any]
    runs_executed: int
    runs_reused: int
    #: Facts about the data the verdict must warn about (a test class never seen in training).
    data_warnings: list[str] = field(default_factory=list)
    #: Validation and test examples whose input also occurs in training, per split
    #: (``{"test": {"in_training": n, "examples": m}}``; empty when the task's splits cannot be compared).
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)
