"""Orchestration shared by the LoRA-Pro optimizers.

A step runs in three phases so that nothing is ever half-updated:

1. collect every parameter that has a gradient, pairing LoRA factors by module;
2. solve the r x r half of the closed form for every LoRA layer (batched over layers) and
   check raw gradients, Gram terms and coefficients for NaN/Inf in one reduction (one host
   sync);
3. only then touch parameters and optimizer state: the adjusted LoRA gradients are produced
   chunk by chunk into one reused buffer, each chunk consumed by the update at once.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._sharded import FactorSharding, ShardedPair, local_tensors
from .backward_hooks import attached_handle
from .closed_form import (
    SOLVE_DTYPE,
    X_MODES,
    adjust_grad_A,
    adjust_grad_B,
    compute_dtype,
    default_rtol,
    solve_coefficients,
    split_power_of_two,
)
from .errors import LoRAProConfigError, NonFiniteGradientError
from .functional import any_nonfinite
from .pairs import LoRAPair, PairTracker

NONFINITE_POLICIES = ("raise", "skip")


@dataclass(eq=False)
class PairWork:
    """One LoRA pair's matrices and gradients for the current step, in the compute dtype."""

    pair: LoRAPair
    scaling: float
    A: Tensor  # (r, n); (E, r, n) for MoE experts
    B: Tensor  # (m, r); (E, m, r)
    grad_A: Tensor  # LoRA's own gradient, (r, n)
    grad_B: Tensor  # (m, r)
    # The r x r grad_A_coef, a_coef, grad_B_coef, b_coef of closed_form.Coefficients, 1/s^2
    # folded in and each divided by a power of two (closed_form.split_power_of_two) that `scales`
    # holds once resolve_scales has read them; set by solve_pairs.
    coefficients: Sequence[Tensor] | None = None
    scales: tuple[float, float, float, float] | None = None
    exponents: tuple[Tensor, int] | None = None  # (the bucket's (k, 4) exponents, this layer's row)
    adjusted_A: Tensor | None = None
    adjusted_B: Tensor | None = None
    # Set when the factors are DTensor shards (FSDP2): A, B and the gradients above are then
    # this rank's local shards, A by columns and B by rows (see lorapro._sharded).
    sharded: ShardedPair | None = None
    # A factor frozen at this step (requires_grad=False) is not updated; the other one gets
    # Theorem 2.1's one-factor optimum, and the frozen one's adjusted gradient is zero.
    train_A: bool = True
    train_B: bool = True


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


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Skips the call when there is nothing to convert: the step runs this for every factor.
    return t if t.dtype == dtype else t.to(dtype)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise LoRAProConfigError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")


#: Adjusted gradients are produced and consumed in chunks of at most this many bytes (one
#: reused buffer; a single larger layer gets a chunk of its own), so a step never holds a copy
#: of every factor's gradient. The cap is there for memory: on this project's CPU the step
#: time hardly depends on it, from layer by layer to all at once (benchmarks/stream_chunks.py).
CPU_CHUNK_BYTES = 2 << 20
#: Elsewhere (CUDA), larger chunks keep the number of update launches small.
DEVICE_CHUNK_BYTES = 64 << 20


def solve_pairs(
    works: list[PairWork],
    x_mode_of: Callable[[PairWork], str],
    reduce_terms: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """The r x r half of Theorem 2.1 for many layers at once; sets each ``w.coefficients``.

    Layers of equal rank, dtype, device and x_mode form a bucket that shares one batched
    solve (:func:`~lorapro.closed_form.solve_coefficients`), whatever their shapes and
    scalings: the four r x r terms of each layer, then one batched ``eigh`` and the r x r
    algebra for the whole bucket, with each layer's 1/s^2 folded into its coefficients.
    Nothing of size m or n is allocated: the (m, r) and (r, n) work happens in
    :func:`adjust_into`, after the caller has checked the returned tensors.

    ``reduce_terms`` sums partial terms across shards when the factors are sharded (every
    term is a sum over the rows of B or the columns of A, so shard terms add up).
    Returns the r x r tensors (terms and coefficients) so the caller can check them for
    NaN/Inf: a non-finite gradient reaches its layer's terms through the matmuls.
    """
    buckets: dict[tuple, list[PairWork]] = defaultdict(list)
    for w in works:
        buckets[(w.A.shape[-2], w.A.dtype, w.A.device, x_mode_of(w))].append(w)
    small: list[Tensor] = []
    for (r, dtype, _device, x_mode), bucket in buckets.items():
        # The four terms in float64 (closed_form: the factors' scale), fresh r x r results stacked
        # once per bucket: cheaper per layer than writing into views of a buffer.
        products: list[Tensor] = []
        for w in bucket:
            A, B, gA, gB = (t.to(SOLVE_DTYPE) for t in (w.A, w.B, w.grad_A, w.grad_B))
            Bt, At = B.mT, A.mT
            products += [Bt @ B, A @ At, Bt @ gB, gA @ At]
        counts = [1 if w.A.dim() == 2 else w.A.shape[0] for w in bucket]  # problems per layer
        if len(counts) == sum(counts):
            terms = torch.stack(products).unflatten(0, (len(bucket), 4))  # (k, 4, r, r)
        else:  # MoE experts: each layer brings (E, r, r) terms
            terms = torch.cat([torch.stack(products[4 * i : 4 * i + 4], dim=-3).reshape(-1, 4, r, r)
                               for i in range(len(bucket))])  # fmt: skip
        if reduce_terms is not None:
            terms = reduce_terms(terms)
        coefs = solve_coefficients(*terms.unbind(1), x_mode=x_mode, rtol=default_rtol(r, dtype))
        coefs = torch.stack(coefs, dim=1)  # (K, 4, r, r)
        _scale_coefficients(coefs, [w.scaling for w, k in zip(bucket, counts, strict=True) for _ in range(k)])
        _drop_frozen(coefs, bucket, counts)
        small.append(_overflow_flags(coefs, terms, bucket, counts, dtype))
        split, exponents = split_power_of_two(coefs)  # (K, 4, r, r), (K, 4)
        if len(counts) != sum(counts):  # one power of two per layer: the largest over its experts
            exponents = torch.cat([k.amax(0, keepdim=True).expand_as(k) for k in exponents.split(counts)])
            split = coefs * torch.exp2(-exponents)[..., None, None]
        split = split.to(dtype)
        start = 0
        for w, k in zip(bucket, counts, strict=True):
            part = split[start : start + k]
            w.coefficients = part.unbind(1) if w.A.dim() == 3 else part[0].unbind(0)
            w.exponents, w.scales = (exponents, start), None
            start += k
        small += [terms, split]
    return small


def _overflow_flags(
    coefs: Tensor, terms: Tensor, bucket: list[PairWork], counts: list[int], dtype: torch.dtype
) -> Tensor:
    """Inf where a layer's adjusted gradient could overflow ``dtype``, 0 elsewhere: for the step's
    non-finite check, which must refuse before anything is updated.

    The coefficients are float64 and applied split by powers of two, so they stay finite where the
    adjusted gradients do not (a finite but huge raw gradient on a tiny factor). A Frobenius bound
    catches it: ``|P gA + X A| <= |P| |gA| + |X| |A|`` (and B's alike), with ``|A|`` from its Gram
    matrix and ``|gA| <= sqrt(numel) max|gA|`` from one pass over the gradients (no overflow)."""
    grads = [t for w in bucket for t in (w.grad_A, w.grad_B)]
    maxima = torch.stack(torch._foreach_norm(grads, float("inf"))).to(SOLVE_DTYPE)
    sizes = torch.tensor([t[0].numel() if t.dim() == 3 else t.numel() for t in grads], dtype=SOLVE_DTYPE)
    grad_norms = (maxima * sizes.to(maxima.device).sqrt()).view(-1, 2)
    grad_norms = grad_norms.repeat_interleave(torch.tensor(counts, device=grad_norms.device), dim=0)  # (K, 2)
    coef_norms = torch.linalg.matrix_norm(coefs)  # (K, 4): P, X, Q, b
    factor_norms = terms[:, :2].diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()  # (K, 2): |B|, |A|
    bound_A = coef_norms[:, 0] * grad_norms[:, 0] + coef_norms[:, 1] * factor_norms[:, 1]
    bound_B = coef_norms[:, 2] * grad_norms[:, 1] + coef_norms[:, 3] * factor_norms[:, 0]
    bound = torch.maximum(bound_A, bound_B)
    limit = torch.finfo(dtype).max
    return torch.where(torch.isfinite(bound) & (bound < limit), 0.0, float("inf"))


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


def resolve_scales(works: Iterable[PairWork]) -> None:
    """Read the powers of two :func:`solve_pairs` split off the coefficients (one host read per
    bucket; call it after the step's non-finite check has synchronised anyway)."""
    read: dict[int, list[list[float]]] = {}
    for w in works:
        if w.exponents is None:
            continue
        exponents, row = w.exponents
        if id(exponents) not in read:
            read[id(exponents)] = exponents.tolist()
        scales = read[id(exponents)][row]
        w.scales = (2.0 ** scales[0], 2.0 ** scales[1], 2.0 ** scales[2], 2.0 ** scales[3])


def adjust_into(w: PairWork, out_A: Tensor, out_B: Tensor) -> None:
    """Write the layer's adjusted gradients (Theorem 2.1) into ``out_A`` (r, n) and ``out_B``
    (m, r), from the coefficients :func:`solve_pairs` left on it, with the closed form's
    :func:`~lorapro.closed_form.adjust_grad_A` / ``adjust_grad_B``."""
    if w.coefficients is None:
        raise RuntimeError("adjust_into needs the layer's coefficients: call solve_pairs first")
    if w.scales is None:
        resolve_scales([w])
    assert w.scales is not None
    grad_a_coef, a_coef, grad_b_coef, b_coef = w.coefficients
    s_p, s_x, s_q, s_b = w.scales
    adjust_grad_A(w.A, w.grad_A, grad_a_coef, a_coef, out=out_A, scales=(s_p, s_x))
    adjust_grad_B(w.B, w.grad_B, grad_b_coef, b_coef, out=out_B, scales=(s_q, s_b))


def adjusted_gradients(w: PairWork) -> tuple[Tensor, Tensor]:
    """The layer's adjusted gradients in fresh tensors (see :func:`adjust_into`)."""
    out_A, out_B = torch.empty_like(w.A), torch.empty_like(w.B)
    adjust_into(w, out_A, out_B)
    return out_A, out_B


def adjusted_chunks(works: list[PairWork], max_bytes: float | None = None) -> Iterator[list[PairWork]]:
    """Yield the layers in chunks with ``adjusted_A`` / ``adjusted_B`` filled in.

    The adjusted gradients of a chunk are views of one buffer that the next chunk reuses:
    consume them (update the parameters) before asking for the next chunk, and do not keep
    them. A chunk holds layers of one dtype and device, in the given order, whose adjusted
    gradients take at most ``max_bytes`` together (``None``: :data:`CPU_CHUNK_BYTES` on the
    CPU, :data:`DEVICE_CHUNK_BYTES` elsewhere); a larger layer forms a chunk of its own. So the
    step's transient memory is this buffer plus O(r^2) per layer, not a copy of the gradients.
    """
    resolve_scales(w for w in works if w.scales is None)  # (one read per bucket, not per layer)
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
                adjust_into(w, out_A, out_B)
                w.adjusted_A, w.adjusted_B = out_A, out_B
            yield chunk
            for w in chunk:  # the buffer is about to be overwritten
                w.adjusted_A = w.adjusted_B = None


def adjust_pairs(
    works: list[PairWork],
    x_mode_of: Callable[[PairWork], str],
    reduce_terms: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Theorem 2.1 for many layers, each layer's adjusted gradients in tensors of its own.

    :func:`solve_pairs` then :func:`adjusted_gradients` for every layer. This holds every adjusted
    gradient at once, which full mode needs (it builds each layer's equivalent gradient);
    the efficient updates stream through :func:`adjusted_chunks` instead.
    """
    small = solve_pairs(works, x_mode_of, reduce_terms)
    resolve_scales(works)
    for w in works:
        w.adjusted_A, w.adjusted_B = adjusted_gradients(w)
    return small


def _refuse_engine_managed(pairs: list[LoRAPair], optimizer_name: str) -> None:
    """Raise if DeepSpeed took the LoRA factors over (ZeRO 1/2 and its bf16/fp16 master weights
    link each parameter to a flat partition; ZeRO-3 partitions it): DeepSpeed's own optimizer,
    not the lorapro one, would update them, with plain AdamW."""
    for pair in pairs:
        if hasattr(pair.A, "_hp_mapping") or hasattr(pair.A, "ds_id"):
            raise LoRAProConfigError(
                f"{pair.name}: DeepSpeed manages this model's LoRA factors (ZeRO stages 1-3, or its "
                f"bf16/fp16 sections), so the {optimizer_name} built for it cannot update them: DeepSpeed "
                "steps its own optimizer on flat partitions, with plain AdamW (the Trainer even discards "
                "an optimizer passed with optimizers= under DeepSpeed). Use lorapro.attach(model) before "
                "deepspeed.initialize with DeepSpeed's own optimizer, or LoRAProCallback in a Trainer."
            )


class _EngineCheck:
    """Forward pre-hook of a model a lorapro optimizer was built for, until its first step."""

    def __init__(self, pairs: list[LoRAPair], optimizer_name: str) -> None:
        self.pairs = pairs
        self.optimizer_name = optimizer_name

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            _refuse_engine_managed(self.pairs, self.optimizer_name)


def _pair_key(pair: LoRAPair) -> tuple[int, str]:
    return (id(pair.layer), pair.adapter)


def _scale_coefficients(coefs: Tensor, scalings: list[float]) -> None:
    """Fold each layer's 1/s^2 into its (4, r, r) coefficients, in place, from Python floats
    (a tensor of scalings would cost a host-to-device copy per step)."""
    inv_s2 = [1.0 / (s * s) for s in scalings]
    if len(set(inv_s2)) == 1:  # the usual case: one scaling for every layer
        if inv_s2[0] != 1.0:
            coefs.mul_(inv_s2[0])
        return
    for c, factor in zip(coefs.unbind(0), inv_s2, strict=True):
        c.mul_(factor)


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
        tracker = PairTracker(model)
        pairs = tracker.pairs()[0]
        if not pairs:
            raise LoRAProConfigError(
                "no trainable LoRA layers found in the model: LoRA-Pro adjusts the gradients of PEFT LoRA "
                "factors. Wrap the model first, e.g. model = peft.get_peft_model(model, LoraConfig(...)), "
                "and make sure an adapter is active and trainable."
            )
        if params is None:
            # Every trainable parameter, and the frozen partner of a trainable LoRA factor (so
            # that unfreezing it later trains it: a frozen factor is skipped until then).
            partners = {id(f) for pair in pairs for f in (pair.A, pair.B)}
            params = [p for p in model.parameters() if p.requires_grad or id(p) in partners]
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        """Steps skipped because of non-finite gradients (``nonfinite="skip"``)."""
        self._tracker = tracker
        self._pairs = pairs
        self._checked: list[Tensor] = []  # r x r tensors of the current step, for the NaN check
        self._sharding = FactorSharding()  # FSDP2's DTensor factors, if any, handled there
        # The options this class defines (torch adds keys such as "differentiable" to
        # self.defaults on load, and those never appear in a saved group).
        self._option_keys = tuple(defaults)
        super().__init__(params, defaults)
        self._index_pairs()
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        # Layers (and adapters) the caller left out on purpose, and those this optimizer trains:
        # a pair that later appears outside its parameters is told apart by these.
        self._excluded_keys = {_pair_key(p) for p in pairs if id(p.A) not in owned and id(p.B) not in owned}
        self._trained_keys = {_pair_key(p) for p in self.pairs}
        self._refuse_attached(self.pairs)
        # An optimizer that is never stepped cannot raise in step(): under DeepSpeed the Trainer
        # discards an optimizer passed with optimizers= and builds its own, which would train
        # plain AdamW. So until the first step the model's forward checks too (a few attribute
        # reads); the hook holds the pairs, not the optimizer, so it works after it was dropped.
        self._forward_check = model.register_forward_pre_hook(_EngineCheck(pairs, type(self).__name__))

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
            if hasattr(self, "_trained_keys"):
                self._index_pairs()
                self._sync_pairs("in add_param_group")
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
            # A frozen factor left out of the parameters: a one-factor pair (see PairWork).
            if ga is None and not pair.A.requires_grad:
                ga = gb
            elif gb is None and not pair.B.requires_grad:
                gb = ga
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
    def _sync_pairs(self, when: str = "at optimizer.step()") -> None:
        """Follow the model's active LoRA pairs, and refuse to step on anything but LoRA-Pro.

        Runs before every step (a module walk and a set of ids). It follows factors a wrapper
        swapped in both the model and the optimizer (Accelerate's FSDP2 ``prepare``) and adapters
        that became active (``set_adapter``) or were added to the optimizer (``add_param_group``).
        It raises :class:`LoRAProConfigError`, before anything is modified, where LoRA-Pro would
        silently not run: factors the optimizer trained that are no longer its parameters
        (DeepSpeed ZeRO 1-3 and its bf16/fp16 sections replace them with flat partitions or
        master copies, which would get plain AdamW), an adapter that became active after the
        optimizer was built and whose factors it does not hold, and an attached model.
        """
        _refuse_engine_managed(self._pairs, type(self).__name__)
        fresh, _ = self._tracker.pairs()  # a module walk only when the cheap check sees a change
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        keep: list[LoRAPair] = []
        lost: list[LoRAPair] = []
        new: list[LoRAPair] = []
        for pair in fresh:
            key = _pair_key(pair)
            a, b = id(pair.A) in owned, id(pair.B) in owned
            if a != b and not (pair.B if a else pair.A).requires_grad:
                a = b = True  # the factor left out is frozen: a one-factor pair
            if a != b:
                raise LoRAProConfigError(
                    f"{pair.name} (adapter {pair.adapter!r}): only lora_{'A' if a else 'B'} is among the "
                    f"optimizer's parameters {when}; LoRA-Pro updates both factors of a layer together, with "
                    "one learning rate. Put both factors of every layer in the same parameter group."
                )
            if a:
                keep.append(pair)
            elif key in self._trained_keys:
                lost.append(pair)
            elif key not in self._excluded_keys:
                new.append(pair)
        if lost:
            shapes = sorted({tuple(p.shape) for g in self.param_groups for p in g["params"]})[:3]
            raise LoRAProConfigError(
                f"{len(lost)} LoRA layers (e.g. {lost[0].name}) are no longer among the optimizer's "
                f"parameters {when}: something replaced optimizer.param_groups after the lorapro optimizer "
                f"was built (parameter shapes now {shapes}...), and LoRA-Pro would silently not be applied. "
                "DeepSpeed ZeRO stages 1-3 and its bf16/fp16 sections do this: call lorapro.attach(model) "
                "before deepspeed.initialize and use DeepSpeed's own optimizer (or any torch optimizer) "
                "instead of a lorapro optimizer. Under FSDP2 build the lorapro optimizer after fully_shard."
            )
        if new:
            raise LoRAProConfigError(
                f"{new[0].name}: adapter {new[0].adapter!r} is active but its LoRA factors are not among "
                f"this optimizer's parameters ({len(new)} layers): it became active (set_adapter, "
                "add_adapter) after the optimizer was built, and would not be trained. Build the optimizer "
                "after choosing the adapter, add its factors with optimizer.add_param_group, or use "
                "lorapro.attach(model), which follows adapter changes."
            )
        self._refuse_attached(keep)
        if [(id(p.A), id(p.B)) for p in keep] != [(id(p.A), id(p.B)) for p in self._pairs]:
            self._pairs = keep
            self._index_pairs()
            self._trained_keys.update(_pair_key(p) for p in self.pairs)

    def _refuse_attached(self, pairs: list[LoRAPair]) -> None:
        for pair in pairs:
            if attached_handle(pair.A) is not None or attached_handle(pair.B) is not None:
                raise LoRAProConfigError(
                    f"{pair.name}: the model is attached with lorapro.attach, so backward already leaves "
                    f"LoRA-Pro's gradients and {type(self).__name__} would adjust them a second time. Use a "
                    "plain optimizer (e.g. torch.optim.AdamW) with attach, or call handle.remove() to use "
                    f"{type(self).__name__} (needed for full mode)."
                )

    def _collect(self) -> list[GroupWork]:
        self._sync_pairs()
        self._sharding.begin_step()
        works = []
        for group, pairs in zip(self.param_groups, self._group_pairs, strict=True):
            work = GroupWork(group)
            for pair in pairs:
                train_A, train_B = pair.A.requires_grad, pair.B.requires_grad
                if not (train_A or train_B):
                    continue  # frozen since the optimizer was built: never updated
                # A frozen factor's gradient (if one is left over) takes no part in the step.
                gA = pair.A.grad if train_A else None
                gB = pair.B.grad if train_B else None
                if gA is None and gB is None:
                    continue  # the layer took no part in this forward pass
                if (gA is not None and gA.is_sparse) or (gB is not None and gB.is_sparse):
                    raise LoRAProConfigError(
                        f"{pair.name}: sparse gradients are not supported; "
                        "use dense embeddings (sparse=False)"
                    )
                dtype = compute_dtype(pair.A.dtype)
                sharded = self._sharding.pair(pair)
                if sharded is None:
                    A = _in_dtype(pair.matrix_A(), dtype)
                    B = _in_dtype(pair.matrix_B(), dtype)
                    gA = torch.zeros_like(A) if gA is None else _in_dtype(pair.matrix_A(gA), dtype)
                    gB = torch.zeros_like(B) if gB is None else _in_dtype(pair.matrix_B(gB), dtype)
                else:  # this rank's shards, A by columns and B by rows
                    A = _in_dtype(sharded.local_A(pair.A), dtype)
                    B = _in_dtype(sharded.local_B(pair.B), dtype)
                    gA = torch.zeros_like(A) if gA is None else _in_dtype(sharded.local_A(gA), dtype)
                    gB = torch.zeros_like(B) if gB is None else _in_dtype(sharded.local_B(gB), dtype)
                work.pairs.append(
                    PairWork(
                        pair, pair.scaling, A, B, gA, gB, sharded=sharded, train_A=train_A, train_B=train_B
                    )
                )
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
        self._sharding.end_collect()
        return works

    @property
    def comm_numel(self) -> dict[str, int]:
        """Numbers this rank sent into collectives in the last step, by purpose. Empty unless the
        LoRA factors are FSDP2 shards (``gram_allreduce``: the r x r terms; ``reshard_A``: A under
        FSDP2's default placement; ``full_mode_gather`` / ``full_mode_allreduce``: full mode)."""
        return dict(self._sharding.comm_numel)

    def _solve(self, pair_works: list[PairWork], x_mode_of: Callable[[PairWork], str]) -> None:
        """Coefficients for every layer; the r x r tensors are kept for the NaN check."""
        self._checked += solve_pairs(pair_works, x_mode_of, self._sharding.reduce_terms)

    def _adjust(self, pair_works: list[PairWork], x_mode_of: Callable[[PairWork], str]) -> None:
        """Coefficients and every layer's adjusted gradients at once (full mode's need)."""
        self._checked += adjust_pairs(pair_works, x_mode_of, self._sharding.reduce_terms)

    def _prepare(self, works: list[GroupWork]) -> None:
        """Solve every layer's coefficients before anything is checked or updated (subclasses
        may choose X per group)."""
        group_of = {id(w): g.group for g in works for w in g.pairs}
        self._solve([w for g in works for w in g.pairs], lambda w: group_of[id(w)]["x_mode"])

    def _adjusted_updates(self, work: GroupWork) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """The group's LoRA factors with their adjusted gradients, chunk by chunk.

        Yields ``(params, grads)`` lists, each gradient laid out like its parameter. A chunk's
        gradients live in a buffer that the next chunk overwrites: update with them at once.
        """
        for chunk in adjusted_chunks(work.pairs):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for w in chunk:
                gA, gB = self._as_param_gradients(w)
                if w.train_A:
                    params.append(w.pair.A)
                    grads.append(gA)
                if w.train_B:
                    params.append(w.pair.B)
                    grads.append(gB)
            yield params, grads

    @staticmethod
    def _as_param_gradients(w: PairWork) -> tuple[Tensor, Tensor]:
        """The layer's adjusted gradients shaped (sharded: laid out) like its parameters."""
        gA, gB = w.adjusted_A, w.adjusted_B
        assert gA is not None and gB is not None
        if w.sharded is not None:
            return w.sharded.as_params(gA, gB)
        return w.pair.param_A(gA), w.pair.param_B(gB)

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
            tensors += local_tensors(work.grads)
        # The one sync per step (GradScaler pays the same). With sharded factors the r x r terms
        # are already summed over ranks, so a NaN in any rank's shard is in every rank's terms;
        # agree() makes the verdict on the other parameters' local shards the same on every rank.
        return self._sharding.agree(any_nonfinite(tensors))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step: adjust the LoRA gradients by Theorem 2.1, then update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()
        self._forward_check.remove()  # from now on every step checks (see _sync_pairs)
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
        resolve_scales(w for work in works for w in work.pairs)
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
