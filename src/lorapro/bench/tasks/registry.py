"""The task registry: a name (``mr``) or a name with an argument (``text-csv:PATH``) -> a Task."""

from __future__ import annotations

from collections.abc import Callable

from .base import Task

__all__ = ["TASKS", "get_task", "register_task", "task_names"]

#: name -> factory taking the text after ``name:`` (None when there is none).
TASKS: dict[str, Callable[[str | None], Task]] = {}


def register_task(name: str, cls: type[Task], *, takes_argument: bool = False) -> None:
    def factory(argument: str | None) -> Task:
        if takes_argument:
            if not argument:
                raise ValueError(f"task {name!r} needs an argument: write it as {name}:VALUE")
            return cls(argument)  # type: ignore[call-arg]
        if argument is not None:
            raise ValueError(f"task {name!r} takes no argument, got {name}:{argument}")
        return cls()

    TASKS[name] = factory


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(spec: str) -> Task:
    """``"mr"`` -> the movie-review task; ``"text-csv:data/my.csv"`` -> a CSV task on that file."""
    name, sep, argument = spec.partition(":")
    name = name.strip()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TASKS[name](argument if sep else None)
