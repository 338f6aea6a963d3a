"""Where a model runs: the device of its parameters.

A leaf module (it imports nothing of the bench), so that the training loop, the tasks'
metrics and the text splits ask one function instead of each peeking at a parameter.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; the CPU for a model without parameters."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
