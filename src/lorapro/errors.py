"""Exceptions lorapro raises: each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["LoRAProConfigError", "NonFiniteGradientError"]


class LoRAProConfigError(ValueError):
    """The model, the parameters or the options cannot be used with LoRA-Pro."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient (raw or adjusted) held NaN or Inf; nothing was modified."""
