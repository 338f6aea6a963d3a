"""The checks every bench command (demo, bench, diagnose) runs before it loads or trains
anything, in one place and in one order: ``--out`` writable, the methods known and runnable
here, the task known and its model and data present.

Each check raises one of :mod:`lorapro.bench.errors`' set-up errors, which the commands turn
into one line on stderr and exit status 2 (:func:`lorapro.bench.errors.run_command`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SetupError
from .methods import MethodSpec, get_method
from .options import require_writable_folder
from .tasks import Task, get_task

__all__ = ["Opening", "check_methods", "check_task", "opening_checks"]


@dataclass
class Opening:
    """What the opening checks found: the output folder, the methods, the task (if checked)."""

    out: Path | None
    methods: list[MethodSpec]
    task: Task | None


def check_methods(names: Sequence[str], error: type[SetupError] = SetupError) -> list[MethodSpec]:
    """The methods named (repeats dropped, order kept), each known and runnable here.

    Unknown names raise ``error`` listing the known ones; a method missing its package raises
    :class:`~lorapro.bench.errors.MethodUnavailableError` (its ``check``), before the first
    (possibly hours-long) run of an earlier method.
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise error("no methods given; pass --methods full,lora,lorapro")
    try:
        specs = [get_method(name) for name in names]
    except ValueError as exc:
        raise error(str(exc)) from None
    for spec in specs:
        if spec.check is not None:
            spec.check()
    return specs


def check_task(task: str | Task, error: type[SetupError] = SetupError, **options: Any) -> Task:
    """The task (a name such as ``mr`` or ``jsonl:PATH``, or a Task), given ``options`` (``model``,
    ``eval_file``, ``answer_regex``; None values are left out), its model and data present
    (:class:`~lorapro.bench.errors.MissingAssetError` names the package to install)."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        task = get_task(task) if isinstance(task, str) else task
        if given:
            task.configure(**given)
        task.check()
    except SetupError:
        raise
    except ValueError as exc:
        raise error(str(exc)) from None
    return task


def opening_checks(
    *,
    out: str | Path | None,
    methods: Sequence[str] = (),
    task: str | Task | None = None,
    error: type[SetupError] = SetupError,
    **task_options: Any,
) -> Opening:
    """Every check a command runs before it loads or trains anything, in this order: ``out``
    (created and proven writable; None skips it), ``methods`` (skipped when empty), ``task``
    (skipped when None)."""
    folder = require_writable_folder(out) if out is not None else None
    specs = check_methods(methods, error) if methods else []
    checked = check_task(task, error, **task_options) if task is not None else None
    return Opening(folder, specs, checked)
