"""Theorem 2.1 for every LoRA layer of an optimizer step: solved batched, applied in chunks.

:func:`solve_pairs` does the r x r half for all layers at once and returns what the step needs
(each layer's coefficients and the small tensors to check for NaN/Inf), without touching a
parameter; :func:`adjusted_chunks` then produces the adjusted gradients a chunk of layers at a
time into one reused buffer, each chunk to be consumed by the update at once. The math itself is
:mod:`lorapro.closed_form`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._storage import FactorStorage, local_tensors
from .closed_form import (
    SOLVE_DTYPE,
    adjust_grad_A,
    adjust_grad_B,
    adjusted_gradient_bound,
    default_rtol,
    fold_scaling,
    gram_out_of_range,
    layer_terms,
    solve_coefficients,
    split_power_of_two,
)
from .pairs import LoRAPair

__all__ = [
    "CPU_CHUNK_BYTES",
    "DEVICE_CHUNK_BYTES",
    "PairWork",
    "Solved",
    "adjust_pairs",
    "adjusted_chunks",
    "adjusted_gradients",
    "solve_pairs",
]

#: Adjusted gradients are produced and consumed in chunks of at most this many bytes (one
#: reused buffer; a single larger layer gets a chunk of its own), so a step never holds a copy
#: of every factor's gradient. The cap is there for memory: on this project's CPU the step
#: time hardly depends on it, from layer by layer to all at once (benchmarks/stream_chunks.py).
CPU_CHUNK_BYTES = 2 << 20
#: Elsewhere (CUDA), larger chunks keep the number of update launches small.
DEVICE_CHUNK_BYTES = 64 << 20


@dataclass(eq=False)
class PairWork:
    """One LoRA pair's matrices and LoRA gradients for the current step, in the compute dtype.

    A, B and the gradients are this rank's share as matrices (``storage`` says how they map to the
    parameters: whole, or FSDP2's canonical shards). ``adjusted_A`` / ``adjusted_B`` are set only
    while :func:`adjusted_chunks` hands the layer's chunk over (views of a reused buffer), or by
    :func:`adjust_pairs`.
    """

    pair: LoRAPair | None
    scaling: float
    A: Tensor  # (r, n); (E, r, n) for MoE experts
    B: Tensor  # (m, r); (E, m, r)
    grad_A: Tensor  # LoRA's gradient of A (full and factored mode: of the Adam direction)
    grad_B: Tensor
    storage: FactorStorage | None = None
    # A factor frozen at this step (requires_grad=False) is not updated; the other one gets
    # Theorem 2.1's one-factor optimum, and the frozen one's adjusted gradient is zero.
    train_A: bool = True
    train_B: bool = True
    # The ridge damping of the closed form (closed_form.factor_basis; 0: Theorem 2.1 itself).
    damping: float = 0.0
    adjusted_A: Tensor | None = None
    adjusted_B: Tensor | None = None


@dataclass(eq=False)
class Solved:
    """What :func:`solve_pairs` gives: each layer's r x r coefficients (``(B^T B)^+``, X,
    ``(A A^T)^+``, B's coefficient, 1/s^2 folded in, each divided by a power of two that the
    matmuls apply back) and the small tensors the step checks for NaN/Inf before it updates.

    The powers of two are read from the device once per bucket, on first use: the step asks for
    them after its non-finite check has synchronised anyway.
    """

    checked: list[Tensor] = field(default_factory=list)
    out_of_range: list[Tensor] = field(default_factory=list)  # float32 Gram matrices float32 cannot hold
    _layers: dict[int, tuple[tuple[Tensor, ...], Tensor, int]] = field(default_factory=dict)
    _read: dict[int, list[list[float]]] = field(default_factory=dict)

    def needs_float64_terms(self) -> bool:
        """Must the terms be formed again in float64 (:func:`~lorapro.closed_form.gram_out_of_range`)?
        A host read: ask after the step's non-finite check has synchronised."""
        return bool(torch.cat(self.out_of_range).any()) if self.out_of_range else False

    def coefficients(self, w: PairWork) -> tuple[tuple[Tensor, ...], tuple[float, float, float, float]]:
        """The layer's four coefficients and the powers of two to apply them with."""
        coefs, exponents, row = self._layers[id(w)]
        if id(exponents) not in self._read:
            self._read[id(exponents)] = exponents.tolist()
        k = self._read[id(exponents)][row]
        return coefs, (2.0 ** k[0], 2.0 ** k[1], 2.0 ** k[2], 2.0 ** k[3])


def solve_pairs(
    works: list[PairWork],
    x_mode_of: Callable[[PairWork], str],
    reduce_terms: Callable[[Tensor], Tensor] | None = None,
    precise: bool = False,
) -> Solved:
    """The r x r half of Theorem 2.1 for many layers at once.

    Layers of equal rank, dtype, device, x_mode and damping form a bucket that shares one batched
    solve (:func:`~lorapro.closed_form.solve_coefficients`), whatever their shapes and
    scalings: the four terms of each layer (:func:`~lorapro.closed_form.layer_terms`), then one
    batched ``eigh`` and the r x r algebra for the whole bucket. Nothing of size m or n is
    allocated: the (m, r) and (r, n) work happens in :func:`adjust_into`, after the caller has
    checked ``Solved.checked``.

    ``reduce_terms`` sums partial terms across shards when the factors are sharded (every
    term is a sum over the rows of B or the columns of A, so shard terms add up). A non-finite
    gradient reaches its layer's terms through the matmuls; the bound of
    :func:`~lorapro.closed_form.adjusted_gradient_bound` adds an Inf where an adjusted gradient
    would overflow. The terms are formed in the factors' dtype unless ``precise``; where that
    cannot hold the Gram matrices (factors scaled by 1e+-20), ``Solved.needs_float64_terms()`` says
    so and the caller solves again with ``precise=True``.
    """
    buckets: dict[tuple, list[PairWork]] = defaultdict(list)
    for w in works:
        buckets[(w.A.shape[-2], w.A.dtype, w.A.device, x_mode_of(w), w.damping)].append(w)
    solved = Solved()
    for (r, dtype, _device, x_mode, damping), bucket in buckets.items():
        terms, counts = layer_terms([(w.A, w.B, w.grad_A, w.grad_B) for w in bucket], precise=precise)
        if reduce_terms is not None:
            terms = reduce_terms(terms)
        if not precise and dtype != SOLVE_DTYPE:
            solved.out_of_range.append(gram_out_of_range(terms[:, :2]))
        coefs = torch.stack(
            solve_coefficients(*terms.unbind(1), x_mode=x_mode, rtol=default_rtol(r, dtype), damping=damping),
            dim=1,
        )
        fold_scaling(coefs, [w.scaling for w, k in zip(bucket, counts, strict=True) for _ in range(k)])
        _drop_frozen(coefs, bucket, counts)
        solved.checked.append(_overflow_flags(coefs, terms, bucket, counts, dtype))
        split, exponents = split_power_of_two(coefs)  # (K, 4, r, r), (K, 4)
        if len(counts) != sum(counts):  # one power of two per layer: the largest over its experts
            exponents = torch.cat([k.amax(0, keepdim=True).expand_as(k) for k in exponents.split(counts)])
            split = coefs * torch.exp2(-exponents)[..., None, None]
        split = split.to(dtype)
        start = 0
        for w, k in zip(bucket, counts, strict=True):
            part = split[start : start + k]
            layer = part.unbind(1) if w.A.dim() == 3 else part[0].unbind(0)
            solved._layers[id(w)] = (layer, exponents, start)
            start += k
        solved.checked += [terms, split]
    return solved


def _drop_frozen(coefs: Tensor, bucket: list[PairWork], counts: list[int]) -> None:
    """Theorem 2.1 with one factor frozen: that factor's adjusted gradient is zero, and the other
    one is the least-squares optimum on its own (A frozen: ``grad_B (A A^T)^+``; B frozen:
    ``(B^T B)^+ grad_A``), i.e. X and B's projection term drop out. In place on (K, 4, r, r)."""
    if all(w.train_A and w.train_B for w in bucket):
        return
    start = 0
    for w, k in zip(bucket, counts, strict=True):
        if not w.train_A:
            coefs[start : start + k, (0, 1, 3)] = 0.0
        elif not w.train_B:
            coefs[start : start + k, 1:] = 0.0
        start += k


def _overflow_flags(
    coefs: Tensor, terms: Tensor, bucket: list[PairWork], counts: list[int], dtype: torch.dtype
) -> Tensor:
    """Inf where a layer's adjusted gradient could overflow ``dtype``, 0 elsewhere (for the step's
    non-finite check). The gradients' norms are bounded by ``sqrt(numel) max|g|``: one pass over
    them, with no overflow of its own (a float32 2-norm of a gradient of 1e20 would overflow;
    ``aminmax`` is as fast, and the inf-norm ten times slower, on the CPU)."""
    grads = local_tensors([t for w in bucket for t in (w.grad_A, w.grad_B)])
    extremes = torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).to(SOLVE_DTYPE)  # (2K, 2)
    maxima = extremes.abs().amax(1)
    sizes = torch.tensor([t[0].numel() if t.dim() == 3 else t.numel() for t in grads], dtype=SOLVE_DTYPE)
    grad_norms = (maxima * sizes.to(maxima.device).sqrt()).view(-1, 2)
    grad_norms = grad_norms.repeat_interleave(torch.tensor(counts, device=grad_norms.device), dim=0)
    bound = adjusted_gradient_bound(coefs, terms, grad_norms)
    return torch.where(torch.isfinite(bound) & (bound < torch.finfo(dtype).max), 0.0, float("inf"))


def adjust_into(w: PairWork, solved: Solved, out_A: Tensor, out_B: Tensor) -> None:
    """Write the layer's adjusted gradients (Theorem 2.1) into ``out_A`` (r, n) and ``out_B``
    (m, r), with the closed form's :func:`~lorapro.closed_form.adjust_grad_A` / ``adjust_grad_B``."""
    (grad_a_coef, a_coef, grad_b_coef, b_coef), (s_p, s_x, s_q, s_b) = solved.coefficients(w)
    adjust_grad_A(w.A, w.grad_A, grad_a_coef, a_coef, out=out_A, scales=(s_p, s_x))
    adjust_grad_B(w.B, w.grad_B, grad_b_coef, b_coef, out=out_B, scales=(s_q, s_b))


def adjusted_gradients(w: PairWork, solved: Solved) -> tuple[Tensor, Tensor]:
    """The layer's adjusted gradients in fresh tensors (see :func:`adjust_into`)."""
    out_A, out_B = torch.empty_like(w.A), torch.empty_like(w.B)
    adjust_into(w, solved, out_A, out_B)
    return out_A, out_B


def adjusted_chunks(
    works: list[PairWork], solved: Solved, max_bytes: float | None = None
) -> Iterator[list[PairWork]]:
    """Yield the layers in chunks with ``adjusted_A`` / ``adjusted_B`` filled in.

    The adjusted gradients of a chunk are views of one buffer that the next chunk reuses:
    consume them (update the parameters) before asking for the next chunk, and do not keep
    them. A chunk holds layers of one dtype and device, in the given order, whose adjusted
    gradients take at most ``max_bytes`` together (``None``: :data:`CPU_CHUNK_BYTES` on the
    CPU, :data:`DEVICE_CHUNK_BYTES` elsewhere); a larger layer forms a chunk of its own. So the
    step's transient memory is this buffer plus O(r^2) per layer, not a copy of the gradients.
    """
    by_kind: dict[tuple, list[PairWork]] = defaultdict(list)
    for w in works:
        by_kind[(w.A.dtype, w.A.device)].append(w)
    for (dtype, device), kind in by_kind.items():
        limit = max_bytes
        if limit is None:
            limit = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
        element = kind[0].A.element_size()
        chunks: list[list[PairWork]] = []
        sizes: list[int] = []  # elements of each chunk's adjusted gradients
        for w in kind:
            numel = w.A.numel() + w.B.numel()
            if chunks and (sizes[-1] + numel) * element <= limit:
                chunks[-1].append(w)
                sizes[-1] += numel
            else:
                chunks.append([w])
                sizes.append(numel)
        buffer = torch.empty(max(sizes), dtype=dtype, device=device)
        for chunk in chunks:
            sizes = [numel for w in chunk for numel in (w.A.numel(), w.B.numel())]
            sizes.append(buffer.numel() - sum(sizes))
            flat = buffer.split(sizes)
            for i, w in enumerate(chunk):
                out_A, out_B = flat[2 * i].view(w.A.shape), flat[2 * i + 1].view(w.B.shape)
                adjust_into(w, solved, out_A, out_B)
                w.adjusted_A, w.adjusted_B = out_A, out_B
            yield chunk
            for w in chunk:  # the buffer is about to be overwritten
                w.adjusted_A = w.adjusted_B = None


def adjust_pairs(
    works: list[PairWork],
    x_mode_of: Callable[[PairWork], str],
    reduce_terms: Callable[[Tensor], Tensor] | None = None,
) -> Solved:
    """Theorem 2.1 for many layers, each layer's adjusted gradients in tensors of its own.

    :func:`solve_pairs` then :func:`adjusted_gradients` for every layer. This holds every adjusted
    gradient at once, which full mode needs (it builds each layer's equivalent gradient);
    the efficient updates stream through :func:`adjusted_chunks` instead.
    """
    solved = solve_pairs(works, x_mode_of, reduce_terms)
    if solved.needs_float64_terms():
        solved = solve_pairs(works, x_mode_of, reduce_terms, precise=True)
    for w in works:
        w.adjusted_A, w.adjusted_B = adjusted_gradients(w, solved)
    return solved
