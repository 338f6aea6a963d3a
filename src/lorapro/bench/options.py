"""Command-line option parsing shared by the bench commands (demo, diagnose, bench)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["parse_lrs", "positive_int"]


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
