"""Find the LoRA (A, B) factor pairs of a model, by module.

Pairs are discovered from PEFT's LoRA layers (``peft.tuners.lora.LoraLayer``): for every
layer and every *active* adapter, ``lora_A[adapter]`` / ``lora_B[adapter]`` (Linear and Conv)
or ``lora_embedding_A[adapter]`` / ``lora_embedding_B[adapter]`` (Embedding). Nothing is
inferred from parameter order or names, so any architecture PEFT can wrap works.

A LoRA on MoE experts (PEFT's ``ParamWrapper`` on a 3-D expert parameter, through
``target_parameters``) holds E pairs in one (A, B): A's rows are grouped by expert and B's
columns interleaved by expert. :meth:`LoRAPair.matrix_A` / :meth:`~LoRAPair.matrix_B` then
return (E, r, n) and (E, m, r) views, one LoRA problem per expert, which every function of the
closed form solves batched.

The scaling is read from the layer each time it is asked for (``layer.scaling[adapter]``),
never cached: rsLoRA, ``rank_pattern`` / ``alpha_pattern`` and PEFT's run-time
``set_scale`` / ``scale_layer`` all change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ._storage import full_shape, is_zero3_partition
from .errors import LoRAProConfigError

__all__ = ["LoRAPair", "PairTracker", "adapter_pairs", "find_lora_pairs"]

PairKind = Literal["linear", "conv", "embedding", "parameter"]


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """One adapter's (A, B) factors on one layer, viewed as the paper's matrices.

    ``matrix_A`` is (r, n) and ``matrix_B`` is (m, r), with ``W = W0 + s B A`` in the layer's
    own orientation: for Linear W is (out, in); for Conv A is flattened to
    (r, in * prod(kernel)); for Embedding ``W`` is the transpose of the embedding table,
    (dim, num_embeddings).
    """

    name: str
    """Qualified name of the LoRA layer in the model."""
    adapter: str
    layer: nn.Module
    kind: PairKind
    """``"parameter"``: PEFT's ``ParamWrapper`` (``target_parameters``), whose forward uses the
    factors' weights directly instead of calling the ``lora_A`` / ``lora_B`` modules."""
    A: nn.Parameter
    B: nn.Parameter
    experts: int = 1
    """Number of MoE experts sharing the pair (see the module docstring); 1 for ordinary layers."""

    @property
    def scaling(self) -> float:
        """The layer's current scaling s for this adapter (read live, never cached)."""
        return float(self.layer.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return full_shape(self.A)[0] // self.experts

    def matrix_A(self, tensor: Tensor | None = None) -> Tensor:
        """(r, n) view of A (or of a tensor shaped like A, such as its gradient); (E, r, n) for
        MoE experts."""
        t = self.A if tensor is None else tensor
        if self.experts > 1:
            return t.reshape(self.experts, -1, t.shape[-1])
        return t if t.dim() == 2 else t.reshape(t.shape[0], -1)  # (a no-op call costs per step)

    def matrix_B(self, tensor: Tensor | None = None) -> Tensor:
        """(m, r) view of B (or of a tensor shaped like B); (E, m, r) for MoE experts (a strided
        view: B's columns are interleaved by expert)."""
        t = self.B if tensor is None else tensor
        if self.experts > 1:
            return t.reshape(t.shape[0], -1, self.experts).permute(2, 0, 1)
        return t if t.dim() == 2 else t.reshape(t.shape[0], t.shape[1])

    def param_A(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`matrix_A`: a tensor shaped like A (a view where possible)."""
        return matrix if matrix.shape == self.A.shape else matrix.reshape(self.A.shape)

    def param_B(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`matrix_B`: a tensor shaped like B (MoE experts: a copy that
        interleaves the experts' columns again)."""
        if self.experts > 1:
            return matrix.permute(1, 2, 0).reshape(self.B.shape)
        return matrix if matrix.shape == self.B.shape else matrix.reshape(self.B.shape)

    @property
    def base_weight(self) -> Tensor:
        """The frozen base weight W0 this pair adapts (full mode scales it for weight decay); for
        ``target_parameters``, the wrapped parameter (3-D for MoE experts)."""
        if self.kind == "parameter":
            return self.layer.get_param()
        return self.layer.get_base_layer().weight


def _lora_layer_class() -> type:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a hard dependency
        raise ImportError("lorapro needs PEFT: pip install peft") from exc
    return LoraLayer


def _variant_name(layer: nn.Module, adapter: str) -> str | None:
    """Name of a LoRA variant (DoRA, ...) on this adapter, or None for vanilla LoRA."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        return type(variant).__name__
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return "DoRA"
    return None


def _pair_of(name: str, layer: nn.Module, adapter: str) -> LoRAPair | None:
    experts = 1
    if adapter in getattr(layer, "lora_A", {}):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        kind: PairKind = "conv" if A.dim() > 2 else "linear"
        if hasattr(layer, "parameter_name") and hasattr(layer, "get_param"):  # PEFT's ParamWrapper
            kind, experts = "parameter", int(getattr(layer, "num_experts", 1))
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        kind = "embedding"
    else:
        return None
    return LoRAPair(name=name, adapter=adapter, layer=layer, kind=kind, A=A, B=B, experts=experts)


def _check_supported(pair: LoRAPair) -> None:
    """Raise for trainable adapters whose map from (A, B) to W is not W0 + s B A."""
    name, adapter, layer = pair.name, pair.adapter, pair.layer
    variant = _variant_name(layer, adapter)
    if variant is not None:
        raise LoRAProConfigError(
            f"{name} (adapter {adapter!r}) uses the LoRA variant {variant}. LoRA-Pro's closed "
            "form holds only for W = W0 + s B A; DoRA's magnitude vector changes that map, and "
            "the paper states LoRA-Pro does not apply to it. Use plain LoRA (use_dora=False) "
            "with lorapro, or train the DoRA model with torch.optim.AdamW."
        )
    groups = getattr(layer.lora_B[adapter], "groups", 1) if pair.kind == "conv" else 1
    if groups != 1:
        raise LoRAProConfigError(
            f"{name}: LoRA on a grouped convolution (groups={groups}) has a block-diagonal B, which "
            "the LoRA-Pro closed form does not model. Exclude this layer from target_modules (or "
            "freeze both of its factors)."
        )


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """All trainable LoRA factor pairs of the model's active adapters, in module order.

    A pair is trainable when at least one factor is: with one factor frozen, LoRA-Pro gives the
    other one Theorem 2.1's one-factor optimum (A frozen: LoRA-FA's ``grad_B (A A^T)^+ / s^2``).
    Pairs with both factors frozen are not trained and are left out. Raises
    :class:`LoRAProConfigError` for adapters LoRA-Pro cannot handle: DoRA and other LoRA
    variants (the paper's stated limitation) and grouped convolutions.
    """
    lora_layer = _lora_layer_class()
    pairs: list[LoRAPair] = []
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        for adapter in module.active_adapters:
            pair = _pair_of(name, module, adapter)
            if pair is None:
                continue
            if not (pair.A.requires_grad or pair.B.requires_grad):
                continue  # not trained: nothing to adjust
            _check_supported(pair)
            pairs.append(pair)
    return pairs


def adapter_pairs(model: nn.Module) -> list[LoRAPair]:
    """The (A, B) pairs of *every* adapter of every LoRA layer, active or not, trainable or not,
    with no support check: what :func:`lorapro.attach` hooks, so that an adapter switched on
    later is adjusted even by a forward pass that bypasses the attached model."""
    lora_layer = _lora_layer_class()
    pairs: list[LoRAPair] = []
    for name, module in model.named_modules():
        if isinstance(module, lora_layer):
            for adapter in (*getattr(module, "lora_A", {}), *getattr(module, "lora_embedding_A", {})):
                pair = _pair_of(name, module, adapter)
                if pair is not None:
                    pairs.append(pair)
    return pairs


def _signature(model: nn.Module) -> tuple[tuple, list[nn.Module]]:
    """What :func:`find_lora_pairs` and :func:`adapter_pairs` depend on, cheaply: each LoRA layer's
    adapters, which are active, and the identity, trainability and storage kind of their factors
    (no names, no checks); and the LoRA layers themselves."""
    lora_layer = _lora_layer_class()
    signature: list = []
    layers: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, lora_layer):
            layers.append(m)
            for adapter in (*getattr(m, "lora_A", {}), *getattr(m, "lora_embedding_A", {})):
                pair = _pair_of("", m, adapter)
                factors = () if pair is None else (pair.A, pair.B)
                signature += [(id(p), p.requires_grad, type(p), is_zero3_partition(p)) for p in factors]
            signature.append((id(m), tuple(m.active_adapters)))
    return tuple(signature), layers


class PairTracker:
    """:func:`find_lora_pairs` of a model, kept up to date at little cost per call.

    Walking every module costs about 0.5 ms per 500 modules, too much for every forward pass or
    optimizer step. So :meth:`pairs` walks the model the first time, and after that only when a
    cheap check of the LoRA layers already known changes: their active adapters and number of
    adapters, the model's PEFT adapter names, whether every known pair's factors are still the
    tensors their layer holds (a wrapper may swap parameters, as FSDP2 does), whether they are
    still trainable, and whether DeepSpeed has converted them in place (ZeRO-3 adds ``ds_id``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._pairs: list[LoRAPair] | None = None
        self._layers: list[nn.Module] = []
        self._signature: tuple | None = None
        self._quick: tuple | None = None
        # per pair, when found: did DeepSpeed ZeRO-3 own its A, and which factors were trainable?
        self._states: list[tuple[bool, bool, bool]] = []

    def pairs(self, *, walk: bool = False) -> tuple[list[LoRAPair], bool]:
        """The active trainable pairs, and whether they changed since the last call.
        ``walk=True`` walks the model whatever the cheap check says."""
        if walk or self._pairs is None or self._quick_signature() != self._quick:
            signature, self._layers = _signature(self.model)
            changed = signature != self._signature or self._pairs is None
            if changed:
                self._pairs = find_lora_pairs(self.model)
                self._states = [_state(pair) for pair in self._pairs]
                self._signature = signature
            self._quick = self._quick_signature()
            return self._pairs, changed
        return self._pairs, False

    def invalidate(self) -> None:
        """Walk the model at the next call (e.g. after the caller refused the pairs it got)."""
        self._pairs, self._states = None, []

    def _quick_signature(self) -> tuple:
        # Runs at every forward pass and optimizer step: the modules' own dictionaries are read
        # directly (``nn.Module.__getattr__`` costs microseconds per lookup, milliseconds per step
        # on a model with hundreds of LoRA layers).
        config = getattr(self.model, "peft_config", None)
        adapters = tuple(config) if isinstance(config, dict) else None
        layers = []
        for m in self._layers:
            modules = m._modules
            count = sum(len(modules[k]) for k in ("lora_A", "lora_embedding_A") if k in modules)
            active = m.active_adapter  # a str or a list (copied: PEFT may change it in place)
            layers.append((active if isinstance(active, str) else tuple(active), count))
        return adapters, self._factors_held(), tuple(layers)

    def _factors_held(self) -> bool:
        """Does every known pair's layer still hold its factors, as they were when found (ZeRO-3
        converts them in place, adding ``ds_id``; a factor may be frozen or unfrozen)?"""
        for pair, state in zip(self._pairs or (), self._states, strict=True):
            A, B = _held(pair)
            if A is not pair.A or B is not pair.B or _state(pair) != state:
                return False
        return True


def _held(pair: LoRAPair) -> tuple[Tensor | None, Tensor | None]:
    """The factors ``pair``'s layer holds now for its adapter (None where it holds none): read
    from the modules' dictionaries, as :meth:`PairTracker._quick_signature` needs."""
    modules, adapter = pair.layer._modules, pair.adapter
    if pair.kind == "embedding":
        return (
            modules["lora_embedding_A"]._parameters.get(adapter),
            modules["lora_embedding_B"]._parameters.get(adapter),
        )
    a, b = modules["lora_A"]._modules.get(adapter), modules["lora_B"]._modules.get(adapter)
    if a is None or b is None:
        return None, None  # the adapter was deleted
    return a._parameters.get("weight"), b._parameters.get("weight")


def _state(pair: LoRAPair) -> tuple[bool, bool, bool]:
    return is_zero3_partition(pair.A), pair.A.requires_grad, pair.B.requires_grad
