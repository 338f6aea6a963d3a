"""LoRA-Pro's adjusted gradients straight out of backward, for any optimizer and any engine.

``handle = lorapro.attach(model)`` registers a gradient hook on both factors of every LoRA pair.
Each hook replaces the factor's gradient by LoRA-Pro's (Theorem 2.1) *before* it is accumulated
into ``.grad``, so whatever runs after backward (gradient accumulation, DDP's all-reduce,
DeepSpeed's buckets, clipping, any optimizer) sees LoRA-Pro's gradients: ``torch.optim.AdamW``
becomes LoRA-Pro's efficient mode (Algorithm 2) and ``torch.optim.SGD`` Algorithm 1.

Why per factor, per micro-batch, is exact:

- For fixed A and B the adjustment is linear in the gradients, so adjusting every micro-batch
  (and every rank's share) before accumulation and reduction equals adjusting their sum.
- Autograd produces B's gradient before A's. B's adjusted gradient needs X, whose right-hand
  side Theorem 2.3 writes with ``grad_A A^T``; for LoRA's gradients of a loss that sees the
  factors only through ``B A`` this equals ``B^T grad_B`` (both are ``s B^T G A^T``), so B is
  adjusted from its own gradient (:func:`~lorapro.closed_form.b_coefficient` with
  ``grad_a_at=None``). A's hook then has both terms, summed over micro-batches, and they are
  checked to agree once per step (one r x r comparison per layer, before a ``torch.optim``
  step; for another optimizer, at the first backward pass after it moved the factors): a
  loss term in the factors themselves breaks the identity and is refused with
  :class:`~lorapro.LoRAProConfigError` naming the fixes; rounding under bf16/fp16 is reported once with a
  :class:`~lorapro.LoRAProWarning` (B's gradient is then exact to that precision).
- What depends only on A and B (Gram matrices, their ``eigh``, pseudo-inverses, and the maps
  to X and to B's coefficient as r^2 x r^2 matrices) is cached, computed for all layers at
  once, batched, and keyed on what it is computed from: at the first hook of every backward
  pass the Gram matrices of the factors as they are then are formed (one r x r product per
  factor); a layer whose factors' version counters moved (an optimizer's in-place step) is
  rebuilt, and the others' Gram matrices are compared with those their cache was built from (one
  host sync), so that writes that bypass the counter (``.data``, a loader) are caught too.

A factor frozen (``requires_grad=False``) while its partner trains gets no gradient; the
partner gets Theorem 2.1's one-factor optimum (A frozen: LoRA-FA's ``grad_B (A A^T)^+ / s^2``).

The model's LoRA layers are followed at every forward pass with gradients enabled, of the
attached model and of the model PEFT wraps (``get_base_model()``); every adapter's factors are
hooked, active or not, so an adapter switched on is adjusted even through a forward pass that
bypasses both. Adapters LoRA-Pro cannot handle (DoRA, ...) raise there. Before every
``torch.optim`` step, a factor the optimizer holds that was never hooked (an adapter added, or a
factor unfrozen, and trained without any such forward pass) but has a gradient is refused (its
gradient could not be adjusted), naming :meth:`LoRAProHandle.sync`.

Engines that hold a factor whole only around its own module's forward and backward (FSDP2's
``fully_shard``, DeepSpeed ZeRO-3) are followed through the forward passes of the ``lora_A`` /
``lora_B`` modules: the Gram matrices are taken there, and under FSDP2 the hooks go on the
unsharded copies whose gradients FSDP2 reduce-scatters. No collective is added.

A deep copy or a pickle of an attached model (an EMA copy, ``torch.save(model)``) is a plain
model: the copy carries none of the handle's hooks. Attach the copy to train it with LoRA-Pro.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ._storage import is_dtensor, is_partitioned, is_zero3_partition
from ._validation import check_choice
from .closed_form import (
    HOOK_UNSPLIT_EXPONENT,
    SOLVE_DTYPE,
    X_MODES,
    FactorBasis,
    XMode,
    adjust_grad_A,
    adjust_grad_B,
    b_coefficient,
    b_weights,
    compute_dtype,
    default_rtol,
    factor_basis,
    fold_scaling,
    gram_a,
    gram_b,
    gram_out_of_range,
    split_exponents,
    split_power_of_two,
    vec_operator,
    x_matrix,
)
from .errors import LoRAProConfigError, LoRAProWarning
from .pairs import LoRAPair, PairTracker, adapter_pairs

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


class _InertHook:
    """What a deep copy or a pickle of a module gets in place of one of lorapro's module hooks:
    nothing, so the copy is a plain model (and pickles with ``torch.save``)."""

    def __call__(self, *args: Any) -> None:
        return None


class _ModuleHook:
    """A forward (pre-)hook of lorapro's on one module. It acts on that module only (a shallow
    copy shares the hook dictionary), and copies or pickles of the module get an
    :class:`_InertHook` instead: the handle's hooks never act on a model they were not attached to."""

    def __init__(self, fn: Callable[..., None], module: nn.Module) -> None:
        self._fn = fn
        self._module = weakref.ref(module)

    @torch.compiler.disable
    def __call__(self, module: nn.Module, *args: Any) -> None:
        self._run(module, *args)

    def _run(self, module: nn.Module, *args: Any) -> None:
        if module is self._module():
            self._fn(module, *args)

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class _WrappedModelHook(_ModuleHook):
    """The hook on the model PEFT wraps (``get_base_model()``): inside a compiled forward of the
    attached model it is covered by that model's own hook, so there it is a no-op that dynamo
    traces as a constant (no graph break, fullgraph compilation works); called on its own, it
    follows the model like the attached model's hook."""

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if not torch.compiler.is_compiling():
            self._run_eager(module, *args)

    @torch.compiler.disable
    def _run_eager(self, module: nn.Module, *args: Any) -> None:
        self._run(module, *args)


class _StepHook:
    """The global optimizer step pre-hook of one handle, holding it weakly (a model that is no
    longer used is not kept alive by the hook)."""

    def __init__(self, handle: LoRAProHandle) -> None:
        self._handle = weakref.ref(handle)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        handle = self._handle()
        if handle is not None:
            handle._before_step(optimizer)


def _refuse_unsupported_storage(pair: LoRAPair) -> None:
    """Sharded factors are followed through their modules' forward passes, which embeddings and
    PEFT's ``ParamWrapper`` (``target_parameters``) do not run."""
    for name, p in (("lora_A", pair.A), ("lora_B", pair.B)):
        if is_partitioned(p) and pair.kind in ("embedding", "parameter"):
            what = "a LoRA embedding" if pair.kind == "embedding" else "a LoRA on target_parameters"
            raise LoRAProConfigError(
                f"{pair.name}: {name} of {what} is sharded (FSDP2) or partitioned (DeepSpeed ZeRO-3). "
                "lorapro.attach follows such factors through the forward passes of the lora_A / lora_B "
                "modules, which this kind of adapter does not call; leave it out of the adapter, or use "
                "DDP or ZeRO stage 1 or 2."
            )


#: Up to this rank the hooks apply X's map and B's coefficient map as (r^2, r^2) matrices
#: (:func:`~lorapro.closed_form.vec_operators`): one matrix-vector product per hook instead of
#: five r x r operations, for 2 r^4 cached float32 numbers per layer (32 KiB at r = 8, 512 KiB
#: at r = 16).
VEC_OPERATOR_MAX_RANK = 16

#: How far ``grad_A A^T`` and ``B^T grad_B`` may differ (relative, Frobenius) before attach refuses,
#: by the precision the gradients were computed in. Rounding measured by benchmarks/rhs_mismatch.py
#: on MiniLM and SmolLM2 stays below 1e-6 in float32 and 6e-3 under bf16 autocast (the limits
#: leave a 100x and a 9x margin, for wider layers); an L2 penalty on the factors as small as 1e-6
#: gives about 1 there (it dominates the small right-hand sides early in training).
RHS_MISMATCH_LIMITS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

#: Right-hand sides kept per factor between two checks before they are folded into their sum.
RHS_KEPT = 32


@dataclass(eq=False)
class _Cached:
    """What the hooks of one layer reuse until A or B changes, with 1/s^2 folded in and each
    coefficient split by a power of two (``scales_A``, ``scales_B``) that the matmuls apply."""

    scaling: float  # the s the tensors below were scaled with
    pinv_b: Tensor  # (B^T B)^+ / s^2 / scales_A[0]
    pinv_a: Tensor  # (A A^T)^+ / s^2 / scales_B[0]
    x_op: Tensor | None  # R -> X / s^2 / scales_A[1] as an (r^2, r^2) matrix; None: bases, or X = 0
    b_op: Tensor | None  # S -> B's coefficient / s^2 / scales_B[1]
    basis_a: FactorBasis | None  # larger ranks: float64 eigenbases with X's weights scaled likewise
    basis_b: FactorBasis | None  # ... with B's coefficient's weights scaled likewise
    scales_A: tuple[float, float]  # the powers of two split off (P, X): 1.0 unless extreme
    scales_B: tuple[float, float]  # ... (Q, b)
    x_zero: bool  # x_mode="zero": no X term


@dataclass(eq=False)
class _Entry:
    """One hooked LoRA pair: its hooks, its cache and what the cache was computed from."""

    pair: LoRAPair
    hooks: list[RemovableHandle] = field(default_factory=list)
    hooked: set[str] = field(default_factory=set)  # "A", "B": factors with a gradient hook (torch
    # hooks only tensors that require grad: a factor frozen when found is hooked once unfrozen)
    active: bool = False  # among the model's active, trainable pairs at the last sync
    cached: _Cached | None = None
    grams: Tensor | None = None  # float64 (problems, 2, r, r): B^T B and A A^T the cache came from
    fresh: Tensor | None = None  # the same, for the factors as they are now (during a validation)
    versions: tuple[int, int] | None = None  # the factors' version counters when ``grams`` was taken
    # DeepSpeed ZeRO-3 and FSDP2 hold a factor whole only around its own module's forward and
    # backward (the unit's, for FSDP2), so the pair is "tracked" through those modules: the Gram
    # matrices are taken in their forward passes. FSDP2 also computes the gradient of an
    # unsharded copy of each factor, a tensor of its own that the forward pass reveals: its hook
    # goes there.
    tracked: bool = False
    fsdp2: bool = False
    captured_btb: Tensor | None = None  # B^T B (float64) from the last forward of lora_B
    captured_aat: Tensor | None = None
    hooked_b: int | None = None  # FSDP2: id of the unsharded copy hooked
    hooked_a: int | None = None
    # The right-hand sides (R = grad_A A^T, S = B^T grad_B) of the backward passes since the last
    # check, whose sums the check compares (see the module docstring). The factors are the same in
    # all of them (a change triggers the check), so the sums are those of the accumulated
    # gradients the optimizer steps with. Kept as lists that the check sums in one batched
    # reduction (an add per layer and micro-batch, paid cold in backward, costs more), folded
    # into their sum past RHS_KEPT entries so that memory stays bounded without optimizer steps.
    rhs_a: list[Tensor] = field(default_factory=list)
    rhs_b: list[Tensor] = field(default_factory=list)


def _unmoved(e: _Entry) -> bool:
    """Has the entry a cache, and have its factors' version counters stayed where they were when
    it was built? (False where there are no counters.)"""
    return e.grams is not None and e.versions is not None and _versions(e.pair) == e.versions


def _versions(pair: LoRAPair) -> tuple[int, int] | None:
    """The factors' version counters (None for inference tensors, which have none)."""
    try:
        return pair.A._version, pair.B._version
    except RuntimeError:
        return None


def _pair_key(pair: LoRAPair) -> tuple[int, int, bool]:
    # (ZeRO-3 converts the factors in place: the same tensors, hooked another way)
    return (id(pair.A), id(pair.B), is_zero3_partition(pair.A))


class LoRAProHandle:
    """What :func:`attach` returns: the hooks on one model. ``remove()`` takes them off (also on
    leaving a ``with`` block); after that backward gives LoRA's own gradients again."""

    def __init__(self, model: nn.Module, x_mode: str) -> None:
        self.model = model
        self.x_mode = x_mode
        self.removed = False
        self._entries: dict[tuple[int, int, bool], _Entry] = {}
        self._hooked: dict[int, weakref.ref] = {}  # tensors with a gradient hook of this handle, by id
        self._hook_generation = 0  # changes when a parameter is hooked or unhooked (_factors_stepped)
        self._tracker = PairTracker(model)
        self._validated = False  # caches checked against the factors since the last forward/backward
        # Per group of layers of equal shapes: its entries and the Gram products every one of their
        # caches was last validated against (see _changed); and those of the validation under way.
        self._products_seen: dict[tuple, tuple[tuple[int, ...], Tensor]] = {}
        self._products_pending: dict[tuple, tuple[tuple[int, ...], Tensor]] = {}
        self._autocast: torch.dtype | None = None  # autocast dtype of the last forward pass
        self._warned_precision = False
        self.seconds = 0.0
        """Time spent in lorapro's hooks and forward pre-hooks so far (what attach costs)."""
        self.basis_computations = 0
        """How many times the A/B-only part was (re)computed, each time for every changed layer."""
        self._self_ref = weakref.ref(self)
        self._forward_hooks = [model.register_forward_pre_hook(_ModuleHook(self._on_forward, model))]
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if isinstance(base, nn.Module) and base is not model:
            # forwards through PEFT's wrapped model (get_base_model()) are followed too
            hook = _WrappedModelHook(self._on_forward, base)
            self._forward_hooks.append(base.register_forward_pre_hook(hook))
        # A global hook (every torch.optim optimizer): it holds the handle weakly and acts only on
        # an optimizer that holds some of this model's factors.
        self._optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._step_hook = register_optimizer_step_pre_hook(_StepHook(self))
        try:
            self.sync()
        except Exception:
            self.remove()
            raise

    # -- public -------------------------------------------------------------------------------
    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs whose gradients are adjusted now (active, trainable), in module order."""
        return [e.pair for e in self._entries.values() if e.active]

    def sync(self) -> None:
        """Re-read the model's LoRA pairs: hook new ones, unhook those gone, follow the active ones.

        Runs by itself at every forward pass with gradients enabled (of the attached model and of
        the model PEFT wraps). Call it after adding an adapter if you then train it through
        something else, such as a LoRA layer called directly.
        """
        self._check_live()
        try:
            self._apply_pairs(self._tracker.pairs(walk=True)[0])
        except Exception:
            self._tracker.invalidate()
            raise

    def refresh(self) -> None:
        """Recompute the A/B-only part before the next adjustment. Never needed for correctness:
        the cache is checked against the factors at every backward pass."""
        for entry in self._entries.values():
            entry.grams = None
        self._validated = False

    def remove(self) -> None:
        """Take every hook off; later backward passes give LoRA's own gradients."""
        if self.removed:
            return
        self.removed = True
        for entry in self._entries.values():
            self._unhook(entry)
        self._entries.clear()
        for hook in self._forward_hooks:
            hook.remove()
        self._step_hook.remove()

    def __enter__(self) -> LoRAProHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.pairs)} LoRA pairs"
        return f"LoRAProHandle({state}, x_mode={self.x_mode!r})"

    # -- following the model's pairs -----------------------------------------------------------
    def _check_live(self) -> None:
        if self.removed:
            raise LoRAProConfigError(
                "this lorapro.attach handle was removed; call lorapro.attach(model) again"
            )

    def _apply_pairs(self, active: list[LoRAPair]) -> None:
        if not active:
            raise LoRAProConfigError(
                "no trainable LoRA layers found in the model: lorapro.attach adjusts the gradients of "
                "PEFT LoRA factors. Wrap the model first, e.g. model = peft.get_peft_model(model, "
                "LoraConfig(...)), and make sure an adapter is active and trainable."
            )
        for pair in active:
            _refuse_unsupported_storage(pair)
        active_keys = {_pair_key(p) for p in active}
        # Every adapter's factors are hooked, active or not (a hook costs nothing until its factor
        # gets a gradient), except sharded ones, which only an active adapter's forward reveals.
        wanted: dict[tuple[int, int, bool], LoRAPair] = {}
        by_key = {_pair_key(p): p for p in active}
        for pair in adapter_pairs(self.model):
            key = _pair_key(pair)
            if key in active_keys:
                wanted[key] = by_key[key]  # (the checked pair)
            elif not (is_partitioned(pair.A) or is_partitioned(pair.B)):
                wanted[key] = pair
        for pair in wanted.values():  # all refusals before any hook: nothing half-attached
            for p in (pair.A, pair.B):
                owner = attached_handle(p)
                if owner is not None and owner is not self:
                    raise LoRAProConfigError(
                        f"{pair.name}: this LoRA layer is already attached by another lorapro.attach handle; "
                        "its gradients would be adjusted twice. Call remove() on the first handle."
                    )
        for key in [k for k in self._entries if k not in wanted]:
            self._unhook(self._entries.pop(key))
        entries: dict[tuple[int, int, bool], _Entry] = {}
        for key, pair in wanted.items():
            entry = self._entries.get(key) or self._hook(pair)
            entry.pair = pair
            self._hook_factors(entry)
            was_active, entry.active = entry.active, key in active_keys
            if entry.active and not was_active:
                entry.grams = None  # built afresh when it (re)joins
            entries[key] = entry
        self._entries = entries  # module order
        self._validated = False

    def _follow(self, entry: _Entry) -> None:
        """A hooked factor got a gradient while its pair was not active at the last sync: a forward
        pass bypassed the attached model after the adapters changed. Sync now, inside backward."""
        self.sync()
        if not entry.active:
            pair = entry.pair
            raise LoRAProConfigError(
                f"{pair.name}: a factor of adapter {pair.adapter!r} got a gradient, but that adapter is not "
                "an active, trainable adapter of the attached model, so lorapro.attach cannot tell how to "
                "adjust it. Activate it with set_adapter on the attached model (and call handle.sync() if "
                "you then run LoRA layers directly)."
            )
        self._validated = False
        self._validate(in_backward=True)

    def _hook(self, pair: LoRAPair) -> _Entry:
        fsdp2 = is_dtensor(pair.A) or is_dtensor(pair.B)
        zero3 = is_zero3_partition(pair.A) or is_zero3_partition(pair.B)
        entry = _Entry(pair, tracked=fsdp2 or zero3, fsdp2=fsdp2)
        if entry.tracked:
            # prepend: run before DeepSpeed's own forward hook releases the gathered factor
            for which, module in (
                ("B", pair.layer.lora_B[pair.adapter]),
                ("A", pair.layer.lora_A[pair.adapter]),
            ):
                hook = _ModuleHook(self._gram_hook(entry, which), module)
                entry.hooks.append(module.register_forward_hook(hook, prepend=True))
        for p in (pair.A, pair.B):
            if id(p) not in _ATTACHED:  # forget the id when the parameter dies
                weakref.finalize(p, _ATTACHED.pop, id(p), None)
            _ATTACHED[id(p)] = (weakref.ref(p), self._self_ref)
        return entry

    def _hook_factors(self, entry: _Entry) -> None:
        """Gradient hooks on the entry's factors that require grad and have none yet (FSDP2's
        sharded parameters get the reduced gradient: their unsharded copies are hooked instead)."""
        if entry.fsdp2:
            return
        for which, factor in (("A", entry.pair.A), ("B", entry.pair.B)):
            if which not in entry.hooked and factor.requires_grad:
                entry.hooks.append(factor.register_hook(self._make_hook(entry, which, factor)))
                entry.hooked.add(which)
                self._hooked[id(factor)] = weakref.ref(factor)
                self._hook_generation += 1

    def _is_hooked(self, t: Tensor) -> bool:
        """Does one of this handle's gradient hooks sit on this tensor?"""
        ref = self._hooked.get(id(t))
        return ref is not None and ref() is t

    def _unhook(self, entry: _Entry) -> None:
        for h in entry.hooks:
            h.remove()
        for p in (entry.pair.A, entry.pair.B):
            self._hooked.pop(id(p), None)
        self._hook_generation += 1
        for p in (entry.pair.A, entry.pair.B):
            owner = _ATTACHED.get(id(p))
            if owner is not None and owner[1] is self._self_ref:
                del _ATTACHED[id(p)]

    # -- forward and step hooks ----------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled() or self.removed:
            return
        start = time.perf_counter()
        try:
            pairs, changed = self._tracker.pairs()  # a module walk only when something changed
            if changed:
                try:
                    self._apply_pairs(pairs)
                except Exception:
                    self._tracker.invalidate()  # refused: so is every later forward pass
                    raise
            self._validated = False  # the next backward compares the caches with the factors
            device = next(iter(self._entries.values())).pair.A.device.type
            self._autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        finally:
            self.seconds += time.perf_counter() - start

    def _factors_stepped(self, optimizer: Any) -> list[Tensor] | None:
        """The LoRA factors of this model that the optimizer holds and no gradient hook of this
        handle sits on (None: it holds none of the model's factors). A walk over the model,
        cached per optimizer until its number of parameters or this handle's hooks change, so
        that the step pre-hook costs a look at a usually empty list."""
        groups = getattr(optimizer, "param_groups", [])
        size = sum(len(g["params"]) for g in groups)
        known = self._optimizers.get(optimizer)
        if known is None or known[:2] != (size, self._hook_generation):
            ours = {id(f) for pair in adapter_pairs(self.model) for f in (pair.A, pair.B)}
            held = [p for g in groups for p in g["params"] if id(p) in ours]
            # (FSDP2's sharded parameters receive the gradients of the unsharded copies that the
            # hooks sit on; ZeRO-3 hands them to its own partitions)
            unhooked = [p for p in held if not self._is_hooked(p) and not is_partitioned(p)]
            known = (size, self._hook_generation, unhooked if held else None)
            self._optimizers[optimizer] = known
        return known[2]

    def _before_step(self, optimizer: Any) -> None:
        """Before the step of a ``torch.optim`` optimizer of this model: the right-hand-side check
        of the last backward, and a look for factors it steps that got LoRA's own gradients
        because they were never hooked."""
        if self.removed:
            return
        unhooked = self._factors_stepped(optimizer)
        if unhooked is None:
            return
        start = time.perf_counter()
        try:
            self._check_rhs(before="optimizer.step(), which was stopped before changing anything")
            trained = [p for p in unhooked if p.grad is not None and not self._is_hooked(p)]
            if trained:
                names = {id(f): pair for pair in adapter_pairs(self.model) for f in (pair.A, pair.B)}
                pair = names[id(trained[0])]
                raise LoRAProConfigError(
                    f"{pair.name}: adapter {pair.adapter!r} has gradients, but its factors were never "
                    f"hooked by lorapro.attach ({len(trained)} LoRA factors): it was added, activated or "
                    "unfrozen after the last forward pass through the attached model and trained "
                    "through something else (a LoRA layer called directly), so its gradients are "
                    "LoRA's own. optimizer.step() was stopped before changing anything. Call "
                    "handle.sync() after changing adapters, zero the gradients and run the batch again."
                )
        finally:
            self.seconds += time.perf_counter() - start

    # -- the A/B-only part: keyed on the Gram matrices -----------------------------------------
    def _validate(self, in_backward: bool) -> None:
        """Bring every active layer's cache in line with its factors as they are now (batched:
        one product per factor, one host sync; rebuilt only where something changed)."""
        self._validated = True
        if in_backward:  # the next backward pass checks again, whichever forward preceded it
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        entries = [e for e in self._entries.values() if e.active]
        self._products_pending = {}
        with _plain_mode(entries[0].pair.A.device if entries else torch.device("cpu")):
            stale = self._changed(entries)
            if any(e.rhs_a for e in stale):
                # The factors moved since these gradients were taken, with no torch.optim step
                # (whose pre-hook checks and clears them): an optimizer of another kind stepped.
                self._check_rhs(before="this backward pass (the factors moved since the last check)")
            if stale:
                self._rebuild(stale)
        # Only now does every cache of these groups match the products (not if a check raised).
        self._products_seen.update(self._products_pending)

    def _end_of_backward(self) -> None:
        self._validated = False

    def _changed(self, entries: list[_Entry]) -> list[_Entry]:
        """The entries whose Gram matrices differ from those their cache was built from, or that
        have no cache (each entry's current ones left in ``entry.fresh``), in one host sync. The
        Gram matrices are formed in the factors' dtype (float32 products are several times cheaper
        on the CPU); :meth:`_rebuild` forms them again in float64 where float32 cannot hold them.
        A group of layers whose products equal, bit for bit, those all its caches were last
        validated against (:meth:`_validate` records them), with no version counter moved, needs
        nothing more: one comparison for the group."""
        groups: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in entries:
            if e.tracked:
                groups[("tracked",)].append(e)
            else:
                A, B = e.pair.A, e.pair.B
                groups[
                    (tuple(A.shape), tuple(B.shape), A.dtype, A.device, e.pair.experts, e.pair.kind)
                ].append(e)
        change_flags: list[Tensor] = []  # per compared entry: its Gram matrices changed
        compared: list[_Entry] = []
        stale: list[_Entry] = []
        for key, group in groups.items():
            if key == ("tracked",):
                for e in group:
                    if e.captured_btb is None or e.captured_aat is None:
                        e.fresh = None  # its forward pass did not run: its hooks say so if they run
                        continue
                    e.fresh = torch.stack((e.captured_btb, e.captured_aat))[None]
            else:
                products = self._group_products(group, precise=False)
                members = tuple(id(e) for e in group)
                seen = self._products_seen.get(key)
                if (
                    seen is not None
                    and seen[0] == members
                    and all(_unmoved(e) for e in group)
                    and torch.equal(seen[1], products)
                ):
                    # Every cache of the group was validated against these very products and no
                    # counter moved: the usual case at the micro-batches after a step's first.
                    continue
                self._products_pending[key] = (members, products)
                grams = self._as_grams(products, len(group))
                for e, g in zip(group, grams.unbind(0), strict=True):
                    e.fresh = g
            # An in-place write through autograd's view of a factor (any optimizer's step) bumps its
            # version counter: such a layer is rebuilt without a comparison. Writes that bypass the
            # counter (``.data``, a loader) leave it as it was: the Gram matrices tell.
            with_cache, moved = [], []
            for e in group:
                if e.fresh is not None:
                    if e.grams is None or (e.versions is not None and not _unmoved(e)):
                        moved.append(e)
                    else:
                        with_cache.append(e)
            stale += moved
            if with_cache:
                old = torch.stack([e.grams for e in with_cache])
                new = torch.stack([e.fresh for e in with_cache])
                change_flags.append((old != new).flatten(1).any(1))
                compared += with_cache
        if compared:
            marks = torch.cat(change_flags).tolist()  # the one host sync of a validation
            stale += [e for e, m in zip(compared, marks, strict=True) if m]
        return stale

    def _form_precisely_out_of_range(self, entries: list[_Entry]) -> None:
        """Form again in float64 the Gram matrices that float32 cannot hold (factors at scales
        like 1e+-20; one host sync, for the entries about to be rebuilt). Their cache is then
        keyed on float64 Gram matrices, which the float32 ones of a later validation never equal:
        such a layer is rebuilt whenever its group's products change (rare, and exact)."""
        candidates = [e for e in entries if not e.tracked and e.pair.A.dtype != SOLVE_DTYPE]
        if not candidates:
            return
        fresh = torch.cat([e.fresh for e in candidates])  # (problems, 2, r, r)
        flags = gram_out_of_range(fresh)
        counts = [e.fresh.shape[0] for e in candidates]
        if any(k != 1 for k in counts):  # MoE experts: a layer's flag is any of its experts'
            flags = torch.stack([part.any() for part in flags.split(counts)])
        for e, out in zip(candidates, flags.tolist(), strict=True):
            if out:
                e.fresh = self._group_grams([e], precise=True)[0]

    @staticmethod
    def _group_products(group: list[_Entry], precise: bool) -> Tensor:
        """``B^T B`` and ``A A^T`` of a group of layers of equal shapes, stacked as they come:
        (2 layers, [experts,] r, r) in the factors' dtype, or float64 if ``precise``. One small
        product per factor, not one batched product for the group: a batched matmul of small
        matrices opens a parallel region, which costs milliseconds on a busy CPU where the
        per-layer products cost microseconds."""
        products: list[Tensor] = []
        for e in group:
            A, B = e.pair.matrix_A(), e.pair.matrix_B()
            if precise:
                A, B = A.to(SOLVE_DTYPE), B.to(SOLVE_DTYPE)
            if A.dim() == 2:  # (torch.mm: fewer dispatch layers than @, paid cold in a backward pass)
                products += [torch.mm(B.mT, B), torch.mm(A, A.mT)]
            else:
                products += [B.mT @ B, A @ A.mT]
        return torch.stack(products)

    @staticmethod
    def _as_grams(products: Tensor, layers: int) -> Tensor:
        """:meth:`_group_products` as (layers, problems, 2, r, r) float64 Gram matrices."""
        r = products.shape[-1]
        return products.to(SOLVE_DTYPE).reshape(layers, 2, -1, r, r).transpose(1, 2)

    @classmethod
    def _group_grams(cls, group: list[_Entry], precise: bool) -> Tensor:
        return cls._as_grams(cls._group_products(group, precise), len(group))

    def _rebuild(self, entries: list[_Entry]) -> None:
        self._form_precisely_out_of_range(entries)
        buckets: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in entries:
            assert e.fresh is not None
            A = e.pair.A
            buckets[(e.fresh.shape[-1], compute_dtype(A.dtype), A.device)].append(e)
        for (r, dtype, _device), bucket in buckets.items():
            self._rebuild_bucket(bucket, r, dtype)
        self.basis_computations += 1

    def _rebuild_bucket(self, bucket: list[_Entry], r: int, dtype: torch.dtype) -> None:
        """One batched float64 solve for every problem (layer, or MoE expert) of the bucket."""
        grams = torch.cat([e.fresh for e in bucket])  # (K, 2, r, r)
        counts = [e.fresh.shape[0] for e in bucket]
        basis = factor_basis(grams[:, 0], grams[:, 1], self.x_mode, rtol=default_rtol(r, dtype))
        scalings = [e.pair.scaling for e in bucket]
        # (K, 4, r, r): the coefficients' maps, as Coefficients orders them, with 1/s^2 folded in
        maps = torch.stack((basis.pinv_b, basis.x_weights, basis.pinv_a, b_weights(basis)), dim=1)
        fold_scaling(maps, [s for s, k in zip(scalings, counts, strict=True) for _ in range(k)])
        single = all(k == 1 for k in counts)
        # One power of two per entry and coefficient (the largest over its experts), read once;
        # none where the coefficient is well inside float32's range (the hooks' cheaper kernel).
        if single:
            maps, per_problem = split_power_of_two(maps, unsplit=HOOK_UNSPLIT_EXPONENT)
            exponents = per_problem.tolist()
        else:
            amax = maps.abs().amax(dim=(-2, -1))  # (problems, 4); non-finite: no split
            amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
            amax = torch.stack([part.amax(0) for part in amax.split(counts)])
            per_entry_k = split_exponents(amax, unsplit=HOOK_UNSPLIT_EXPONENT)
            exponents = per_entry_k.tolist()
            per_problem = per_entry_k.repeat_interleave(torch.tensor(counts, device=amax.device), dim=0)
            maps = maps * torch.exp2(-per_problem)[:, :, None, None]
        pinv_b, x_weights, pinv_a, b_wts = maps.unbind(1)
        x_zero = self.x_mode == "zero"
        if r <= VEC_OPERATOR_MAX_RANK:
            # The maps are formed in the dtype the hooks apply them in: the solve above is float64,
            # and forming an (r^2, r^2) map in float32 rounds it as much as applying it does.
            kron = basis._replace(u=basis.u.to(dtype), v=basis.v.to(dtype))
            x_op = None if x_zero else vec_operator(kron, x_weights.to(dtype))
            b_op = vec_operator(kron, b_wts.to(dtype))
            basis_a = basis_b = None
        else:
            x_op = b_op = None
            basis_a = basis._replace(x_weights=x_weights)
            basis_b = basis._replace(x_weights=torch.zeros_like(b_wts), proj_weights=-b_wts)
        pinv_b, pinv_a = pinv_b.to(dtype), pinv_a.to(dtype)

        def per_entry(t: Tensor | None) -> Sequence[Tensor | None]:
            """``t``'s problems split by entry: 2-D for an ordinary layer (the hooks' fast path),
            (experts, ...) for MoE experts."""
            if t is None:
                return [None] * len(bucket)
            if single:  # no MoE experts in the bucket: one unbind
                return t.unbind(0)
            return [part[0] if k == 1 else part for part, k in zip(t.split(counts), counts, strict=True)]

        def bases(b: FactorBasis | None) -> Sequence[FactorBasis | None]:
            if b is None:
                return [None] * len(bucket)
            return [FactorBasis(*fields) for fields in zip(*map(per_entry, b), strict=True)]

        columns = zip(
            bucket, scalings, exponents, per_entry(pinv_b), per_entry(pinv_a), per_entry(x_op),
            per_entry(b_op), bases(None if x_zero else basis_a), bases(basis_b), strict=True,
        )  # fmt: skip
        for e, scaling, exps, pb, pa, xo, bo, ba, bb in columns:
            e.cached = _Cached(
                scaling=scaling, pinv_b=pb, pinv_a=pa, x_op=xo, b_op=bo, basis_a=ba, basis_b=bb,
                scales_A=(2.0 ** exps[0], 2.0 ** exps[1]), scales_B=(2.0 ** exps[2], 2.0 ** exps[3]),
                x_zero=x_zero,
            )  # fmt: skip
            e.grams, e.fresh = e.fresh, None
            e.versions = None if e.tracked else _versions(e.pair)

    # -- the right-hand-side check --------------------------------------------------------------
    def _check_rhs(self, before: str) -> None:
        """Compare ``grad_A A^T`` with ``B^T grad_B``, summed over the backward passes since the
        last check, for every layer (batched, one host sync), then forget them. See the module
        docstring."""
        by_rank: dict[int, list[tuple[_Entry, list[Tensor], list[Tensor]]]] = defaultdict(list)
        for e in self._entries.values():
            if e.rhs_a and e.rhs_b:
                by_rank[e.rhs_a[0].shape[-1]].append((e, e.rhs_a, e.rhs_b))
            e.rhs_a, e.rhs_b = [], []
        if not by_rank:
            return
        # Per problem (layer, or MoE expert): the squared Frobenius norms of R - S, R and S, in
        # float64 so that no square overflows; these few kernels run cold, right after backward,
        # so the ratios are taken on the host.
        squares: list[Tensor] = []
        order: list[_Entry] = []  # the entry of each problem
        for r, group in by_rank.items():
            k = len(group[0][1])  # backward passes since the last check
            if all(a[0].dim() == 2 and len(a) == len(b) == k for _, a, b in group):  # one problem per layer
                # (layers, 2, k, r^2), summed over the k backward passes
                RS = torch.stack([t for _, a, b in group for t in (*a, *b)]).view(len(group), 2, k, r * r)
                RS = RS.to(SOLVE_DTYPE).sum(2) if k > 1 else RS.view(-1, 2, r * r).to(SOLVE_DTYPE)
            else:  # MoE experts ((experts, r, r) per layer), or lists of unequal lengths
                sums = [
                    [(t[0] if len(t) == 1 else torch.stack(t).sum(0)).reshape(-1, r, r) for t in (a, b)]
                    for _, a, b in group
                ]
                RS = torch.cat([torch.stack(ab, dim=1) for ab in sums]).view(-1, 2, r * r).to(SOLVE_DTYPE)
            # RS: (problems, 2, r^2), R and S side by side
            squares.append(torch.cat((RS[:, :1] - RS[:, 1:], RS), dim=1).square_().sum(-1))
            order += [e for e, a, _ in group for _ in range(a[0].numel() // (r * r))]
        ratio, entry = 0.0, order[0]
        for e, (diff, r_sq, s_sq) in zip(order, torch.cat(squares).tolist(), strict=True):  # one host sync
            # (non-finite: GradScaler's overflow steps, no verdict)
            value = math.sqrt(diff / max(r_sq, s_sq)) if max(r_sq, s_sq) > 0 else 0.0
            if math.isfinite(value) and value > ratio:
                ratio, entry = value, e
        precision = self._gradient_precision(entry.pair)
        limit = RHS_MISMATCH_LIMITS.get(precision, RHS_MISMATCH_LIMITS[torch.float16])
        if ratio > limit:
            raise LoRAProConfigError(
                f"{entry.pair.name}: the gradients lorapro.attach received for this LoRA layer are not "
                "LoRA's own gradients of a loss that sees the factors only through B A: gA A^T and B^T gB "
                f"differ by {ratio:.1e} (relative; rounding in {_dtype_name(precision)} stays below "
                f"{limit:.0e}). A loss term in the factors themselves (an L2 penalty or a regulariser on "
                "lora_A / lora_B) or a hook that changes their gradients does this, and attach, which "
                "adjusts B inside backward before A's gradient exists, cannot apply Theorem 2.3's X to "
                "such gradients. Move an L2 penalty into the optimizer's weight_decay; or use "
                "lorapro.LoRAProAdamW / LoRAProSGD, which see both gradients; or attach(model, "
                f"x_mode='zero'), which needs no X. Detected before {before}."
            )
        if ratio > RHS_MISMATCH_LIMITS[torch.float32] and not self._warned_precision:
            self._warned_precision = True
            warnings.warn(
                f"lorapro.attach: the LoRA gradients carry {precision} rounding, so gA A^T and B^T gB differ "
                f"by up to {ratio:.1e} (relative, in {entry.pair.name}). attach takes B's X term from B^T gB "
                "(it adjusts B before A's gradient exists): A's adjusted gradient is Theorem 2.1 on the "
                f"gradients it gets to float32 precision, B's to {_dtype_name(precision)} precision. "
                "lorapro.LoRAProAdamW / LoRAProSGD apply the theorem to both gradients in float32; "
                "attach(model, x_mode='zero') needs no X. (Shown once.)",
                LoRAProWarning,
                stacklevel=3,
            )

    def _gradient_precision(self, pair: LoRAPair) -> torch.dtype:
        """The precision LoRA's gradients were computed in: the factors', or autocast's if lower."""
        dtypes = [pair.A.dtype] + ([self._autocast] if self._autocast is not None else [])
        return max(dtypes, key=lambda d: torch.finfo(d).eps)

    # -- the hooks ------------------------------------------------------------------------------
    def _gram_hook(self, entry: _Entry, which: str) -> Callable:
        """Forward hook of a tracked factor's own module, run while the engine holds the factor
        whole: its Gram matrix, and for FSDP2 the gradient hook on the unsharded copy the module
        computes with."""
        pair = entry.pair

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            start = time.perf_counter()
            weight = module.weight  # whole here: gathered by ZeRO-3, FSDP2's unsharded copy
            if entry.fsdp2 and (entry.hooked_b if which == "B" else entry.hooked_a) != id(weight):
                self._hook_unsharded(entry, which, weight)
            with _plain_mode(weight.device):
                if which == "B":
                    entry.captured_btb = gram_b(pair.matrix_B(weight))
                else:
                    entry.captured_aat = gram_a(pair.matrix_A(weight))
            self.seconds += time.perf_counter() - start

        return hook

    def _hook_unsharded(self, entry: _Entry, which: str, weight: Tensor) -> None:
        """FSDP2: hook the unsharded copy the module computes with (FSDP2 keeps one per factor
        and reuses it, so this runs once per factor unless FSDP2 makes a new one)."""
        pair = entry.pair
        if is_dtensor(weight):
            raise LoRAProConfigError(
                f"{pair.name}: the LoRA factor is a DTensor inside its module's forward pass (tensor "
                "parallelism?). lorapro.attach supports FSDP2's fully_shard, whose modules compute with "
                "whole factors; use lorapro.LoRAProAdamW (built after sharding) or leave the LoRA layers "
                "unsharded."
            )
        entry.hooks.append(weight.register_hook(self._make_hook(entry, which, weight)))
        self._hooked[id(weight)] = weakref.ref(weight)
        if which == "B":
            entry.hooked_b = id(weight)
        else:
            entry.hooked_a = id(weight)

    def _make_hook(self, entry: _Entry, which: str, factor: Tensor) -> Callable[[Tensor], Tensor]:
        """The gradient hook of one factor. It runs for every layer in every backward pass, right
        after large matmuls have flushed the CPU's caches, so each Python step and each distinct
        kernel in it is paid cold: it binds what it needs once, inlines the checks and calls
        nothing but the products on the common path (2-D factors, grad mode and autocast off)."""
        pair = entry.pair
        layer, adapter = pair.layer, pair.adapter
        is_A = which == "A"
        partner = pair.B if is_A else pair.A
        adjust = _adjusted_A if is_A else _adjusted_B
        matrix = pair.matrix_A if is_A else pair.matrix_B
        param_of = pair.param_A if is_A else pair.param_B
        flat = pair.kind != "conv" and pair.experts == 1  # 2-D factors: no reshaping
        tracked = entry.tracked
        clock, grad_on, cast_on = time.perf_counter, torch.is_grad_enabled, torch.is_autocast_enabled

        def hook(grad: Tensor) -> Tensor:
            start = clock()
            if not self._validated:
                self._validate(in_backward=True)
            if not entry.active:
                self._follow(entry)
            cached = entry.cached
            if tracked and factor.untyped_storage().size() == 0:
                raise LoRAProConfigError(
                    f"{pair.name}: the engine (DeepSpeed ZeRO-3, FSDP2) released this LoRA factor before "
                    "its gradient arrived; lorapro.attach cannot adjust a partition"
                )
            if cached is None:
                raise LoRAProConfigError(
                    f"{pair.name}: LoRA-Pro's cache for this layer could not be built: its factors are "
                    "sharded (FSDP2) or partitioned (DeepSpeed ZeRO-3) and this step's forward pass did "
                    "not run their lora_A / lora_B modules (call the LoRA layer through its module)"
                )
            both = partner.requires_grad
            scaling = float(layer.scaling[adapter])
            if flat and not (grad_on() or cast_on(grad.device.type)):
                out, rhs = adjust(cached, grad, factor, both)
            else:
                with _plain_mode(grad.device):
                    out, rhs = adjust(cached, matrix(grad), matrix(factor), both)
                    out = param_of(out)
            if rhs is not None:  # for the check of the two right-hand sides, summed there
                kept = entry.rhs_a if is_A else entry.rhs_b
                kept.append(rhs)
                if len(kept) > RHS_KEPT:
                    kept[:] = [torch.stack(kept).sum(0)]
            if scaling != cached.scaling:  # set_scale since the cache was made: every term goes with 1/s^2
                out.mul_((cached.scaling / scaling) ** 2)
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
# MoE experts (3-D operands) take the batched twins of the same products.
def _adjusted_A(c: _Cached, g: Tensor, A: Tensor, both: bool) -> tuple[Tensor, Tensor | None]:
    """``((B^T B)^+ grad_A + X A) / s^2`` for A's (r, n) gradient ``g``, and ``R = grad_A A^T``
    when X was used; B frozen: ``(B^T B)^+ grad_A / s^2`` (Theorem 2.1 for A alone)."""
    dtype = c.pinv_b.dtype
    if g.dtype != dtype:
        g, A = g.to(dtype), A.to(dtype)
    if c.x_zero or not both:
        return adjust_grad_A(A, g, c.pinv_b, None, scales=c.scales_A), None
    if g.dim() == 2 and c.x_op is not None:  # the common path, with nothing but the products
        rhs = torch.mm(g, A.mT)  # grad_A A^T
        x = torch.mm(c.x_op, rhs.view(-1, 1)).view(rhs.shape)
    else:
        rhs = torch.mm(g, A.mT) if g.dim() == 2 else torch.bmm(g, A.mT)
        x = (
            _apply_vec(c.x_op, rhs)
            if c.x_op is not None
            else x_matrix(c.basis_a, rhs.to(SOLVE_DTYPE)).to(dtype)
        )
    return adjust_grad_A(A, g, c.pinv_b, x, scales=c.scales_A), rhs


def _adjusted_B(c: _Cached, g: Tensor, B: Tensor, both: bool) -> tuple[Tensor, Tensor | None]:
    """``(grad_B (A A^T)^+ + B coef) / s^2`` for B's (m, r) gradient ``g``, X taken from
    ``S = B^T grad_B`` (equal to ``grad_A A^T`` for LoRA's gradients), and S when X was used;
    A frozen: ``grad_B (A A^T)^+ / s^2`` (LoRA-FA's update)."""
    dtype = c.pinv_a.dtype
    if g.dtype != dtype:
        g, B = g.to(dtype), B.to(dtype)
    if not both:
        return adjust_grad_B(B, g, c.pinv_a, None, scales=c.scales_B), None
    if g.dim() == 2 and c.b_op is not None:  # the common path, with nothing but the products
        rhs = torch.mm(B.mT, g)  # B^T grad_B
        coef = torch.mm(c.b_op, rhs.view(-1, 1)).view(rhs.shape)
    else:
        rhs = torch.mm(B.mT, g) if g.dim() == 2 else torch.bmm(B.mT, g)
        coef = (
            _apply_vec(c.b_op, rhs)
            if c.b_op is not None
            else b_coefficient(c.basis_b, rhs.to(SOLVE_DTYPE)).to(dtype)
        )
    return adjust_grad_B(B, g, c.pinv_a, coef, scales=c.scales_B), (None if c.x_zero else rhs)


def _apply_vec(op: Tensor, m: Tensor) -> Tensor:
    """An (r^2, r^2) map (:func:`~lorapro.closed_form.vec_operator`) applied to the r x r ``m``: a
    matrix-vector product as an (r^2, 1) matmul (batched over MoE experts)."""
    if m.dim() == 2:
        return torch.mm(op, m.view(-1, 1)).view(m.shape)
    return torch.bmm(op, m.reshape(m.shape[0], -1, 1)).view(m.shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    Gradient clipping after backward clips the adjusted gradients. A loss term in the factors
    themselves (an L2 penalty on lora_A / lora_B) is refused before the optimizer's step unless
    ``x_mode="zero"``: put it in the optimizer's ``weight_decay``, or use a lorapro optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lorapro.attach takes the model (an nn.Module with PEFT LoRA layers), got {type(model).__name__}"
        )
    check_choice("x_mode", x_mode, X_MODES)
    return LoRAProHandle(model, x_mode)
