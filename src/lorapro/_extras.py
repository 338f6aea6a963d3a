"""Optional dependencies: which extra of lorapro installs which package, and the error a user
gets when one is missing.

The core library (closed form, optimizers, ``attach``, diagnostics) needs only torch and peft.
Everything else is imported where a feature needs it; a missing package then raises
:class:`MissingExtraError`, which names the extra to install instead of a bare
``ModuleNotFoundError`` from deep inside an import.
"""

from __future__ import annotations

import importlib.util
from typing import NoReturn

#: Top-level module -> the extra of lorapro that installs it.
EXTRA_OF_MODULE = {
    "transformers": "trainer",
    "accelerate": "trainer",
    "matplotlib": "plots",
    "deepspeed": "deepspeed",
    "numpy": "bench",
    "tqdm": "bench",
}

#: What each command of the ``lorapro`` CLI imports beyond the core.
BENCH_MODULES = ("transformers", "accelerate", "matplotlib", "numpy", "tqdm")


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency of a lorapro feature is not installed; the message names the extra."""


def _message(module: str, feature: str, extra: str) -> str:
    return (
        f"{feature} needs {module}, which is not installed. "
        f"Install lorapro's {extra!r} extra: pip install '.[{extra}]' in a clone of lorapro, "
        f"or pip install 'lorapro[{extra}] @ git+URL' with lorapro's repository URL"
    )


def raise_missing_extra(exc: ModuleNotFoundError, feature: str) -> NoReturn:
    """Re-raise ``exc`` (from an import in ``feature``) as :class:`MissingExtraError` when the
    missing module is one an extra provides; any other import failure propagates unchanged."""
    top = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None or top != exc.name:  # a submodule missing from an installed package: not ours
        raise exc
    raise MissingExtraError(_message(top, feature, extra), name=top) from exc


def require(modules: tuple[str, ...] | list[str], feature: str, extra: str | None = None) -> None:
    """Raise :class:`MissingExtraError` naming the extra if any of ``modules`` is not installed.

    Checked with ``importlib.util.find_spec`` (nothing is imported), so a command can fail in
    one line before it loads a model or writes a file. ``extra`` overrides the per-module one
    (a command that needs several extras' packages names the one that installs them all).
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(missing)
        chosen = extra or EXTRA_OF_MODULE[missing[0]]
        raise MissingExtraError(_message(names, feature, chosen), name=missing[0])
