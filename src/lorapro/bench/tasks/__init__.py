"""Benchmark tasks. Each task is one module that registers it (mr, trec, text_csv, gsm, jsonl,
fashion, mnist5k); adding a task means adding one file and importing it below. Beside them, what
a family of tasks shares: text_classification; causal_lm (gsm, jsonl); image_classification,
image_files, image_splits and efficientnet (fashion, mnist5k); and each task's own data reading
where it is large (gsm_problems, jsonl_format, jsonl_tokens)."""

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
