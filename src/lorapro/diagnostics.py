"""How far is each layer's equivalent gradient from the full gradient? (the paper's Figure 4)

A LoRA step moves the merged weight ``W = W0 + s B A`` along the *equivalent gradient*
``g~ = s (B grad_A + grad_B A)`` (Section 2.2), not along the full fine-tuning gradient
``g = dL/dW``. LoRA-Pro replaces LoRA's factor gradients by the ones whose equivalent
gradient is closest to ``g`` (Theorem 2.1). This module measures, for every LoRA layer at the
steps you choose:

- ``||g~ - g||_F``, ``||g~ - g||_F / ||g||_F`` and ``cos(g~, g)`` for LoRA's and LoRA-Pro's
  equivalent gradients, and ``||g||_F``;
- the singular values and numerical ranks of A and B;
- a consistency check: LoRA's own gradients must equal ``(s B^T g, s g A^T)`` (Eq. 5). A
  mismatch means the measurement is not what it claims (LoRA dropout, gradient hooks, ...).
  On a model under :func:`lorapro.attach` the factors' ``.grad`` holds LoRA-Pro's gradients:
  LoRA's are then taken as ``(s B^T g, s g A^T)`` and the check compares the attached
  gradients with LoRA-Pro's closed form of them.

How ``g`` is captured. ``W0`` enters the forward pass only through ``W`` (PEFT computes
``base_layer(x) + s B(A(dropout(x)))``, linear in the weight), so ``dL/dW0 = dL/dW``. On a
measured step the frozen base weights are switched to ``requires_grad=True`` before the
forward pass; a post-accumulate-grad hook moves each one's gradient into a private buffer and
sets ``.grad`` back to None, so the optimizer, ``zero_grad`` and gradient clipping (whose
global norm would otherwise include the base weights and change the clip factor) never see
it. Afterwards ``requires_grad`` is restored and the buffers freed. Unmeasured steps run
exactly as without the monitor. LoRA's own gradients are snapshotted by the same kind of
hook, i.e. before any clipping, so every quantity refers to the raw gradients of the batch.

Cost of a measured step: one extra weight-gradient matmul per LoRA layer in the backward
pass, and a full-size (m x n, float32) gradient buffer per measured layer held until
:meth:`GradientMonitor.after_backward`; use ``select`` to measure a subset of layers on large
models.

Limitations (each is detected, warned about, and documented in ``docs/diagnostics.md``):

- ``lora_dropout > 0``: the LoRA branch sees dropped-out inputs, so ``grad_A != s B^T g``; the
  record's ``lora_grad_mismatch`` shows by how much. Measure with dropout 0 for clean numbers.
- base weights shared with another module (tied input/output embeddings) collect gradient
  from both uses; such layers are skipped.
- merged or disabled adapters, quantised base weights and LoRA layer types whose base weight
  is not the ``W0`` of ``W0 + s B A`` (e.g. ``nn.MultiheadAttention``) are skipped.
- under DDP each rank measures its own local batch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import re
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .backward_hooks import attached_handle
from .closed_form import DEFAULT_RTOL_FACTOR, compute_dtype, equivalent_gradient, optimal_gradients
from .pairs import LoRAPair, find_lora_pairs

__all__ = [
    "KIND_ORDER",
    "GradientComparison",
    "GradientMonitor",
    "LayerRecord",
    "closed_form_rank",
    "compare_gradients",
    "layer_index",
    "layer_stack",
    "module_kind",
    "numerical_rank",
    "parse_steps",
    "read_jsonl",
    "singular_values",
    "summarize",
    "write_csv",
    "write_jsonl",
]

#: Above this relative mismatch between LoRA's gradients and ``(s B^T g, s g A^T)`` the
#: monitor warns: float32 rounding stays around 1e-6, dropout or hooks give 1e-2 and more.
MISMATCH_WARN = 1e-3


# --------------------------------------------------------------------------- the maths


class GradientComparison(NamedTuple):
    """LoRA's and LoRA-Pro's equivalent gradients of one layer, compared with the full one."""

    grad_norm: float  # ||g||_F
    lora_distance: float  # ||g~_lora - g||_F
    lora_rel_distance: float  # ||g~_lora - g||_F / ||g||_F
    lora_cosine: float  # cos(g~_lora, g)
    lora_norm: float  # ||g~_lora||_F
    pro_distance: float
    pro_rel_distance: float
    pro_cosine: float
    pro_norm: float
    lora_grad_mismatch: float  # ||(grad_A, grad_B) - (s B^T g, s g A^T)|| / ||(s B^T g, s g A^T)||


def _ratio(num: float, den: float) -> float:
    # 0/0 is "undefined", not 0: a layer whose gradient vanished has no direction to compare.
    return num / den if den > 0 else math.nan


def compare_gradients(
    g: Tensor,
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scaling: float,
    *,
    rtol: float | None = None,
) -> GradientComparison:
    """Distances and cosines between ``g`` and the equivalent gradients of LoRA and LoRA-Pro.

    All matrices in the paper's orientation: ``g`` (m, n), ``A`` (r, n), ``B`` (m, r), LoRA's
    own gradients ``grad_A`` (r, n) and ``grad_B`` (m, r). LoRA-Pro's factor gradients come
    from :func:`lorapro.optimal_gradients` applied to LoRA's gradients (exactly what the
    optimizer does), so when LoRA's gradients are consistent with ``g`` (``lora_grad_mismatch``
    ~ 0) LoRA-Pro's equivalent gradient is the orthogonal projection of ``g`` onto the
    matrices ``B X + Y A``, and its relative distance is ``sqrt(1 - cos^2) <= 1``.

    Computed in float32 at least (float64 stays float64); returns Python floats (NaN where a
    ratio is 0/0).
    """
    dtype = compute_dtype(torch.promote_types(g.dtype, A.dtype))
    g, A, B, grad_A, grad_B = (t.detach().to(dtype) for t in (g, A, B, grad_A, grad_B))
    s = float(scaling)
    pro_A, pro_B = optimal_gradients(A, B, grad_A, grad_B, s, rtol=rtol)
    g_norm = float(torch.linalg.matrix_norm(g))

    def stats(eq: Tensor) -> tuple[float, float, float, float]:
        dist = float(torch.linalg.matrix_norm(eq - g))
        norm = float(torch.linalg.matrix_norm(eq))
        cos = _ratio(float((eq * g).sum()), norm * g_norm)
        return dist, _ratio(dist, g_norm), cos, norm

    lora = stats(equivalent_gradient(A, B, grad_A, grad_B, s))
    pro = stats(equivalent_gradient(A, B, pro_A, pro_B, s))
    expect_A, expect_B = s * (B.mT @ g), s * (g @ A.mT)
    err = math.hypot(
        float(torch.linalg.matrix_norm(grad_A - expect_A)), float(torch.linalg.matrix_norm(grad_B - expect_B))
    )
    ref = math.hypot(float(torch.linalg.matrix_norm(expect_A)), float(torch.linalg.matrix_norm(expect_B)))
    mismatch = 0.0 if err == 0 else _ratio(err, ref)
    return GradientComparison(g_norm, *lora, *pro, mismatch)


def _compare_attached(
    g: Tensor, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: float, rtol: float | None
) -> GradientComparison:
    """:func:`compare_gradients` for a model under :func:`lorapro.attach`, whose ``.grad`` holds
    LoRA-Pro's gradients, not LoRA's. LoRA's own gradients are then taken from ``g`` (``s B^T g``,
    ``s g A^T``: exact without LoRA dropout), and ``lora_grad_mismatch`` compares the attached
    gradients with the closed form of those, so it checks what attach delivered."""
    dtype = compute_dtype(torch.promote_types(g.dtype, A.dtype))
    g, A, B, grad_A, grad_B = (t.detach().to(dtype) for t in (g, A, B, grad_A, grad_B))
    s = float(scaling)
    lora_A, lora_B = s * (B.mT @ g), s * (g @ A.mT)
    cmp = compare_gradients(g, A, B, lora_A, lora_B, s, rtol=rtol)
    pro_A, pro_B = optimal_gradients(A, B, lora_A, lora_B, s, rtol=rtol)
    err = math.hypot(
        float(torch.linalg.matrix_norm(grad_A - pro_A)), float(torch.linalg.matrix_norm(grad_B - pro_B))
    )
    ref = math.hypot(float(torch.linalg.matrix_norm(pro_A)), float(torch.linalg.matrix_norm(pro_B)))
    return cmp._replace(lora_grad_mismatch=0.0 if err == 0 else _ratio(err, ref))


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values (descending) in float64: the factors are skinny, so this is cheap."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def numerical_rank(sv: Tensor, shape: Sequence[int], dtype: torch.dtype, rtol: float | None = None) -> int:
    """Singular values above ``rtol * max``; default ``rtol = max(shape) * eps(dtype)``.

    The default is NumPy's ``matrix_rank`` rule with the epsilon of the *parameter's* dtype:
    a bf16 factor cannot resolve directions finer than bf16 rounding, even though the
    singular values themselves are computed in float64.
    """
    if rtol is None:
        rtol = max(shape) * torch.finfo(dtype).eps
    top = float(sv.max()) if sv.numel() else 0.0
    if top == 0.0:
        return 0
    return int((sv > rtol * top).sum())


def closed_form_rank(sv: Tensor, dtype: torch.dtype, rtol: float | None = None) -> int:
    """How many directions of a factor LoRA-Pro's closed form inverts (the rest it treats as 0).

    :func:`lorapro.closed_form.gram_eigen` keeps a Gram eigenvalue ``sigma^2`` above
    ``rtol * sigma_max^2`` with ``rtol = 10 r eps`` of the compute dtype (float32 for float32
    and bf16 factors): in float32 and r = 8 that is ``sigma / sigma_max > 3.1e-3``, much
    stricter than :func:`numerical_rank`. A factor can be "full rank" and still have a
    direction the closed form drops.
    """
    r = sv.numel()
    compute = compute_dtype(dtype)
    finfo = torch.finfo(compute)
    if rtol is None:
        rtol = DEFAULT_RTOL_FACTOR * r * finfo.eps
    eig = sv.to(compute).square()
    if r == 0 or float(eig.max()) == 0.0:
        return 0
    threshold = max(rtol * float(eig.max()), finfo.tiny)
    return int((eig > threshold).sum())


# --------------------------------------------------------------------------- names


# Ordered: "attention.output.dense" (BERT's o) must be tried before "output.dense" (BERT's
# down), and GPT-2's "attn.c_proj" (o) before "mlp.c_proj" (down).
_KIND_RULES: tuple[tuple[str, str], ...] = (
    (r"(q_proj|query|q|wq|to_q)", "q"),
    (r"(k_proj|key|k|wk|to_k)", "k"),
    (r"(v_proj|value|v|wv|to_v)", "v"),
    (r"(qkv_proj|c_attn|query_key_value|Wqkv|qkv|in_proj)", "qkv"),
    (
        r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|self_attn\.dense|attention\.dense|o|to_out\.0)",
        "o",
    ),
    (r"(gate_proj|w1|wi_0)", "gate"),
    (r"(up_proj|w3|wi_1|wi|fc1|c_fc|intermediate\.dense|dense_h_to_4h|gate_up_proj)", "up"),
    (r"(down_proj|w2|wo|fc2|mlp\.c_proj|output\.dense|dense_4h_to_h)", "down"),
)
_KIND_PATTERNS = tuple((re.compile(rf"(?:^|\.){pattern}$"), kind) for pattern, kind in _KIND_RULES)
#: Row order of the figures: the paper's (Q, K, V, O, Up, Down, Gate), fused kinds next to theirs.
KIND_ORDER: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "up", "down", "gate")
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")


def module_kind(name: str) -> str:
    """The role of a LoRA layer from its module name: q, k, v, qkv, o, up, down, gate.

    Knows the names of Llama/Mistral/Qwen, BERT/RoBERTa/ViT, GPT-2, T5, CLIP, Falcon and
    diffusers attention; anything else gets its last name component (``"classifier"``, ...).
    """
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    """The block index in a module name (the first purely numeric component), or None."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_stack(name: str) -> str:
    """The part of the name before the block index (``"bert.encoder.layer"``), PEFT prefix removed.

    Lets the figures tell apart stacks that share block indices (T5's encoder and decoder).
    """
    stripped = _PEFT_PREFIX.sub("", name)
    match = _INDEX.search(stripped)
    return stripped[: match.start()] if match else ""


# --------------------------------------------------------------------------- records


@dataclass
class LayerRecord:
    """One LoRA layer (one adapter) at one measured step. Flat, so it maps to a CSV row."""

    step: int
    name: str  # qualified module name
    adapter: str
    pair_kind: str  # "linear" | "conv" | "embedding"
    module_kind: str  # q, k, v, o, up, down, gate, ... (see module_kind)
    layer_index: int | None
    stack: str
    run: str  # free label, e.g. the training method
    m: int
    n: int
    r: int
    scaling: float
    lora_dropout: float
    grad_norm: float
    lora_distance: float
    lora_rel_distance: float
    lora_cosine: float
    lora_norm: float
    pro_distance: float
    pro_rel_distance: float
    pro_cosine: float
    pro_norm: float
    lora_grad_mismatch: float
    rank_A: int
    rank_B: int
    sv_A: list[float] = field(default_factory=list)  # singular values, descending
    sv_B: list[float] = field(default_factory=list)
    closed_form_rank_A: int | None = None  # directions LoRA-Pro's pseudo-inverse keeps
    closed_form_rank_B: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        # null is NaN for the float metrics; integer fields keep None ("not recorded").
        keep_none = ("layer_index", "closed_form_rank_A", "closed_form_rank_B")
        values = {k: (math.nan if v is None and k not in keep_none else v) for k, v in data.items()}
        return cls(**{k: v for k, v in values.items() if k in names})


_LIST_FIELDS = ("sv_A", "sv_B")


def _json_safe(value: Any) -> Any:
    # Strict JSON has no NaN; null round-trips through read_jsonl back to NaN.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _as_dict(record: LayerRecord | Mapping[str, Any]) -> dict[str, Any]:
    return record.to_dict() if isinstance(record, LayerRecord) else dict(record)


def write_jsonl(
    records: Iterable[LayerRecord | Mapping[str, Any]], path: str | Path, *, append: bool = False
) -> Path:
    """One JSON object per line (NaN written as null). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for rec in records:
            data = {k: _json_safe(v) for k, v in _as_dict(rec).items()}
            fh.write(json.dumps(data, allow_nan=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[LayerRecord]:
    """Records written by :func:`write_jsonl` or the monitor (null read back as NaN)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(LayerRecord.from_dict(json.loads(line)))
    return out


def write_csv(records: Iterable[LayerRecord | Mapping[str, Any]], path: str | Path) -> Path:
    """A flat CSV, one row per layer and step; singular values space-separated in one cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in dataclasses.fields(LayerRecord)]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            row = _as_dict(rec)
            for key in _LIST_FIELDS:
                row[key] = " ".join(f"{v:.6g}" for v in row.get(key) or [])
            writer.writerow(row)
    return path


def summarize(records: Iterable[LayerRecord | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (run, step): medians over layers of the distances and cosines, the lowest ranks,
    the fraction of layers where LoRA-Pro is closer to g than LoRA, the worst mismatch."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rec in records:
        d = _as_dict(rec)
        groups.setdefault((d["run"], d["step"]), []).append(d)

    def median(rows: list[dict[str, Any]], key: str) -> float:
        values = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
        return statistics.median(values) if values else math.nan

    out = []
    for (run, step), rows in sorted(groups.items()):
        comparable = [
            r for r in rows if math.isfinite(r["lora_rel_distance"]) and math.isfinite(r["pro_rel_distance"])
        ]
        closer = sum(r["pro_rel_distance"] <= r["lora_rel_distance"] for r in comparable)
        out.append(
            {
                "run": run,
                "step": step,
                "layers": len(rows),
                "lora_rel_distance": median(rows, "lora_rel_distance"),
                "pro_rel_distance": median(rows, "pro_rel_distance"),
                "lora_cosine": median(rows, "lora_cosine"),
                "pro_cosine": median(rows, "pro_cosine"),
                "pro_closer_fraction": closer / len(comparable) if comparable else math.nan,
                "min_rank_A": min(r["rank_A"] for r in rows),
                "min_rank_B": min(r["rank_B"] for r in rows),
                "min_closed_form_rank_B": min(
                    (r["closed_form_rank_B"] for r in rows if r.get("closed_form_rank_B") is not None),
                    default=None,
                ),
                "max_grad_mismatch": max((r["lora_grad_mismatch"] for r in rows), default=math.nan),
            }
        )
    return out


# --------------------------------------------------------------------------- steps


StepSpec = Iterable[int] | Callable[[int], bool] | str | None


def parse_steps(text: str) -> list[int]:
    """``"0,10,20"``, ``"0:300:25"`` (Python range: stop excluded) or a mix ``"0,1,2,5:100:5"``."""
    steps: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            bounds = part.split(":")
            if len(bounds) not in (2, 3) or not all(b.strip() for b in bounds):
                raise ValueError(f"bad step range {part!r}: use START:STOP or START:STOP:STEP")
            start, stop, *rest = (int(b) for b in bounds)
            stride = rest[0] if rest else 1
            if stride <= 0:
                raise ValueError(f"bad step range {part!r}: the stride must be positive")
            steps.update(range(start, stop, stride))
        else:
            steps.add(int(part))
    if any(s < 0 for s in steps):
        raise ValueError(f"steps must be >= 0, got {text!r}")
    if not steps:
        raise ValueError(f"no steps in {text!r}")
    return sorted(steps)


def _step_predicate(steps: StepSpec) -> Callable[[int], bool]:
    if steps is None:
        return lambda step: True
    if callable(steps):
        return steps
    if isinstance(steps, str):
        steps = parse_steps(steps)
    chosen = frozenset(int(s) for s in steps)
    return chosen.__contains__


# --------------------------------------------------------------------------- capture


def _dropout_p(pair: LoRAPair) -> float:
    try:
        module = pair.layer.lora_dropout[pair.adapter]  # a ModuleDict: it has no .get
    except (AttributeError, KeyError):
        return 0.0
    if isinstance(module, nn.Dropout) and module.training:
        return float(module.p)
    return 0.0


def _to_paper(pair: LoRAPair, t: Tensor) -> Tensor:
    """A tensor shaped like the base weight, as the paper's (m, n) matrix of ``W0 + s B A``."""
    if pair.kind == "embedding":
        return t.mT  # the table is (num_embeddings, dim); PEFT's delta is (B A)^T
    if pair.kind == "conv":
        return t.reshape(t.shape[0], -1)  # (out, in * prod(kernel)), matching A's flattening
    if getattr(pair.layer, "fan_in_fan_out", False):
        return t.mT  # GPT-2 Conv1D stores (in, out); PEFT adds (B A)^T
    return t


def _skip_reason(pair: LoRAPair, shared: set[int]) -> str | None:
    layer = pair.layer
    if getattr(layer, "merged", False):
        return "the adapter is merged into the base weight"
    if getattr(layer, "disable_adapters", False):
        return "adapters are disabled"
    try:
        weight = pair.base_weight
    except (AttributeError, TypeError):
        return "its base layer has no .weight"
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        return "its base weight is not a floating-point tensor (quantised?)"
    if id(weight) in shared:
        return "its base weight is shared with another module (tied weights), so its gradient mixes both uses"
    expected = (pair.matrix_B().shape[0], pair.matrix_A().shape[1])
    if tuple(_to_paper(pair, weight).shape) != expected:
        return f"its base weight {tuple(weight.shape)} is not the W0 of W0 + s B A (expected {expected})"
    return None


@dataclass(eq=False)
class _Capture:
    """Hooks and buffers of one measured step."""

    pairs: list[LoRAPair]
    weights: dict[int, Tensor]  # id -> base weight
    restore: dict[int, bool]  # id -> original requires_grad
    base_grads: dict[int, Tensor] = field(default_factory=dict)
    factor_grads: dict[int, Tensor] = field(default_factory=dict)  # id(A or B) -> snapshot
    handles: list[Any] = field(default_factory=list)


class GradientMonitor:
    """Measures equivalent-gradient alignment on chosen steps of any training loop.

    Plain loop (the forward pass must be inside, ``optimizer.step()`` after)::

        monitor = GradientMonitor(model, steps="0:1000:50", jsonl="diag/records.jsonl", run="lora")
        for step, batch in enumerate(loader):
            with monitor.measure(step):
                loss = model(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        write_csv(monitor.records, "diag/records.csv")

    Or ``monitor.before_forward(step)`` before the (first micro-batch's) forward pass and
    ``monitor.after_backward()`` after the last backward pass and before ``optimizer.step()``.
    With gradient accumulation ``before_forward`` may be called on every micro-batch of the
    same step. The Hugging Face integration is
    :class:`lorapro.diagnostics_callback.GradientDiagnosticsCallback`.

    Args:
        model: a model with PEFT LoRA layers (found with :func:`lorapro.find_lora_pairs`).
        steps: which steps to measure: integers, a string for :func:`parse_steps`, a
            predicate ``step -> bool``, or None for every step.
        select: measure only layers whose name matches this regular expression (``re.search``)
            or predicate; None measures every LoRA layer.
        run: a label stored in every record (e.g. the training method).
        jsonl: if given, each step's records are appended to this file as they are measured.
        keep_gradients: keep the last measured step's full gradients (paper orientation, by
            layer name) in :attr:`gradients`, for your own analysis or for tests.
        rank_rtol: relative tolerance of :func:`numerical_rank` (None: ``max(m, n) * eps``).
        pinv_rtol: eigenvalue cut-off passed to :func:`lorapro.optimal_gradients`.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: StepSpec = None,
        *,
        select: str | Callable[[str], bool] | None = None,
        run: str = "",
        jsonl: str | Path | None = None,
        keep_gradients: bool = False,
        rank_rtol: float | None = None,
        pinv_rtol: float | None = None,
    ) -> None:
        self.model = model
        self.should_measure = _step_predicate(steps)
        if isinstance(select, str):
            pattern = re.compile(select)
            self._select: Callable[[str], bool] = lambda name: pattern.search(name) is not None
        else:
            self._select = select if select is not None else (lambda name: True)
        self.run = run
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.keep_gradients = keep_gradients
        self.rank_rtol = rank_rtol
        self.pinv_rtol = pinv_rtol
        self.records: list[LayerRecord] = []
        """Every record measured so far, in order."""
        self.gradients: dict[str, Tensor] = {}
        """Full gradients of the last measured step (only with ``keep_gradients=True``)."""
        self._capture: _Capture | None = None
        self._step: int | None = None
        self._warned: set[str] = set()

    # -- public protocol ----------------------------------------------------------------
    @property
    def active_step(self) -> int | None:
        """The step being measured (between before_forward and after_backward), else None."""
        return self._step

    def before_forward(self, step: int) -> bool:
        """Arm the capture if ``step`` is to be measured; returns whether it is."""
        if self._step is not None:
            if self._step == step:
                return True  # another micro-batch of the same step
            raise RuntimeError(
                f"GradientMonitor: step {self._step} was armed but never finished; call "
                f"after_backward() (or abort()) before starting step {step}"
            )
        if not self.should_measure(step):
            return False
        pairs = self._pairs()
        if not pairs:
            return False
        self._capture = self._arm(pairs)
        self._step = step
        return True

    def after_backward(self) -> list[LayerRecord]:
        """Compute the records of the armed step and restore the model; [] if none is armed.

        Call it after the backward pass and before ``optimizer.step()``: the closed form
        needs the A and B the gradients were computed at.
        """
        if self._step is None or self._capture is None:
            return []
        step, capture = self._step, self._capture
        try:
            with torch.no_grad():
                records = self._measure(step, capture)
        finally:
            self._disarm()
        self.records.extend(records)
        if self.jsonl is not None and records:
            write_jsonl(records, self.jsonl, append=True)
        return records

    def abort(self) -> None:
        """Drop the armed step (e.g. the batch raised), restoring the model."""
        if self._capture is not None:
            self._disarm()

    close = abort

    @contextlib.contextmanager
    def measure(self, step: int) -> Iterator[bool]:
        """``before_forward(step)`` on entry, ``after_backward()`` on normal exit, ``abort()`` on error."""
        armed = self.before_forward(step)
        try:
            yield armed
        except BaseException:
            self.abort()
            raise
        if armed:
            self.after_backward()

    # -- internals ----------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _pairs(self) -> list[LoRAPair]:
        # Rediscovered on every measured step (a walk over the modules, cheap): adapters can
        # be added, switched or merged between steps.
        counts: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        shared = {k for k, c in counts.items() if c > 1}
        chosen = []
        for pair in find_lora_pairs(self.model):
            if not self._select(pair.name):
                continue
            reason = _skip_reason(pair, shared)
            if reason is not None:
                self._warn_once(f"skip:{pair.name}", f"lorapro diagnostics: skipping {pair.name}: {reason}")
                continue
            p = _dropout_p(pair)
            if p > 0:
                self._warn_once(
                    "dropout",
                    f"lorapro diagnostics: {pair.name} has lora_dropout={p}; the LoRA branch then sees "
                    "dropped-out inputs, so LoRA's gradients are not s B^T g and s g A^T of the captured "
                    "full gradient (see lora_grad_mismatch). Measure with lora_dropout=0 for exact numbers.",
                )
            chosen.append(pair)
        return chosen

    def _arm(self, pairs: list[LoRAPair]) -> _Capture:
        weights = {id(p.base_weight): p.base_weight for p in pairs}
        capture = _Capture(pairs, weights, {k: w.requires_grad for k, w in weights.items()})

        def take_base(param: Tensor) -> None:
            key, grad = id(param), param.grad
            if grad is None:
                return
            if capture.restore[key]:
                # The user trains this weight too: its .grad is theirs, only copy it.
                capture.base_grads[key] = grad.detach().clone()
                return
            previous = capture.base_grads.get(key)
            capture.base_grads[key] = grad.detach() if previous is None else previous + grad.detach()
            param.grad = None  # invisible to the optimizer, zero_grad and clip_grad_norm_

        def snapshot(param: Tensor) -> None:
            # Runs after every accumulation into .grad, so the last call holds the total of
            # all micro-batches, taken before any clipping rescales .grad in place.
            if param.grad is not None:
                capture.factor_grads[id(param)] = param.grad.detach().clone()

        try:
            for w in weights.values():
                w.requires_grad_(True)
                capture.handles.append(w.register_post_accumulate_grad_hook(take_base))
            for pair in pairs:
                for factor in (pair.A, pair.B):
                    capture.handles.append(factor.register_post_accumulate_grad_hook(snapshot))
        except BaseException:
            self._capture = capture
            self._disarm()
            raise
        return capture

    def _disarm(self) -> None:
        capture = self._capture
        self._capture, self._step = None, None
        if capture is None:
            return
        for handle in capture.handles:
            handle.remove()
        for key, w in capture.weights.items():
            w.requires_grad_(capture.restore[key])
            if not capture.restore[key]:
                w.grad = None
        capture.base_grads.clear()
        capture.factor_grads.clear()

    def _measure(self, step: int, capture: _Capture) -> list[LayerRecord]:
        records = []
        self.gradients = {}
        for pair in capture.pairs:
            raw = capture.base_grads.get(id(pair.base_weight))
            grad_A = capture.factor_grads.get(id(pair.A))
            grad_B = capture.factor_grads.get(id(pair.B))
            if raw is None or (grad_A is None and grad_B is None):
                continue  # the layer took no part in this step's forward pass
            A, B = pair.matrix_A().detach(), pair.matrix_B().detach()
            dtype = compute_dtype(A.dtype)
            g = _to_paper(pair, raw.to_dense() if raw.is_sparse else raw).to(dtype)
            gA = torch.zeros_like(A) if grad_A is None else pair.matrix_A(grad_A)
            gB = torch.zeros_like(B) if grad_B is None else pair.matrix_B(grad_B)
            s = pair.scaling
            if attached_handle(pair.A) is not None:
                cmp = _compare_attached(g, A, B, gA, gB, s, self.pinv_rtol)
            else:
                cmp = compare_gradients(g, A, B, gA, gB, s, rtol=self.pinv_rtol)
            if cmp.lora_grad_mismatch > MISMATCH_WARN:
                self._warn_once(
                    "mismatch",
                    f"lorapro diagnostics: at step {step}, {pair.name}: LoRA's gradients differ from "
                    f"s B^T g, s g A^T by {cmp.lora_grad_mismatch:.2e} (relative). Causes: lora_dropout > 0, "
                    "gradient hooks that modify LoRA gradients, or a base weight used outside its layer.",
                )
            sv_A, sv_B = singular_values(A), singular_values(B)
            m, n = g.shape
            records.append(
                LayerRecord(
                    step=step,
                    name=pair.name,
                    adapter=pair.adapter,
                    pair_kind=pair.kind,
                    module_kind=module_kind(pair.name),
                    layer_index=layer_index(pair.name),
                    stack=layer_stack(pair.name),
                    run=self.run,
                    m=m,
                    n=n,
                    r=pair.rank,
                    scaling=s,
                    lora_dropout=_dropout_p(pair),
                    **cmp._asdict(),
                    rank_A=numerical_rank(sv_A, A.shape, A.dtype, self.rank_rtol),
                    rank_B=numerical_rank(sv_B, B.shape, B.dtype, self.rank_rtol),
                    sv_A=sv_A.tolist(),
                    sv_B=sv_B.tolist(),
                    closed_form_rank_A=closed_form_rank(sv_A, A.dtype, self.pinv_rtol),
                    closed_form_rank_B=closed_form_rank(sv_B, B.dtype, self.pinv_rtol),
                )
            )
            if self.keep_gradients:
                self.gradients[pair.name] = g.clone()  # one base weight per layer: same g for every adapter
        return records
