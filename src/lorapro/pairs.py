"""Find the LoRA (A, B) factor pairs of a model, by module.

Pairs are discovered from PEFT's LoRA layers (``peft.tuners.lora.LoraLayer``): for every
layer and every *active* adapter, ``lora_A[adapter]`` / ``lora_B[adapter]`` (Linear and Conv)
or ``lora_embedding_A[adapter]`` / ``lora_embedding_B[adapter]`` (Embedding). Nothing is
inferred from parameter order or names, so any architecture PEFT can wrap works.

The scaling is read from the layer each time it is asked for (``layer.scaling[adapter]``),
never cached: rsLoRA, ``rank_pattern`` / ``alpha_pattern`` and PEFT's run-time
``set_scale`` / ``scale_layer`` all change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from .errors import LoRAProConfigError

__all__ = ["LoRAPair", "PairTracker", "find_lora_pairs"]

PairKind = Literal["linear", "conv", "embedding"]


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
    A: nn.Parameter
    B: nn.Parameter

    @property
    def scaling(self) -> float:
        """The layer's current scaling s for this adapter (read live, never cached)."""
        return float(self.layer.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def matrix_A(self, tensor: Tensor | None = None) -> Tensor:
        """(r, n) view of A (or of a tensor shaped like A, such as its gradient)."""
        t = self.A if tensor is None else tensor
        return t if t.dim() == 2 else t.reshape(t.shape[0], -1)  # (a no-op call costs per step)

    def matrix_B(self, tensor: Tensor | None = None) -> Tensor:
        """(m, r) view of B (or of a tensor shaped like B)."""
        t = self.B if tensor is None else tensor
        return t if t.dim() == 2 else t.reshape(t.shape[0], t.shape[1])

    @property
    def base_weight(self) -> Tensor:
        """The frozen base weight W0 this pair adapts (full mode scales it for weight decay)."""
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
    if adapter in getattr(layer, "lora_A", {}):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        kind: PairKind = "conv" if A.dim() > 2 else "linear"
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        kind = "embedding"
    else:
        return None
    return LoRAPair(name=name, adapter=adapter, layer=layer, kind=kind, A=A, B=B)


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
    trainable = (pair.A.requires_grad, pair.B.requires_grad)
    if trainable != (True, True):
        prefix = "lora_embedding_" if pair.kind == "embedding" else "lora_"
        frozen = prefix + ("A" if not trainable[0] else "B")
        raise LoRAProConfigError(
            f"{name} (adapter {adapter!r}): {frozen} is frozen but its partner is trainable. "
            "LoRA-Pro adjusts A and B together; unfreeze both factors (requires_grad_(True)), or "
            "use a plain optimizer for a one-factor method such as LoRA-FA."
        )


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """All trainable LoRA factor pairs of the model's active adapters, in module order.

    Raises :class:`LoRAProConfigError` for adapters LoRA-Pro cannot handle: DoRA and other
    LoRA variants (the paper's stated limitation), grouped convolutions, and pairs with one
    factor frozen. Pairs with both factors frozen are not trained and are left out.
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


def _signature(model: nn.Module) -> tuple[tuple, list[nn.Module]]:
    """What :func:`find_lora_pairs` depends on, cheaply: each LoRA layer's active adapters and the
    identity, trainability and storage kind of their factors (no names, no checks); and the LoRA
    layers themselves."""
    lora_layer = _lora_layer_class()
    signature: list = []
    layers: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, lora_layer):
            layers.append(m)
            for adapter in m.active_adapters:
                pair = _pair_of("", m, adapter)
                factors = () if pair is None else (pair.A, pair.B)
                signature += [(id(p), p.requires_grad, type(p), hasattr(p, "ds_id")) for p in factors]
            signature.append((id(m), tuple(m.active_adapters)))
    return tuple(signature), layers


class PairTracker:
    """:func:`find_lora_pairs` of a model, kept up to date at little cost per call.

    Walking every module costs about 0.5 ms per 500 modules, too much for every forward pass or
    optimizer step. So :meth:`pairs` walks the model the first time, and after that only when a
    cheap check of the LoRA layers already known changes: their active adapters and number of
    adapters, the model's PEFT adapter names, whether every known pair's factors are still the
    tensors their layer holds (a wrapper may swap parameters, as FSDP2 does), and whether
    DeepSpeed has converted them in place (ZeRO-3 adds ``ds_id``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._pairs: list[LoRAPair] | None = None
        self._layers: list[nn.Module] = []
        self._signature: tuple | None = None
        self._quick: tuple | None = None
        self._converted: list[bool] = []  # per pair: did DeepSpeed ZeRO-3 own its A when found?

    def pairs(self, *, walk: bool = False) -> tuple[list[LoRAPair], bool]:
        """The active trainable pairs, and whether they changed since the last call.
        ``walk=True`` walks the model whatever the cheap check says."""
        if walk or self._pairs is None or self._quick_signature() != self._quick:
            signature, self._layers = _signature(self.model)
            changed = signature != self._signature or self._pairs is None
            if changed:
                self._pairs = find_lora_pairs(self.model)
                self._converted = [hasattr(pair.A, "ds_id") for pair in self._pairs]
                self._signature = signature
            self._quick = self._quick_signature()
            return self._pairs, changed
        return self._pairs, False

    def invalidate(self) -> None:
        """Walk the model at the next call (e.g. after the caller refused the pairs it got)."""
        self._pairs, self._converted = None, []

    def _quick_signature(self) -> tuple:
        config = getattr(self.model, "peft_config", None)
        adapters = tuple(config) if isinstance(config, dict) else None
        return adapters, self._factors_held(), tuple(
            (*m.active_adapters, len(m.lora_A) + len(m.lora_embedding_A)) for m in self._layers
        )

    def _factors_held(self) -> bool:
        """Does every known pair's layer still hold its factors, as they were when found (ZeRO-3
        converts them in place, adding ``ds_id``)?"""
        for pair, converted in zip(self._pairs or (), self._converted, strict=True):
            layer, adapter = pair.layer, pair.adapter
            if pair.kind == "embedding":
                held = layer.lora_embedding_A.get(adapter), layer.lora_embedding_B.get(adapter)
            elif adapter in layer.lora_A and adapter in layer.lora_B:
                held = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            else:
                return False  # the adapter was deleted
            if held[0] is not pair.A or held[1] is not pair.B or hasattr(pair.A, "ds_id") != converted:
                return False
        return True
