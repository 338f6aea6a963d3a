"""Helpers for LoRA-Pro on FSDP2 (``torch.distributed.fsdp.fully_shard``).

The optimizers themselves need nothing FSDP-specific:

- **Efficient mode, any optimizer:** ``lorapro.attach(model)`` (before or after ``fully_shard``),
  then a stock ``torch.optim.AdamW`` or any other optimizer. The adjustment runs inside backward
  on the whole factors FSDP2 gathers anyway, so it adds no collective.
- **Full mode** (and efficient mode without attach): build ``lorapro.LoRAProAdamW`` (or
  ``LoRAProSGD``) after ``fully_shard``. It works on each rank's shards and communicates r x r
  terms per layer (full mode also O(r n) per layer, never an m x n matrix); see
  ``docs/integrations.md`` and ``docs/scaling.md``.

What this module adds: :func:`lora_shard_placement_fn`, which shards the A factors by columns so
that the optimizers communicate only r x r terms (with FSDP2's default placement each step
re-shards A), and :func:`full_state` for tests and small exports.

Checkpoints: ``optimizer.state_dict()`` holds DTensor moments; save and load them per rank
(``torch.save``/``torch.load`` of each rank's dict, or ``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..adamw import LoRAProAdamW
from ..pairs import find_lora_pairs
from ..sgd import LoRAProSGD

__all__ = ["full_state", "lora_shard_placement_fn"]


def lora_shard_placement_fn(model: nn.Module) -> Callable[[nn.Parameter], Shard | None]:
    """``shard_placement_fn`` for ``fully_shard``: LoRA A factors by columns, the rest default.

    Usage: ``place = lora_shard_placement_fn(model)``, then ``fully_shard(block,
    shard_placement_fn=place)`` for every block and the root. Call it before ``fully_shard``
    (it recognises the parameters by identity).
    """
    a_ids = {id(pair.A) for pair in find_lora_pairs(model)}

    def place(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in a_ids else None

    return place


def full_state(model: nn.Module, trainable_only: bool = True) -> dict[str, Tensor]:
    """Every (trainable) parameter as a full tensor on every rank: for tests and small exports."""
    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        value = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = value.detach().clone()
    return out


_DEPRECATED = {"FSDPLoRAProAdamW": LoRAProAdamW, "FSDPLoRAProSGD": LoRAProSGD}


def __getattr__(name: str) -> Any:
    # The FSDP subclasses of 0.1.0 are the plain optimizers now, which handle DTensor factors.
    if name in _DEPRECATED:
        replacement = _DEPRECATED[name].__name__
        warnings.warn(
            f"lorapro.integrations.fsdp.{name} is deprecated: lorapro.{replacement} handles FSDP2-sharded "
            f"factors itself (build it after fully_shard); {name} is now lorapro.{replacement}",
            FutureWarning,
            stacklevel=2,
        )
        return _DEPRECATED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
