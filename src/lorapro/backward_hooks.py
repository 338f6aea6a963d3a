"""LoRA-Pro's adjusted gradients straight out of backward, for any optimizer and any engine.

``handle = lorapro.attach(model)`` registers a gradient hook on both factors of every active
LoRA pair. Each hook replaces the factor's gradient by LoRA-Pro's (Theorem 2.1) *before* it is
accumulated into ``.grad``, so whatever runs after backward (gradient accumulation, DDP's
all-reduce, DeepSpeed's buckets, clipping, any optimizer) sees LoRA-Pro's gradients:
``torch.optim.AdamW`` becomes LoRA-Pro's efficient mode (Algorithm 2) and ``torch.optim.SGD``
Algorithm 1.

Why per factor, per micro-batch, is exact:

- For fixed A and B the adjustment is linear in the gradients, so adjusting every micro-batch
  (and every rank's share) before accumulation and reduction equals adjusting their sum.
- Autograd produces B's gradient before A's. B's adjusted gradient needs X, whose right-hand
  side Theorem 2.3 writes with ``grad_A A^T``; for LoRA's gradients of any loss this equals
  ``B^T grad_B`` (both are ``s B^T G A^T``), so each factor is adjusted from its own gradient
  (:func:`~lorapro.closed_form.b_coefficient` with ``grad_a_at=None``).
- What depends only on A and B (Gram matrices, their ``eigh``, pseudo-inverses, and the maps
  to X and to B's coefficient as r^2 x r^2 matrices) is computed for all layers at once,
  batched, at the first forward pass after any ``torch.optim`` optimizer's step (a global step
  hook), and again whenever a factor is written in place (its version counter) or replaced (its
  storage). What is left per hook call is four matmuls: the r x r term, its map (an (r^2, r^2)
  matrix times a column) and two skinny products.

The model's LoRA layers are checked at every forward pass with gradients enabled (cheaply; the
full walk over the modules runs only when something changed), so adapters switched
(``set_adapter``), added or deleted later are followed; adapters LoRA-Pro cannot handle (DoRA,
...) raise :class:`~lorapro.LoRAProConfigError` there.

Engines that hold a factor whole only around its own module's forward and backward (FSDP2's
``fully_shard``, DeepSpeed ZeRO-3) are followed through the forward passes of the ``lora_A`` /
``lora_B`` modules: the Gram matrices are taken there, once per step, and under FSDP2 the hooks
go on the unsharded copies whose gradients FSDP2 reduce-scatters. No collective is added.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from .closed_form import (
    X_MODES,
    FactorBasis,
    XMode,
    b_coefficient,
    compute_dtype,
    factor_basis,
    vec_operators,
    x_matrix,
)
from .errors import LoRAProConfigError
from .pairs import LoRAPair, PairTracker

__all__ = ["LoRAProHandle", "attach", "attached_handle"]

# Every hooked factor -> a weak reference to its handle. Kept beside the parameters rather than
# on them, so that a deep copy or a pickle of the model carries no stale mark (the copy has no
# hooks either).
# Keyed by id (tensors compare elementwise, so they cannot be dictionary keys of a
# WeakKeyDictionary); the weak reference to the parameter guards against a reused id.
_ATTACHED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def attached_handle(param: Tensor) -> LoRAProHandle | None:
    """The live :class:`LoRAProHandle` whose hooks adjust this parameter's gradient, or None."""
    entry = _ATTACHED.get(id(param))
    ref = entry[1] if entry is not None and entry[0]() is param else None
    handle = ref() if ref is not None else None
    return handle if handle is not None and not handle.removed else None


_NOTHING = contextlib.nullcontext()


def _plain_mode(device: torch.device) -> contextlib.AbstractContextManager:
    """No autograd recording, and the closed form's own precision also when the forward or the
    backward pass runs under autocast (which would compute the products in bf16/fp16). Both are
    usually off inside backward already; entering them anyway would cost more than a hook's
    products, so only what is on is switched off."""
    grad, cast = torch.is_grad_enabled(), torch.is_autocast_enabled(device.type)
    if not (grad or cast):
        return _NOTHING
    stack = contextlib.ExitStack()
    if grad:
        stack.enter_context(torch.no_grad())
    if cast:
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
    return stack


def _refuse_foreign_handle(pair: LoRAPair, handle: LoRAProHandle) -> None:
    """Checked for every pair before any is hooked, so a refusal leaves nothing half-attached."""
    for p in (pair.A, pair.B):
        owner = attached_handle(p)
        if owner is not None and owner is not handle:
            raise LoRAProConfigError(
                f"{pair.name}: this LoRA layer is already attached by another lorapro.attach handle; "
                "its gradients would be adjusted twice. Call remove() on the first handle."
            )


def _is_dtensor(p: Tensor) -> bool:
    return type(p).__name__ == "DTensor" or isinstance(getattr(p, "_local_tensor", None), Tensor)


def _refuse_unsupported_storage(pair: LoRAPair) -> None:
    """Sharded factors are followed through their modules' forward passes, which embeddings lack."""
    for name, p in (("lora_A", pair.A), ("lora_B", pair.B)):
        if (_is_dtensor(p) or hasattr(p, "ds_id")) and pair.kind == "embedding":
            raise LoRAProConfigError(
                f"{pair.name}: {name} of a LoRA embedding is sharded (FSDP2) or partitioned (DeepSpeed "
                "ZeRO-3). lorapro.attach follows such factors through the forward passes of the lora_A / "
                "lora_B modules, which PEFT's embedding adapters do not have; leave embeddings out of "
                "target_modules, or use DDP or ZeRO stage 1 or 2."
            )


#: Up to this rank the hooks apply X's map and B's coefficient map as (r^2, r^2) matrices
#: (:func:`~lorapro.closed_form.vec_operators`): one matrix-vector product per hook instead of
#: five r x r operations, for 2 r^4 cached float32 numbers per layer (32 KiB at r = 8, 512 KiB
#: at r = 16).
VEC_OPERATOR_MAX_RANK = 16


@dataclass(eq=False)
class _Cached:
    """What the hooks of one layer reuse until A or B changes, with 1/s^2 folded in."""

    scaling: float  # the s the tensors below were scaled with
    pinv_b: Tensor  # (B^T B)^+ / s^2
    pinv_a: Tensor  # (A A^T)^+ / s^2
    x_op: Tensor | None  # R -> X / s^2 as an (r^2, r^2) matrix (ranks up to VEC_OPERATOR_MAX_RANK)
    b_op: Tensor | None  # S -> B's coefficient / s^2
    basis: FactorBasis | None  # larger ranks: the eigenbases, maps applied in them


@dataclass(eq=False)
class _Entry:
    """One hooked LoRA pair: its hooks and what they cache."""

    pair: LoRAPair
    hooks: list[RemovableHandle] = field(default_factory=list)
    cached: _Cached | None = None
    stamp: tuple | None = None  # what the cache was computed from, see LoRAProHandle._stamp
    # DeepSpeed ZeRO-3 and FSDP2 hold a factor whole only around its own module's forward and
    # backward (the unit's, for FSDP2), so the pair is "tracked" through those modules: the Gram
    # matrices are taken in their forward passes (once per optimizer step) and the cache built
    # from them. FSDP2 also computes the gradient of an unsharded copy of each factor, a tensor
    # of its own that the forward pass reveals: its hook goes there.
    tracked: bool = False
    fsdp2: bool = False
    grams: list[Tensor | None] = field(default_factory=lambda: [None, None])  # B^T B, A A^T
    gram_epochs: list[int] = field(default_factory=lambda: [-1, -1])
    hooked: list[int | None] = field(default_factory=lambda: [None, None])  # FSDP2: id of B's, A's copy


class LoRAProHandle:
    """What :func:`attach` returns: the hooks on one model. ``remove()`` takes them off (also on
    leaving a ``with`` block); after that backward gives LoRA's own gradients again."""

    def __init__(self, model: nn.Module, x_mode: str) -> None:
        self.model = model
        self.x_mode = x_mode
        self.removed = False
        self._entries: dict[tuple[int, int, bool], _Entry] = {}
        self._tracker = PairTracker(model)
        self._updated_epoch = -1
        self.seconds = 0.0
        """Time spent in lorapro's hooks and forward pre-hook so far (what attach costs)."""
        self._epoch = 0  # optimizer steps seen (any torch.optim optimizer): the factors may have moved
        self.basis_computations = 0
        """How many times the A/B-only part was (re)computed, each time for every stale layer."""
        self._self_ref = weakref.ref(self)
        self._forward_hook = model.register_forward_pre_hook(torch.compiler.disable(self._on_forward))
        self._step_hook = register_optimizer_step_post_hook(self._on_optimizer_step)
        try:
            self.sync()
        except Exception:
            self.remove()
            raise

    # -- public -------------------------------------------------------------------------------
    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs whose gradients are adjusted now, in module order."""
        return [e.pair for e in self._entries.values()]

    def sync(self) -> None:
        """Re-read the model's active LoRA pairs: hook new ones, unhook those gone.

        Runs by itself at every forward pass with gradients enabled; call it after changing
        adapters if you run a LoRA layer without going through the attached model's forward.
        """
        self._check_live()
        try:
            self._apply_pairs(self._tracker.pairs(walk=True)[0])
        except Exception:
            self._tracker.invalidate()
            raise

    def _apply_pairs(self, pairs: list[LoRAPair]) -> None:
        if not pairs:
            raise LoRAProConfigError(
                "no trainable LoRA layers found in the model: lorapro.attach adjusts the gradients of "
                "PEFT LoRA factors. Wrap the model first, e.g. model = peft.get_peft_model(model, "
                "LoraConfig(...)), and make sure an adapter is active and trainable."
            )
        fresh: dict[tuple[int, int, bool], LoRAPair] = {}
        for pair in pairs:
            _refuse_unsupported_storage(pair)
            _refuse_foreign_handle(pair, self)
            # (ZeRO-3 converts the factors in place: the same tensors, hooked another way)
            fresh[(id(pair.A), id(pair.B), hasattr(pair.A, "ds_id"))] = pair
        for key in [k for k in self._entries if k not in fresh]:
            self._unhook(self._entries.pop(key))
        for key, pair in fresh.items():
            if key not in self._entries:
                self._entries[key] = self._hook(pair)
        # dict order: keep module order for .pairs
        self._entries = {k: self._entries[k] for k in fresh}

    def refresh(self) -> None:
        """Recompute the A/B-only part before the next adjustment. Needed only after writing the
        factors in a way that neither bumps their version counter nor runs a ``torch.optim``
        optimizer (e.g. through ``param.data``)."""
        self._epoch += 1

    def remove(self) -> None:
        """Take every hook off; later backward passes give LoRA's own gradients."""
        if self.removed:
            return
        self.removed = True
        for entry in self._entries.values():
            self._unhook(entry)
        self._entries.clear()
        self._forward_hook.remove()
        self._step_hook.remove()

    def __enter__(self) -> LoRAProHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._entries)} LoRA pairs"
        return f"LoRAProHandle({state}, x_mode={self.x_mode!r})"

    # -- hooks ----------------------------------------------------------------------------------
    def _check_live(self) -> None:
        if self.removed:
            raise LoRAProConfigError(
                "this lorapro.attach handle was removed; call lorapro.attach(model) again"
            )

    def _hook(self, pair: LoRAPair) -> _Entry:
        fsdp2 = _is_dtensor(pair.A) or _is_dtensor(pair.B)
        zero3 = hasattr(pair.A, "ds_id") or hasattr(pair.B, "ds_id")
        entry = _Entry(pair, tracked=fsdp2 or zero3, fsdp2=fsdp2)
        if not fsdp2:  # (FSDP2's sharded parameters get the reduced gradient: never hooked)
            entry.hooks = [
                pair.A.register_hook(self._make_hook(entry, _adjusted_A, pair.matrix_A, pair.A)),
                pair.B.register_hook(self._make_hook(entry, _adjusted_B, pair.matrix_B, pair.B)),
            ]
        if entry.tracked:
            # prepend: run before DeepSpeed's own forward hook releases the gathered factor
            for which, module in ((0, pair.layer.lora_B[pair.adapter]), (1, pair.layer.lora_A[pair.adapter])):
                entry.hooks.append(module.register_forward_hook(self._gram_hook(entry, which), prepend=True))
        for p in (pair.A, pair.B):
            if id(p) not in _ATTACHED:  # forget the id when the parameter dies
                weakref.finalize(p, _ATTACHED.pop, id(p), None)
            _ATTACHED[id(p)] = (weakref.ref(p), self._self_ref)
        return entry

    def _unhook(self, entry: _Entry) -> None:
        for h in entry.hooks:
            h.remove()
        for p in (entry.pair.A, entry.pair.B):
            entry = _ATTACHED.get(id(p))
            if entry is not None and entry[1] is self._self_ref:
                del _ATTACHED[id(p)]

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            return
        start = time.perf_counter()
        try:
            self._prepare_for_backward()
        finally:
            self.seconds += time.perf_counter() - start

    def _prepare_for_backward(self) -> None:
        pairs, changed = self._tracker.pairs()  # a module walk only when something changed
        if changed:
            try:
                self._apply_pairs(pairs)
            except Exception:
                self._tracker.invalidate()  # refused: so is every later forward pass
                raise
        if self._updated_epoch != self._epoch:  # the factors moved: all layers at once, batched
            self._update_bases(self._entries.values())
            self._updated_epoch = self._epoch
        # (other changes, such as in-place writes, are caught by each hook's own check)

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._epoch += 1

    # -- the A/B-only part, once per step ------------------------------------------------------
    def _stamp(self, entry: _Entry) -> tuple:
        # (the hooks inline this tuple; keep the two in step)
        if entry.tracked:  # ZeRO-3 and FSDP2 move the storage at every gather: steps change a factor
            return ("tracked", self._epoch)
        A, B = entry.pair.A, entry.pair.B
        return (A._version, B._version, A.data_ptr(), B.data_ptr(), self._epoch)

    def _ready(self, entry: _Entry) -> bool:
        """Can the cache be built now? Untracked factors are always whole; a tracked pair needs
        both Gram matrices of this step, taken by the forward pass."""
        return not entry.tracked or entry.gram_epochs == [self._epoch, self._epoch]

    def _update_bases(self, entries: Iterable[_Entry]) -> None:
        """Recompute the cache of every entry whose factors may have changed, batched by rank.

        Entries that are not ready (ZeRO-3: the forward pass has not taken this step's Gram
        matrices yet) are left stale; their hooks recompute when they run, after the forward."""
        stale = [e for e in entries if e.stamp != self._stamp(e) and self._ready(e)]
        if not stale:
            return
        buckets: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in stale:
            A = e.pair.A
            r = e.grams[0].shape[-1] if e.tracked else A.shape[0]  # (a ZeRO-3 partition has shape (0,))
            buckets[(r, compute_dtype(A.dtype), A.device)].append(e)
        for (r, dtype, device), bucket in buckets.items():
            with _plain_mode(device):
                self._update_bucket(bucket, r, dtype)
        self.basis_computations += 1

    def _update_bucket(self, bucket: list[_Entry], r: int, dtype: torch.dtype) -> None:
        # Layers of equal shapes share one batched product per Gram matrix (a copy of their
        # factors, cheaper than a call per layer); tracked pairs (ZeRO-3, FSDP2) bring their
        # Grams from the forward pass, copied in once for all of them.
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        tracked: list[int] = []
        for i, e in enumerate(bucket):
            if e.tracked:
                tracked.append(i)
            else:
                by_shape[(tuple(e.pair.A.shape), tuple(e.pair.B.shape))].append(i)
        btb = torch.empty((len(bucket), r, r), dtype=dtype, device=bucket[0].pair.A.device)
        aat = torch.empty_like(btb)
        if tracked:
            index = torch.tensor(tracked, device=btb.device)
            btb.index_copy_(0, index, torch.stack([bucket[i].grams[0] for i in tracked]).to(dtype))
            aat.index_copy_(0, index, torch.stack([bucket[i].grams[1] for i in tracked]).to(dtype))
        for rows in by_shape.values():
            A = torch.stack([bucket[i].pair.matrix_A() for i in rows]).to(dtype)
            B = torch.stack([bucket[i].pair.matrix_B() for i in rows]).to(dtype)
            index = torch.tensor(rows, device=btb.device)
            btb.index_copy_(0, index, torch.bmm(B.mT, B))
            aat.index_copy_(0, index, torch.bmm(A, A.mT))
        basis = factor_basis(btb, aat, self.x_mode)
        scalings = [e.pair.scaling for e in bucket]
        inv_s2 = torch.tensor([1.0 / s**2 for s in scalings], dtype=dtype).to(basis.u.device)[:, None, None]
        pinv_b, pinv_a = (basis.pinv_b * inv_s2).unbind(0), (basis.pinv_a * inv_s2).unbind(0)
        if r <= VEC_OPERATOR_MAX_RANK:
            x_op, b_op = (op * inv_s2 for op in vec_operators(basis))
            x_ops, b_ops = x_op.unbind(0), b_op.unbind(0)
            for i, e in enumerate(bucket):
                e.cached = _Cached(scalings[i], pinv_b[i], pinv_a[i], x_ops[i], b_ops[i], None)
                e.stamp = self._stamp(e)
        else:
            per_layer = [t.unbind(0) for t in basis]
            for i, e in enumerate(bucket):
                layer_basis = FactorBasis(*(t[i] for t in per_layer))
                e.cached = _Cached(scalings[i], pinv_b[i], pinv_a[i], None, None, layer_basis)
                e.stamp = self._stamp(e)

    # -- the hooks ------------------------------------------------------------------------------
    def _gram_hook(self, entry: _Entry, which: int) -> Callable:
        """Forward hook of a tracked factor's own module (``which``: 0 for lora_B, 1 for lora_A),
        run while the engine holds the factor whole: its Gram matrix once per step, and for
        FSDP2 the gradient hook on the unsharded copy the module computes with."""
        pair = entry.pair

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            start = time.perf_counter()
            weight = module.weight  # whole here: gathered by ZeRO-3, FSDP2's unsharded copy
            if entry.fsdp2 and entry.hooked[which] != id(weight):
                self._hook_unsharded(entry, which, weight)
            if entry.gram_epochs[which] != self._epoch:  # once per step (micro-batches and
                with _plain_mode(weight.device):  # recomputation see the same factor)
                    if which == 0:
                        B = pair.matrix_B(weight).to(compute_dtype(weight.dtype))
                        gram = B.mT @ B
                    else:
                        A = pair.matrix_A(weight).to(compute_dtype(weight.dtype))
                        gram = A @ A.mT
                entry.grams[which], entry.gram_epochs[which] = gram, self._epoch
            self.seconds += time.perf_counter() - start

        return torch.compiler.disable(hook)

    def _hook_unsharded(self, entry: _Entry, which: int, weight: Tensor) -> None:
        """FSDP2: hook the unsharded copy the module computes with (FSDP2 keeps one per factor
        and reuses it, so this runs once per factor unless FSDP2 makes a new one)."""
        pair = entry.pair
        if _is_dtensor(weight):
            raise LoRAProConfigError(
                f"{pair.name}: the LoRA factor is a DTensor inside its module's forward pass (tensor "
                "parallelism?). lorapro.attach supports FSDP2's fully_shard, whose modules compute with "
                "whole factors; use lorapro.LoRAProAdamW (built after sharding) or leave the LoRA layers "
                "unsharded."
            )
        adjust, matrix = (_adjusted_B, pair.matrix_B) if which == 0 else (_adjusted_A, pair.matrix_A)
        handle = weight.register_hook(self._make_hook(entry, adjust, matrix, weight))
        entry.hooks.append(handle)
        entry.hooked[which] = id(weight)

    def _make_hook(
        self, entry: _Entry, adjust: Callable, matrix: Callable, factor: Tensor
    ) -> Callable[[Tensor], Tensor]:
        """The gradient hook of one factor. It runs for every layer in every backward pass, right
        after large matmuls have flushed the CPU's caches, so each Python step and each distinct
        kernel in it is paid cold: it binds what it needs once, inlines the checks and calls
        nothing but the products on the common path (2-D factors, grad mode and autocast off)."""
        pair = entry.pair
        layer, adapter = pair.layer, pair.adapter
        A, B = pair.A, pair.B
        flat = pair.kind != "conv"  # Conv factors are 4-D: adjusted as (r, n) / (m, r) matrices
        tracked = entry.tracked
        clock, grad_on, cast_on = time.perf_counter, torch.is_grad_enabled, torch.is_autocast_enabled

        def hook(grad: Tensor) -> Tensor:
            start = clock()
            cached = entry.cached
            # the _stamp of the factors, inlined: they changed since the forward pass
            if tracked:
                stamp = ("tracked", self._epoch)
                if factor.untyped_storage().size() == 0:
                    raise LoRAProConfigError(
                        f"{pair.name}: the engine (DeepSpeed ZeRO-3, FSDP2) released this LoRA factor before "
                        "its gradient arrived; lorapro.attach cannot adjust a partition"
                    )
            else:
                stamp = (A._version, B._version, A.data_ptr(), B.data_ptr(), self._epoch)
            if cached is None or entry.stamp != stamp:
                self._update_bases(self._entries.values())
                cached = entry.cached
                if cached is None or entry.stamp != self._stamp(entry):
                    raise LoRAProConfigError(
                        f"{pair.name}: LoRA-Pro's cache for this layer could not be built: its factors are "
                        "sharded (FSDP2) or partitioned (DeepSpeed ZeRO-3) and this step's forward pass did "
                        "not run their lora_A / lora_B modules (call the LoRA layer through its module)"
                    )
            scaling = float(layer.scaling[adapter])
            if flat and not (grad_on() or cast_on(grad.device.type)):
                out = adjust(cached, grad, factor, scaling)
            else:
                with _plain_mode(grad.device):
                    out = adjust(cached, matrix(grad), matrix(factor), scaling).reshape(grad.shape)
            if out.dtype != grad.dtype:
                out = out.to(grad.dtype)
            self.seconds += clock() - start
            return out

        return hook


# -- the adjustments (Theorem 2.1, one factor at a time) -------------------------------------------
# NaN and Inf propagate: a non-finite entry of a gradient reaches its r x r term through a matmul
# (0 * NaN and 0 * Inf are NaN), and every output entry depends on that term, so the adjusted
# gradient is non-finite too and GradScaler / DeepSpeed still skip the step.
# Per call: the r x r term, its map, two skinny products, all through torch.mm / addmm (a
# matrix-vector product as an (r^2, 1) matmul: in a hook each distinct kernel costs a cold start).
def _adjusted_A(c: _Cached, g: Tensor, A: Tensor, scaling: float) -> Tensor:
    """``((B^T B)^+ grad_A + X A) / s^2`` for A's (r, n) gradient ``g``."""
    dtype = c.pinv_b.dtype
    if g.dtype != dtype:
        g, A = g.to(dtype), A.to(dtype)
    rhs = torch.mm(g, A.mT)  # grad_A A^T
    if c.x_op is not None:
        x = torch.mm(c.x_op, rhs.view(-1, 1)).view(rhs.shape)
    else:
        x = x_matrix(c.basis, rhs).mul_(1.0 / c.scaling**2)
    out = torch.mm(x, A).addmm_(c.pinv_b, g)
    if scaling != c.scaling:  # set_scale since the cache was made: every term goes with 1/s^2
        out.mul_((c.scaling / scaling) ** 2)
    return out


def _adjusted_B(c: _Cached, g: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``(grad_B (A A^T)^+ + B coef) / s^2`` for B's (m, r) gradient ``g``, X taken from
    ``B^T grad_B`` (equal to ``grad_A A^T`` for LoRA's gradients)."""
    dtype = c.pinv_a.dtype
    if g.dtype != dtype:
        g, B = g.to(dtype), B.to(dtype)
    rhs = torch.mm(B.mT, g)  # B^T grad_B
    if c.b_op is not None:
        coef = torch.mm(c.b_op, rhs.view(-1, 1)).view(rhs.shape)
    else:
        coef = b_coefficient(c.basis, rhs).mul_(1.0 / c.scaling**2)
    out = torch.mm(B, coef).addmm_(g, c.pinv_a)
    if scaling != c.scaling:
        out.mul_((c.scaling / scaling) ** 2)
    return out


def attach(model: nn.Module, *, x_mode: XMode = "sylvester") -> LoRAProHandle:
    """Make ``loss.backward()`` leave LoRA-Pro's adjusted gradients in every LoRA factor's ``.grad``.

    After it, any optimizer runs LoRA-Pro: ``torch.optim.AdamW`` (fused or not), bitsandbytes'
    and torchao's 8-bit AdamW, Adafactor, DeepSpeed's own optimizer... AdamW-like optimizers
    give Algorithm 2 (efficient mode), SGD gives Algorithm 1.

    Args:
        model: a model holding PEFT LoRA layers (the PEFT model, or the module that contains it).
        x_mode: ``"sylvester"`` (Theorem 2.3), ``"zero"`` or ``"symmetric"`` (Eq. 16).

    Returns:
        a :class:`LoRAProHandle`; ``handle.remove()`` (or leaving ``with lorapro.attach(model):``)
        takes the hooks off.

    Do not also use a lorapro optimizer on an attached model (it would adjust twice: it raises).
    Gradient clipping after backward clips the adjusted gradients.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lorapro.attach takes the model (an nn.Module with PEFT LoRA layers), got {type(model).__name__}"
        )
    if x_mode not in X_MODES:
        raise LoRAProConfigError(f"unknown x_mode {x_mode!r}: use one of {', '.join(map(repr, X_MODES))}")
    return LoRAProHandle(model, x_mode)
