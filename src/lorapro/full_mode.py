"""Algorithm 3 (``LoRAProAdamW(mode="full")``) as functions: Adam on each layer's m x n equivalent
gradient, and the factor updates that map Adam's direction back onto the factors.

The optimizer orchestrates; these functions do the work and return what the step writes:
:func:`equivalent_gradient_directions` turns Theorem 2.1's gradients into LoRA's gradients of the
Adam direction D (``s B^T D``, ``s D A^T``), which the closed form then adjusts again, and
:func:`factor_updates` gives each layer's new factors with full fine-tuning's weight decay
(Eq. 57-58). Factored mode (:mod:`lorapro.factored`) shares the second half.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._solve import PairWork, Solved, adjusted_gradients
from ._storage import local_tensor
from .closed_form import equivalent_gradient
from .functional import AdamMoments, adam_direction

__all__ = ["equivalent_gradient_directions", "factor_updates"]


def equivalent_gradient_directions(
    works: list[PairWork],
    solved: Solved,
    state_of: Callable[[PairWork], dict[str, Any]],
    moments: AdamMoments,
) -> list[PairWork]:
    """Advance each layer's Adam moments of its equivalent gradient ``s (B gA + gB A)`` (Theorem
    2.1's gradients, from ``solved``) and return, per layer, a work whose gradients are LoRA's
    gradients of the Adam direction D: ``s B^T D`` and ``s D A^T``.

    The moments live in ``state_of(w)`` (created on the first step), with the hyper-parameters
    ``moments``. One layer at a time, in two
    m x n buffers shared by all layers (the equivalent gradient, which becomes the direction, and
    the denominator): fresh m x n temporaries per layer would be page-faulted anew on the CPU
    every step. With FSDP2 shards every m x n tensor is this rank's rows, like B's shard: A and
    the adjusted grad_A are gathered whole (r x n), and B^T D is summed over the row shards.
    """
    largest: dict[tuple, int] = defaultdict(int)  # elements of the largest layer per dtype, device
    for w in works:
        assert w.storage is not None
        key = (w.A.dtype, w.A.device)
        largest[key] = max(largest[key], w.B.shape[:-1].numel() * w.storage.columns(w.A))
    scratch = {key: torch.empty((2, size), dtype=key[0], device=key[1]) for key, size in largest.items()}
    directions: list[PairWork] = []
    for w in works:
        storage = w.storage
        assert storage is not None
        adjusted_A, adjusted_B = adjusted_gradients(w, solved)
        A, adjusted_A = storage.full_columns(w.A), storage.full_columns(adjusted_A)
        shape = (*w.B.shape[:-1], A.shape[-1])  # (m, n); (E, m, n) for MoE experts
        state = state_of(w)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in ("equiv_exp_avg", "equiv_exp_avg_sq"):
                state[key] = storage.moment_zeros(shape, w.A)
        g_equiv, denom = (buf[: math.prod(shape)].view(shape) for buf in scratch[(w.A.dtype, w.A.device)])
        equivalent_gradient(A, w.B, adjusted_A, adjusted_B, w.scaling, out=g_equiv)
        direction = adam_direction(
            g_equiv, local_tensor(state["equiv_exp_avg"]), local_tensor(state["equiv_exp_avg_sq"]),
            state["step"], beta1=moments.beta1, beta2=moments.beta2, eps=moments.eps, out=g_equiv,
            scratch=denom,
        )  # fmt: skip
        grad_A = storage.own_columns(storage.sum_over_rows(w.scaling * (w.B.mT @ direction)))
        directions.append(dataclasses.replace(w, grad_A=grad_A, grad_B=w.scaling * (direction @ A.mT)))
    return directions


def factor_updates(
    works: list[PairWork], solved: Solved, *, lr: float, weight_decay: float
) -> list[tuple[Tensor, Tensor]]:
    """Each layer's new (A, B) as matrices (copies; ``works`` keep the old factors): the adjusted
    gradients of ``solved`` applied with ``lr`` and full fine-tuning's weight decay,
    ``W <- (1 - lr wd) W``, as ``sqrt(1 - lr wd)`` on each factor (Eq. 57-58), or the whole decay
    on the trained factor when the other is frozen. The frozen factor is returned unchanged."""
    decay = 1.0 - lr * weight_decay
    decays = {(True, True): (math.sqrt(decay),) * 2, (False, True): (1.0, decay), (True, False): (decay, 1.0)}
    new_factors: list[tuple[Tensor, Tensor]] = []
    for w in works:
        adjusted_A, adjusted_B = adjusted_gradients(w, solved)
        new_A, new_B = w.A.clone(), w.B.clone()
        decay_A, decay_B = decays[(w.train_A, w.train_B)]
        for value, delta, trained, d in ((new_A, adjusted_A, w.train_A, decay_A),
                                         (new_B, adjusted_B, w.train_B, decay_B)):  # fmt: skip
            if trained:
                if weight_decay != 0.0:
                    value.mul_(d)
                value.add_(delta, alpha=-lr)
        new_factors.append((new_A, new_B))
    return new_factors
