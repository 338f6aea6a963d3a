"""The errors a user of the bench commands fixes (a bad option, a missing package, a method
that cannot run here), and the one mapping from an error to an exit status.

A leaf module: it imports nothing of the bench, so every other module can raise these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_SETUP",
    "SETUP_ERRORS",
    "MethodUnavailableError",
    "MissingAssetError",
    "OutputFolderError",
    "SetupError",
    "exit_code",
    "run_command",
]

#: Exit status of a command stopped by a bad option or set-up problem (argparse's own status).
EXIT_SETUP = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class SetupError(ValueError):
    """A bad option value or inconsistent options; the message names the option and the fix."""


class OutputFolderError(SetupError):
    """``--out`` cannot be written: raised before anything is loaded or trained."""


class MissingAssetError(RuntimeError):
    """An offline model or data package is not installed; the message names the fix."""


class MethodUnavailableError(RuntimeError):
    """A method cannot run here (missing package, or PEFT does not support it on this model)."""


#: Set-up problems and bad options: not bugs, so a command prints their message in one line
#: and exits with EXIT_SETUP instead of showing a traceback.
SETUP_ERRORS: tuple[type[BaseException], ...] = (SetupError, MissingAssetError, MethodUnavailableError)


def exit_code(exc: BaseException) -> int | None:
    """The exit status for ``exc``, or None for an error that is a bug (its traceback is kept)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SETUP_ERRORS):
        return EXIT_SETUP
    return None


def run_command(command: str, body: Callable[[], int | None], *, stderr: TextIO | None = None) -> int:
    """Run a command's body and return its exit status: the body's own, or :func:`exit_code`'s
    for an error it raised, after one line ``lorapro COMMAND: error: MESSAGE`` on stderr."""
    try:
        return int(body() or 0)
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code(exc)
        if code is None:
            raise
        if code == EXIT_SETUP:
            print(f"lorapro {command}: error: {exc}", file=stderr or sys.stderr)
        return code
