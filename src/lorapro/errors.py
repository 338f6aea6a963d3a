"""Exceptions lorapro raises: each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["LoRAProConfigError", "LoRAProWarning", "NonFiniteGradientError"]


class LoRAProConfigError(ValueError):
    """The model, the parameters or the options cannot be used with LoRA-Pro."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient (raw or adjusted) held NaN or Inf; nothing was modified."""


class LoRAProWarning(UserWarning):
    """Something the user should know about how LoRA-Pro is applied (shown once per cause)."""
