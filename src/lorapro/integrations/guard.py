"""Catch wrappers that swap an optimizer's parameters behind lorapro's back.

DeepSpeed (ZeRO stages 1-3, bf16/fp16 master weights) and Accelerate's FSDP2 ``prepare`` replace
the tensors in ``optimizer.param_groups`` after the optimizer was built. lorapro found its LoRA
pairs on the model at construction; after such a swap the pairs point at tensors the optimizer
no longer updates, their gradients never arrive, and the new tensors get plain AdamW/SGD: LoRA
training that looks fine and is not LoRA-Pro. :func:`install_pair_guard` turns that into an
error at the first step.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from .._base import LoRAProOptimizer
from ..errors import LoRAProConfigError

__all__ = ["assert_owns_pairs", "install_pair_guard", "unwrap_lorapro"]


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
    """Raise :class:`~lorapro.LoRAProConfigError` if a LoRA factor the optimizer adjusts is no
    longer among its parameters (they were swapped by a wrapper)."""
    opt = unwrap_lorapro(optimizer)
    if opt is None:
        raise LoRAProConfigError(f"{type(optimizer).__name__} is not and does not wrap a lorapro optimizer")
    refresh = getattr(opt, "_refresh_pairs", None)
    if refresh is not None:  # the FSDP optimizers follow a swap by themselves
        refresh()
    owned = {id(p) for group in opt.param_groups for p in group["params"]}
    lost = [pair.name for pair in opt.pairs if id(pair.A) not in owned or id(pair.B) not in owned]
    if not lost and opt.pairs:
        return
    shapes = sorted({tuple(p.shape) for g in opt.param_groups for p in g["params"]})[:3]
    raise LoRAProConfigError(
        f"{len(lost) or 'all'} LoRA layers (e.g. {lost[0] if lost else '-'}) are no longer among the "
        f"optimizer's parameters{' ' + when if when else ''}: something replaced optimizer.param_groups "
        f"after the lorapro optimizer was built (parameter shapes now {shapes}...). LoRA-Pro would "
        "silently not be "
        "applied. DeepSpeed ZeRO stages 1-3 and its bf16/fp16 master weights do this: use ZeRO stage 0 "
        "with torch_autocast (see lorapro.integrations.deepspeed). Accelerate's FSDP2 does this: use "
        "lorapro.integrations.fsdp.FSDPLoRAProAdamW."
    )


def install_pair_guard(optimizer: Optimizer) -> Optimizer:
    """Check :func:`assert_owns_pairs` before every step (a set of ids: negligible cost)."""
    opt = unwrap_lorapro(optimizer)
    if opt is None:
        raise LoRAProConfigError(f"{type(optimizer).__name__} is not and does not wrap a lorapro optimizer")
    if not getattr(opt, "_lorapro_pair_guard", False):
        opt.register_step_pre_hook(lambda o, args, kwargs: assert_owns_pairs(o, "at optimizer.step()"))
        opt._lorapro_pair_guard = True
    return optimizer
