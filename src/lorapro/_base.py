"""Orchestration shared by the LoRA-Pro optimizers.

A step runs in three phases so that nothing is ever half-updated:

1. collect every parameter that has a gradient, pairing LoRA factors by module;
2. compute the adjusted LoRA gradients (batched over layers of equal shape and scaling)
   and check raw and adjusted gradients for NaN/Inf in one reduction (one host sync);
3. only then touch parameters and optimizer state.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .closed_form import X_MODES, compute_dtype, solve_coefficients
from .errors import LoRAProConfigError, NonFiniteGradientError
from .functional import any_nonfinite
from .pairs import LoRAPair, find_lora_pairs

NONFINITE_POLICIES = ("raise", "skip")


@dataclass(eq=False)
class PairWork:
    """One LoRA pair's matrices and gradients for the current step, in the compute dtype."""

    pair: LoRAPair
    scaling: float
    A: Tensor  # (r, n)
    B: Tensor  # (m, r)
    grad_A: Tensor  # LoRA's own gradient, (r, n)
    grad_B: Tensor  # (m, r)
    adjusted_A: Tensor | None = None
    adjusted_B: Tensor | None = None


@dataclass(eq=False)
class GroupWork:
    group: dict[str, Any]
    pairs: list[PairWork] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)  # ordinary parameters with a gradient
    grads: list[Tensor] = field(default_factory=list)


def check_number(
    name: str, value: Any, *, low: float = 0.0, high: float | None = None, open_high=False, open_low=False
) -> float:
    """Validate a real hyper-parameter (numpy scalars welcome) and return it as a float.

    The value must be finite and in [low, high], with either end open on request. Returning a
    plain float keeps param groups loadable with ``torch.load(weights_only=True)``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoRAProConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise LoRAProConfigError(f"{name} must be finite, got {value!r}")
    if value < low or (open_low and value == low):
        raise LoRAProConfigError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if open_high else value > high):
        bound = f"< {high}" if open_high else f"<= {high}"
        raise LoRAProConfigError(f"{name} must be {bound}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise LoRAProConfigError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")


#: On the CPU, stacks of layers are cut so that no stacked operand exceeds this many bytes:
#: larger buffers are fresh allocations every step, page-faulted each time (measured by
#: benchmarks/closed_form_layout.py). GPU caching allocators have no such cost.
CPU_MAX_STACK_BYTES = 1 << 20


def adjust_pairs(
    works: list[PairWork],
    x_mode_of: Callable[[PairWork], str],
    reduce_terms: Callable[[Tensor], Tensor] | None = None,
    *,
    max_stack_bytes: float | None = None,
) -> list[Tensor]:
    """Theorem 2.1 for many layers at once; fills ``adjusted_A`` / ``adjusted_B``.

    Layers of equal rank, dtype, device and x_mode form a bucket that shares one batched
    solve whatever their shapes and scalings. Within a bucket, layers of equal (m, n) are
    stacked: ``Z = [B, grad_B]`` (g, m, 2r) and ``Y = [A; grad_A]`` (g, 2r, n), one copy each.
    Then, per stack:

    - two ``bmm`` give all four r x r terms, ``B^T Z = [B^T B, B^T grad_B]`` and
      ``Y A^T = [A A^T; grad_A A^T]``, written straight into the bucket's (k, 4 r^2) buffer;
    - after two batched ``eigh`` and some r x r algebra for the whole bucket (1/s^2 folded
      into the coefficients), two more ``bmm`` give the adjusted gradients,
      ``[X, (B^T B)^+] Y`` and ``Z [b_coef; (A A^T)^+]``.

    The concatenation costs one copy and reads each operand in one matmul instead of two; on
    the CPU, BLAS also handles the 64-byte rows of Z better than the 32-byte rows of an
    (m, 8) factor (at m = 11008, 82 against 117 us for the two B terms). Stacking saves
    launches and per-layer overhead. ``max_stack_bytes`` caps a stack's largest operand
    (``None``: :data:`CPU_MAX_STACK_BYTES` on the CPU, no cap elsewhere; 0 runs layer by
    layer).

    ``reduce_terms`` sums partial terms across shards when the factors are sharded (every
    term is a sum over the rows of B or the columns of A, so shard terms add up).
    Returns the r x r tensors (terms and coefficients) so the caller can check them.
    """
    buckets: dict[tuple, list[PairWork]] = defaultdict(list)
    for w in works:
        buckets[(w.A.shape[0], w.A.dtype, w.A.device, x_mode_of(w))].append(w)
    small: list[Tensor] = []
    for (r, dtype, device, x_mode), unordered in buckets.items():
        limit = max_stack_bytes
        if limit is None:
            limit = CPU_MAX_STACK_BYTES if device.type == "cpu" else math.inf
        # Equal shapes next to each other, so each stack is a contiguous range of the bucket.
        bucket = sorted(unordered, key=lambda w: (w.B.shape[0], w.A.shape[1]))
        stacks = _stacks(bucket, limit)
        terms = torch.empty((len(bucket), 4 * r * r), dtype=dtype, device=device)
        b_terms, a_terms = _split_term_views(terms, r)
        # One scratch serves every stack, in both passes: the concatenations are rebuilt for
        # the second pass rather than kept, so the step holds one stack's worth of them (on
        # the CPU, <= 2 x max_stack_bytes; reused, so not page-faulted anew) instead of a
        # copy of every factor and gradient.
        scratch = terms.new_empty(max(_stack_elements(bucket[lo:hi], r) for _, lo, hi in stacks))
        for shape, lo, hi in stacks:
            Z, Y = _concatenate(bucket[lo:hi], shape, r, scratch)
            torch.bmm(Z[..., :r].mT, Z, out=b_terms[lo:hi])
            torch.bmm(Y, Y[:, :r].mT, out=a_terms[lo:hi])
        if reduce_terms is not None:
            terms = reduce_terms(terms)
            b_terms, a_terms = _split_term_views(terms, r)
        coefs = solve_coefficients(
            b_terms[..., :r], a_terms[..., :r, :], b_terms[..., r:], a_terms[..., r:, :], x_mode=x_mode
        )
        left = torch.cat((coefs.a_coef, coefs.grad_a_coef), dim=-1)  # (k, r, 2r), times Y
        right = torch.cat((coefs.b_coef, coefs.grad_b_coef), dim=-2)  # (k, 2r, r), Z times it
        _scale_coefficients(left, right, [w.scaling for w in bucket])
        for shape, lo, hi in stacks:
            Z, Y = _concatenate(bucket[lo:hi], shape, r, scratch)
            adjusted_A = torch.bmm(left[lo:hi], Y).unbind(0)
            adjusted_B = torch.bmm(Z, right[lo:hi]).unbind(0)
            for w, gA, gB in zip(bucket[lo:hi], adjusted_A, adjusted_B, strict=True):
                w.adjusted_A, w.adjusted_B = gA, gB
        small += [terms, *coefs]
    return small


def _split_term_views(terms: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Views of the (k, 4 r^2) term buffer: (k, r, 2r) ``[B^T B, B^T gB]`` and (k, 2r, r)
    ``[A A^T; gA A^T]``, each layer's block contiguous."""
    half = 2 * r * r
    return terms[:, :half].unflatten(-1, (r, 2 * r)), terms[:, half:].unflatten(-1, (2 * r, r))


def _stack_elements(stack: list[PairWork], r: int) -> int:
    m, n = stack[0].B.shape[0], stack[0].A.shape[1]
    return len(stack) * 2 * r * (m + n)


def _concatenate(
    stack: list[PairWork], shape: tuple[int, int], r: int, scratch: Tensor
) -> tuple[Tensor, Tensor]:
    """``Z = [B, grad_B]`` (g, m, 2r) and ``Y = [A; grad_A]`` (g, 2r, n) of a stack, in ``scratch``."""
    (m, n), g = shape, len(stack)
    Z = scratch[: g * m * 2 * r].view(g, m, 2 * r)
    Y = scratch[g * m * 2 * r : g * 2 * r * (m + n)].view(g, 2 * r, n)
    for w, z, y in zip(stack, Z.unbind(0), Y.unbind(0), strict=True):
        torch.cat((w.B, w.grad_B), dim=1, out=z)
        torch.cat((w.A, w.grad_A), dim=0, out=y)
    return Z, Y


def _stacks(bucket: list[PairWork], max_bytes: float) -> list[tuple[tuple[int, int], int, int]]:
    """((m, n), start, stop) of each stack in a shape-sorted bucket: a run of equal shapes,
    cut where its larger operand (Z or Y) would exceed ``max_bytes`` (never below one layer)."""
    stacks: list[tuple[tuple[int, int], int, int]] = []
    for i, w in enumerate(bucket):
        shape = (w.B.shape[0], w.A.shape[1])
        layer_bytes = 2 * w.A.shape[0] * max(shape) * w.A.element_size()
        if stacks and stacks[-1][0] == shape and (i + 1 - stacks[-1][1]) * layer_bytes <= max_bytes:
            stacks[-1] = (shape, stacks[-1][1], i + 1)
        else:
            stacks.append((shape, i, i + 1))
    return stacks


def _scale_coefficients(left: Tensor, right: Tensor, scalings: list[float]) -> None:
    """Fold each layer's 1/s^2 into its coefficients, in place, from Python floats (a tensor
    of scalings would cost a host-to-device copy per step)."""
    inv_s2 = [1.0 / (s * s) for s in scalings]
    if len(set(inv_s2)) == 1:  # the usual case: one scaling for every layer
        if inv_s2[0] != 1.0:
            left.mul_(inv_s2[0])
            right.mul_(inv_s2[0])
        return
    for lc, rc, c in zip(left.unbind(0), right.unbind(0), inv_s2, strict=True):
        lc.mul_(c)
        rc.mul_(c)


class LoRAProOptimizer(Optimizer):
    """Base class: finds the model's LoRA pairs and runs the collect / adjust / apply step."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        nonfinite: str,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the model (an nn.Module with PEFT LoRA layers), "
                f"got {type(model).__name__}; pass the model itself: {type(self).__name__}(model, lr=...)"
            )
        check_choice("nonfinite policy", nonfinite, NONFINITE_POLICIES)
        pairs = find_lora_pairs(model)
        if not pairs:
            raise LoRAProConfigError(
                "no trainable LoRA layers found in the model: LoRA-Pro adjusts the gradients of PEFT LoRA "
                "factors. Wrap the model first, e.g. model = peft.get_peft_model(model, LoraConfig(...)), "
                "and make sure an adapter is active and trainable."
            )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        """Steps skipped because of non-finite gradients (``nonfinite="skip"``)."""
        self._pairs = pairs
        self._checked: list[Tensor] = []  # r x r tensors of the current step, for the NaN check
        # The options this class defines (torch adds keys such as "differentiable" to
        # self.defaults on load, and those never appear in a saved group).
        self._option_keys = tuple(defaults)
        super().__init__(params, defaults)
        self._index_pairs()

    # -- set-up -----------------------------------------------------------------------------
    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer adjusts, in module order."""
        return [p for group in self._group_pairs for p in group]

    def _validate_group(self, group: dict[str, Any]) -> None:
        group["lr"] = check_number("lr", group["lr"])
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"])
        check_choice("x_mode", group["x_mode"], X_MODES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._validate_group(group)
            for p in group["params"]:
                if p.is_sparse:
                    raise LoRAProConfigError(
                        "sparse parameters are not supported; use dense embeddings (sparse=False)"
                    )
            if hasattr(self, "_group_pairs"):
                self._index_pairs()
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _index_pairs(self) -> None:
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        group_pairs: list[list[LoRAPair]] = [[] for _ in self.param_groups]
        lora_ids: set[int] = set()
        for pair in self._pairs:
            ga, gb = group_of.get(id(pair.A)), group_of.get(id(pair.B))
            if ga is None and gb is None:
                continue
            if ga != gb:
                raise LoRAProConfigError(
                    f"{pair.name} (adapter {pair.adapter!r}): lora_A and lora_B must be in the same "
                    f"parameter group (found groups {ga} and {gb}); LoRA-Pro updates them together with "
                    "one learning rate. Put both factors of every layer in one group."
                )
            group_pairs[ga].append(pair)
            lora_ids.update((id(pair.A), id(pair.B)))
        if not lora_ids:
            raise LoRAProConfigError(
                "none of the model's LoRA factors is among the parameters given to the optimizer; pass "
                "params=None to optimise every trainable parameter of the model"
            )
        self._group_pairs = group_pairs
        self._lora_ids = lora_ids

    # -- the step ---------------------------------------------------------------------------
    def _refresh_pairs(self) -> None:
        """Follow factors that a wrapper replaced after construction (see LoRAPair.current).

        Without this, the stale pairs would never see a gradient and the new factors would
        silently get plain AdamW. Raises if the new factors are not among the parameters.
        """
        fresh = [pair.current() for pair in self._pairs]
        if any(new is not old for new, old in zip(fresh, self._pairs, strict=True)):
            self._pairs = fresh
            self._index_pairs()

    def _collect(self) -> list[GroupWork]:
        self._refresh_pairs()
        works = []
        for group, pairs in zip(self.param_groups, self._group_pairs, strict=True):
            work = GroupWork(group)
            for pair in pairs:
                gA, gB = pair.A.grad, pair.B.grad
                if gA is None and gB is None:
                    continue  # the layer took no part in this forward pass
                if (gA is not None and gA.is_sparse) or (gB is not None and gB.is_sparse):
                    raise LoRAProConfigError(
                        f"{pair.name}: sparse gradients are not supported; "
                        "use dense embeddings (sparse=False)"
                    )
                dtype = compute_dtype(pair.A.dtype)
                A = pair.matrix_A().to(dtype)
                B = pair.matrix_B().to(dtype)
                gA = torch.zeros_like(A) if gA is None else pair.matrix_A(gA).to(dtype)
                gB = torch.zeros_like(B) if gB is None else pair.matrix_B(gB).to(dtype)
                work.pairs.append(PairWork(pair, pair.scaling, A, B, gA, gB))
            for p in group["params"]:
                if p.grad is None or id(p) in self._lora_ids:
                    continue
                if p.grad.is_sparse:
                    raise LoRAProConfigError(
                        "sparse gradients are not supported; use dense embeddings (sparse=False)"
                    )
                work.params.append(p)
                work.grads.append(p.grad)
            works.append(work)
        return works

    def _reduce_gram_terms(self, terms: Tensor) -> Tensor:
        """Sum the (4, k, r, r) Gram terms over shards of sharded factors.

        Replicated factors (one process, DDP) need nothing: the identity. A sharded-parameter
        integration overrides this with an all-reduce (4 k r^2 numbers per bucket).
        """
        return terms

    def _adjust(self, pair_works: list[PairWork], x_mode_of: Callable[[PairWork], str]) -> None:
        self._checked += adjust_pairs(pair_works, x_mode_of, self._reduce_gram_terms)

    def _prepare(self, works: list[GroupWork]) -> None:
        """Fill in the adjusted gradients (subclasses may choose X per group)."""
        group_of = {id(w): g.group for g in works for w in g.pairs}
        self._adjust([w for g in works for w in g.pairs], lambda w: group_of[id(w)]["x_mode"])

    def _apply(self, work: GroupWork) -> None:
        raise NotImplementedError

    def _check_before_apply(self, works: list[GroupWork]) -> None:
        """Raise for anything that would stop ``_apply`` part-way (nothing is modified yet)."""

    def _nonfinite(self, works: list[GroupWork]) -> bool:
        """Does any gradient of this step hold NaN or Inf? One host sync.

        LoRA gradients are checked through their r x r terms ``B^T gB`` and ``gA A^T``: every
        NaN or Inf in a factor's gradient reaches them through the matmul (IEEE: 0 * NaN and
        0 * Inf are NaN), so the (m, r) and (r, n) tensors need no pass of their own. The
        solved coefficients are checked too, and through them the adjusted gradients (a
        finite coefficient times a finite gradient cannot overflow at any realistic scale:
        the pseudo-inverse carries 1/sigma^2 but LoRA's gradient carries sigma).
        """
        tensors: list[Tensor] = list(self._checked)
        for work in works:
            tensors += work.grads
        return bool(any_nonfinite(tensors))  # the one sync per step (GradScaler pays the same)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step: adjust the LoRA gradients by Theorem 2.1, then update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()
        self._checked = []
        self._prepare(works)
        if self._nonfinite(works):
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    "a gradient holds NaN or Inf; no parameter or optimizer state was changed. Find the "
                    "cause (learning rate, loss scale, bad batch), or construct the optimizer with "
                    "nonfinite='skip' to skip such steps (counted in optimizer.skipped_steps)."
                )
            self.skipped_steps += 1
            return loss
        self._check_before_apply(works)
        for work in works:
            self._apply(work)
        return loss

    # -- state dict ------------------------------------------------------------------------
    def _expected_state_shapes(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple[int, ...]]:
        """Shapes of the state tensors this optimizer keeps for ``param`` in ``group``."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, checking that it belongs to this model and mode first.

        Unlike ``torch.optim``, moments keep the dtype they were saved in (float32 for
        low-precision parameters) instead of being cast to the parameter dtype.
        """
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise LoRAProConfigError(
                "not an optimizer state dict: expected the keys 'state' and 'param_groups'"
            )
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise LoRAProConfigError(
                "the state dict was saved from a different model or parameter grouping (the number of "
                "groups or of parameters per group differs); build the optimizer the same way as when saving"
            )
        id_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        for saved_group in saved_groups:
            # With this optimizer's tensors in place of the saved ids, so that checks on the
            # parameters themselves (fused=True's dtype and device) run on load too.
            params = [id_to_param[i] for i in saved_group["params"]]
            merged = {**self.defaults, **saved_group, "params": params}
            missing = [k for k in self._option_keys if k not in saved_group]
            if missing:
                raise LoRAProConfigError(
                    f"the state dict's param groups lack {missing}: it was saved by another optimizer "
                    f"(not {type(self).__name__}); load a state dict saved by the same optimizer class"
                )
            self._validate_group(merged)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, entry in saved_state.items():
            param = id_to_param.get(saved_id)
            if param is None:
                raise LoRAProConfigError(f"state for unknown parameter id {saved_id} in the state dict")
            group = dict(group_of[id(param)])
            saved_group = next(g for g in saved_groups if saved_id in g["params"])
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            expected = self._expected_state_shapes(group, param)
            got = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor) and k != "step"}
            if got and got != expected:
                raise LoRAProConfigError(
                    f"the state dict does not match this model/mode: a parameter of shape "
                    f"{tuple(param.shape)} has saved state {got}, expected {expected}. Load a state dict "
                    "saved from the same model with the same optimizer mode."
                )
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter dtype; restore the saved dtypes.
        for saved_id, entry in saved_state.items():
            param = id_to_param[saved_id]
            for key, value in entry.items():
                if isinstance(value, Tensor) and key != "step":
                    self.state[param][key] = value.to(device=param.device)
        self._index_pairs()
