"""Benchmark tasks. Each module registers one task; adding a task means adding one file
and importing it below."""

from __future__ import annotations

from . import fashion, gsm, jsonl, mnist5k, mr, text_csv, trec  # noqa: F401  (registration side effects)
from .base import Batchable, Metric, PreparedTask, Task, TaskOptions
from .registry import TASKS, get_task, register_task, task_names

__all__ = [
    "TASKS",
    "Batchable",
    "Metric",
    "PreparedTask",
    "Task",
    "TaskOptions",
    "get_task",
    "register_task",
    "task_names",
]
