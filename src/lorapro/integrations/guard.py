"""Find the lorapro optimizer inside wrappers, and check it still owns its LoRA factors.

Every lorapro optimizer runs this check before each step by itself (``sync_pairs``): DeepSpeed
(ZeRO stages 1-3, bf16/fp16 master weights) replaces the tensors in ``optimizer.param_groups``
after the optimizer was built, and the replacements would otherwise get plain AdamW/SGD.
:func:`assert_owns_pairs` runs the same check on demand, e.g. right after a wrapper's set-up.
"""

from __future__ import annotations

from typing import Any

from .._base import LoRAProOptimizer
from ..errors import LoRAProConfigError

__all__ = ["assert_owns_pairs", "unwrap_lorapro"]


def unwrap_lorapro(optimizer: Any) -> LoRAProOptimizer | None:
    """The lorapro optimizer inside wrappers (Accelerate's ``AcceleratedOptimizer``, DeepSpeed's
    ZeRO and mixed-precision optimizers all keep it as ``.optimizer``), or None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, LoRAProOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def assert_owns_pairs(optimizer: Any, when: str = "") -> None:
    """Raise :class:`~lorapro.LoRAProConfigError` if LoRA-Pro would not run on the model's active
    LoRA pairs at the next step (factors swapped out of the optimizer, an adapter it does not
    hold, an attached model)."""
    opt = unwrap_lorapro(optimizer)
    if opt is None:
        raise LoRAProConfigError(f"{type(optimizer).__name__} is not and does not wrap a lorapro optimizer")
    opt.sync_pairs(when)
