"""Command-line option parsing shared by the bench commands (demo, diagnose, bench)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OutputFolderError

__all__ = [
    "DefaultsHelpFormatter",
    "OutputFolderError",
    "parse_lrs",
    "positive_int",
    "removed_if_left_empty",
    "require_writable_folder",
]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help where it has a default to show and its help does not
    state one already (argparse's ArgumentDefaultsHelpFormatter writes ``(default: None)`` too)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


@contextlib.contextmanager
def removed_if_left_empty(path: str | Path | None) -> Iterator[None]:
    """Around a command that writes into ``path``: if the command fails and the folder (or any of
    its parents) did not exist before and is still empty, remove it, so that a failed command does
    not leave an empty output folder behind."""
    if path is None:
        yield
        return
    folder = Path(path).absolute()
    new = [folder, *folder.parents]
    new = [p for p in new if not p.exists()]
    try:
        yield
    except BaseException:
        for created in new:  # deepest first
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                created.rmdir()
        raise


def require_writable_folder(path: str | Path) -> Path:
    """The ``--out`` folder, created if needed and proven writable by writing a file into it.

    Every command that writes results calls this first, so a bad ``--out`` fails in one line
    instead of after the training it would have stored.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"--out {folder} is a file, not a folder; give a folder with --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lorapro-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        message = f"--out {folder} cannot be written ({reason}); give another folder with --out"
        raise OutputFolderError(message) from None
    return folder


def positive_int(text: str) -> int:
    """argparse type for sizes, counts and steps: an integer > 0, or a message saying so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_lrs(values: Sequence[str] | None, methods: Sequence[str]) -> dict[str, float]:
    """``--lr 1e-3`` sets every method's rate; ``--lr lora=1e-3`` sets one (repeatable).

    Raises ValueError naming the bad item: a non-number, a rate <= 0, or a method that is not
    among ``methods``.
    """
    lrs: dict[str, float] = {}
    for item in values or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, sep, rate = part.rpartition("=")
            try:
                lr = float(rate)
            except ValueError:
                raise ValueError(f"--lr expects RATE or METHOD=RATE, got {part!r}") from None
            if not lr > 0:
                raise ValueError(f"learning rate must be > 0, got {part!r}")
            if sep:
                if name not in methods:
                    raise ValueError(f"--lr names {name!r}, which is not among the methods {list(methods)}")
                lrs[name] = lr
            else:
                lrs.update(dict.fromkeys(methods, lr))
    return lrs
