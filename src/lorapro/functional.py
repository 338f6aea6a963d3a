"""Pure, in-place update rules used by the optimizers (per-tensor and foreach paths).

These know nothing about LoRA: they receive parameters, the gradients to apply (already
adjusted by the closed form where that applies) and their state tensors. Moments and momentum
buffers are kept in float32 (float64 stays float64) whatever the parameter dtype: a bf16
second moment cannot decay with beta2 = 0.999 (1.0 * 0.999 rounds back to 1.0).
Low-precision parameters are updated in float32 and rounded once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw as adamw_functional

__all__ = [
    "AdamMoments",
    "adam_denominator",
    "adam_direction",
    "adamw_update",
    "any_nonfinite",
    "bias_corrections",
    "fused_kernel_applies",
    "sgd_update",
    "update_first_moment_",
    "update_second_moment_",
]


def bias_corrections(step: Tensor, beta1: float, beta2: float) -> tuple[float, float]:
    # `step` lives on the CPU (as in torch.optim), so reading it is not a device sync.
    t = float(step)
    return 1.0 - beta1**t, 1.0 - beta2**t


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """Advance the moments by one step and return the bias-corrected Adam direction.

    ``step`` is incremented in place before use, so the first call is bias-corrected with
    t = 1 (the official LoRA-Pro code is off by one there). ``out`` receives the direction
    (it may be ``grad`` itself: the gradient is not read after the moments are updated) and
    ``scratch``, shaped like the moments, holds the denominator; with both given, nothing
    of the moments' size is allocated (full mode's m x n tensors are large).
    """
    step += 1
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    grad = grad.to(exp_avg.dtype)
    update_first_moment_(exp_avg, grad, beta1)
    update_second_moment_(exp_avg_sq, grad, beta2)
    denom = adam_denominator(exp_avg_sq, bc2, eps, out=scratch)
    return torch.div(exp_avg, bc1, out=out).div_(denom) if out is not None else (exp_avg / bc1).div_(denom)


def update_first_moment_(exp_avg: Tensor, grad: Tensor, beta1: float) -> Tensor:
    """Adam's first moment, in place: ``m <- beta1 m + (1 - beta1) g`` (as torch's ``lerp``)."""
    return exp_avg.lerp_(grad, 1.0 - beta1)


def update_second_moment_(exp_avg_sq: Tensor, grad: Tensor, beta2: float) -> Tensor:
    """Adam's second moment, in place: ``v <- beta2 v + (1 - beta2) g^2``."""
    return exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_denominator(exp_avg_sq: Tensor, bc2: float, eps: float, out: Tensor | None = None) -> Tensor:
    """``sqrt(v / bc2) + eps`` as torch computes it (``sqrt(v) / sqrt(bc2) + eps``), into ``out``
    when given (a buffer shaped like ``v``)."""
    denom = exp_avg_sq.sqrt() if out is None else torch.sqrt(exp_avg_sq, out=out)
    return denom.div_(math.sqrt(bc2)).add_(eps)


class AdamMoments(NamedTuple):
    """The hyper-parameters of Adam's moments and direction (full and factored mode's)."""

    beta1: float
    beta2: float
    eps: float


class _Hyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def _adamw_single(params, grads, exp_avgs, exp_avg_sqs, steps, h: _Hyper) -> None:
    lr, beta1, beta2, eps, weight_decay = h
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step += 1
        bc1, bc2 = bias_corrections(step, beta1, beta2)
        g = g.to(m.dtype)
        update_first_moment_(m, g, beta1)
        update_second_moment_(v, g, beta2)
        denom = adam_denominator(v, bc2, eps)
        target = p if p.dtype == m.dtype else p.to(m.dtype)
        target.mul_(1.0 - lr * weight_decay)
        target.addcdiv_(m, denom, value=-lr / bc1)
        if target is not p:
            p.copy_(target)


def fused_kernel_applies(device: torch.device, param_dtype: torch.dtype, state_dtype: torch.dtype) -> bool:
    """Can torch's fused AdamW kernel update these tensors with our state layout?

    Only on the CPU: the kernel reads the step counts on the parameters' device, and ours live
    on the CPU (so that bias corrections never sync). Only when parameter and moments share a
    dtype: the kernel keeps moments in the parameter dtype, while bf16/fp16 parameters get
    float32 moments here.
    """
    return device.type == "cpu" and param_dtype == state_dtype and param_dtype.is_floating_point


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, h: _Hyper, fused: bool) -> None:
    lr, beta1, beta2, eps, weight_decay = h
    # foreach kernels need one device and dtype per call.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, m) in enumerate(zip(params, exp_avgs, strict=True)):
        buckets[(p.device, p.dtype, m.dtype)].append(i)
    for (device, p_dtype, m_dtype), idx in buckets.items():
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        gs = [grads[i] if grads[i].dtype == m_dtype else grads[i].to(m_dtype) for i in idx]
        st = [steps[i] for i in idx]
        if fused and fused_kernel_applies(device, p_dtype, m_dtype):
            # One vectorised pass per tensor instead of ~8 foreach passes: on the CPU, where
            # foreach ops loop over tensors anyway, this is about 4x faster (docs/performance.md).
            # torch's functional AdamW increments the steps itself, as we do.
            adamw_functional(
                ps, gs, ms, vs, [], st, fused=True,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                eps=eps, maximize=False,
            )  # fmt: skip
            continue
        torch._foreach_add_(st, 1)
        corrections = [bias_corrections(s, beta1, beta2) for s in st]
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [math.sqrt(bc2) for _, bc2 in corrections])
        torch._foreach_add_(denoms, eps)
        targets = ps if p_dtype == m_dtype else [p.to(m_dtype) for p in ps]
        if weight_decay != 0.0:
            torch._foreach_mul_(targets, 1.0 - lr * weight_decay)
        torch._foreach_addcdiv_(targets, ms, denoms, [-lr / bc1 for bc1, _ in corrections])
        if targets is not ps:
            torch._foreach_copy_(ps, targets)


def adamw_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool = False,
    fused: bool = False,
) -> None:
    """AdamW (decoupled weight decay), in place, matching ``torch.optim.AdamW``'s arithmetic.

    ``steps`` are 0-dim CPU float tensors, incremented in place. ``fused`` uses torch's fused
    AdamW kernel for the tensors it applies to (see :func:`fused_kernel_applies`) and the
    foreach path for the rest, whatever ``foreach`` says; the fused kernel orders its
    arithmetic differently, so results differ from the other paths in the last bits.
    """
    if not params:
        return
    h = _Hyper(lr, beta1, beta2, eps, weight_decay)
    if foreach or fused:
        _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, h, fused)
    else:
        _adamw_single(params, grads, exp_avgs, exp_avg_sqs, steps, h)


def sgd_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor | None]:
    """SGD with optional momentum and L2 weight decay, as ``torch.optim.SGD`` (no dampening).

    Returns the momentum buffers (created on the first step when ``momentum > 0``) so the
    caller can store them.
    """
    new_buffers: list[Tensor | None] = []
    for p, g, buf in zip(params, grads, momentum_buffers, strict=True):
        work = torch.promote_types(p.dtype, torch.float32)
        d_p = g.to(work)
        if weight_decay != 0.0:
            d_p = d_p.add(p.to(work), alpha=weight_decay)
        if momentum != 0.0:
            if buf is None:
                buf = d_p.clone()
            else:
                buf.mul_(momentum).add_(d_p)
            d_p = buf
        if p.dtype == work:
            p.add_(d_p, alpha=-lr)
        else:
            p.copy_(p.to(work).add_(d_p, alpha=-lr))
        new_buffers.append(buf)
    return new_buffers


def any_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor: does any of the tensors hold NaN or Inf?

    Uses the max-abs norm (inf for Inf, nan for NaN) so that large finite values cannot
    overflow into a false alarm, and returns a tensor: the caller decides when to sync.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_device[t.device].append(t)
    flags = []
    for group in by_device.values():
        norms = torch._foreach_norm(group, float("inf"))
        flags.append((~torch.stack(norms).isfinite()).any().cpu())
    return torch.stack(flags).any()
