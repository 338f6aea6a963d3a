"""Checks of user-given options, shared by the optimizers, ``lorapro.attach`` and the integrations:
one message per kind of mistake, each naming the value and what is accepted."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from .errors import LoRAProConfigError

__all__ = ["NONFINITE_POLICIES", "check_choice", "check_number"]

NONFINITE_POLICIES = ("raise", "skip")


def check_number(
    name: str, value: Any, *, low: float = 0.0, high: float | None = None, open_high=False, open_low=False
) -> float:
    """Validate a real hyper-parameter (numpy scalars welcome) and return it as a float.

    The value must be finite and in [low, high], with either end open on request. Returning a
    plain float keeps param groups loadable with ``torch.load(weights_only=True)``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoRAProConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise LoRAProConfigError(f"{name} must be finite, got {value!r}")
    if value < low or (open_low and value == low):
        raise LoRAProConfigError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if open_high else value > high):
        bound = f"< {high}" if open_high else f"<= {high}"
        raise LoRAProConfigError(f"{name} must be {bound}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise :class:`LoRAProConfigError` unless ``value`` is one of ``choices`` (``x_mode``, ``mode``,
    the non-finite policy...)."""
    choices = tuple(choices)
    if value not in choices:
        raise LoRAProConfigError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")
