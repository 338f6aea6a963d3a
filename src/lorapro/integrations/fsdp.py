"""LoRA-Pro on FSDP2 (``torch.distributed.fsdp.fully_shard``) without gathering the factors.

Under FSDP2 every parameter is a ``DTensor`` holding one shard, and gradients arrive already
reduce-scattered (averaged over ranks). The closed form needs the full factors only through
four r x r products, and each of them is a sum over the shards of a well-chosen sharding:

- B (m, r) sharded by rows (``Shard(0)``, FSDP2's default): ``B^T B = sum_k B_k^T B_k`` and
  ``B^T grad_B = sum_k B_k^T grad_B_k``;
- A (r, n) sharded by columns (``Shard(1)``): ``A A^T = sum_k A_k A_k^T`` and
  ``grad_A A^T = sum_k grad_A_k A_k^T``.

So each rank computes its partial (4, k, r, r) terms, one ``all_reduce`` of ``4 k r^2`` numbers
per bucket of equal-rank layers makes them global, every rank solves the same r x r problems,
and the adjusted gradients are formed shard by shard (``grad_A_k`` only needs ``A_k``,
``grad_B_k`` only ``B_k``). This uses the core optimizer's ``_reduce_gram_terms`` hook.

FSDP2 shards every parameter by rows by default, which for A means by rank r: build the shards
with :func:`lora_shard_placement_fn` (A by columns) and the step communicates nothing but r x r
terms. With the default placement the optimizer re-shards A and its gradient by columns each
step (an all-to-all of A-sized tensors per layer) and says so once in the log.

Full mode keeps its m x n moments sharded by rows like B (``m/world`` rows per rank); its step
additionally gathers A and the adjusted grad_A (r x n each) and all-reduces ``B^T D`` (r x n)
per layer: O(r n) numbers, never an m x n matrix.

Checkpoints: ``optimizer.state_dict()`` holds DTensor moments; save and load them per rank
(``torch.save``/``torch.load`` of each rank's dict, or ``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .._base import GroupWork, PairWork, adjusted_gradients
from ..adamw import LoRAProAdamW
from ..closed_form import compute_dtype
from ..errors import LoRAProConfigError
from ..functional import adam_direction, any_nonfinite
from ..pairs import LoRAPair, find_lora_pairs
from ..sgd import LoRAProSGD

__all__ = [
    "FSDPLoRAProAdamW",
    "FSDPLoRAProSGD",
    "full_state",
    "lora_shard_placement_fn",
]

logger = logging.getLogger(__name__)


def lora_shard_placement_fn(model: nn.Module) -> Callable[[nn.Parameter], Shard | None]:
    """``shard_placement_fn`` for ``fully_shard``: LoRA A factors by columns, the rest default.

    Usage: ``place = lora_shard_placement_fn(model)``, then ``fully_shard(block,
    shard_placement_fn=place)`` for every block and the root. Call it before ``fully_shard``
    (it recognises the parameters by identity).
    """
    a_ids = {id(pair.A) for pair in find_lora_pairs(model)}

    def place(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in a_ids else None

    return place


def full_state(model: nn.Module, trainable_only: bool = True) -> dict[str, Tensor]:
    """Every (trainable) parameter as a full tensor on every rank: for tests and small exports."""
    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        value = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = value.detach().clone()
    return out


# -- layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a factor's shard lives, and the placement the closed form wants it in."""

    param: DTensor
    canonical: tuple  # placements with the shard on the dimension the Gram sums need

    @property
    def mesh(self):
        return self.param.device_mesh

    @property
    def resharded(self) -> bool:
        return tuple(self.param.placements) != self.canonical


def _shard_mesh_dim(t: DTensor, what: str) -> int:
    dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or any(not isinstance(p, Shard | Replicate) for p in t.placements):
        raise LoRAProConfigError(
            f"{what} has placements {tuple(t.placements)}: lorapro's FSDP optimizer supports LoRA factors "
            "sharded over exactly one mesh dimension (FSDP2, or HSDP's (Replicate, Shard)); keep the LoRA "
            "layers out of tensor parallelism"
        )
    return dims[0]


def _canonical(t: DTensor, dim: int) -> tuple:
    return tuple(Shard(dim) if isinstance(p, Shard) else p for p in t.placements)


def _to_canonical(t: DTensor, layout: _Layout) -> Tensor:
    """The local shard of ``t`` (the parameter or its gradient) in the canonical placement."""
    if tuple(t.placements) != layout.canonical:
        t = t.redistribute(layout.mesh, layout.canonical)
    return t.to_local()


def _from_canonical(local: Tensor, layout: _Layout, *, to_param: bool = True) -> DTensor:
    """A canonical local shard (any view of it) back into a DTensor: laid out like the parameter
    (``to_param=True``) or left in the canonical placement."""
    param = layout.param
    local_shape, _ = compute_local_shape_and_global_offset(param.shape, layout.mesh, layout.canonical)
    dt = DTensor.from_local(
        local.reshape(local_shape), layout.mesh, layout.canonical, run_check=False,
        shape=param.shape, stride=param.stride(),
    )  # fmt: skip
    if to_param and layout.resharded:
        dt = dt.redistribute(layout.mesh, tuple(param.placements))
    return dt


@dataclass(eq=False)
class ShardedPairWork(PairWork):
    """PairWork whose A, B and gradients are local canonical shards (A by columns, B by rows)."""

    a_layout: _Layout | None = None
    b_layout: _Layout | None = None


# -- the optimizers ------------------------------------------------------------------------------


class _ShardedLoRAPro:
    """Mixin over a lorapro optimizer: FSDP2-sharded factors, r x r all-reduces."""

    param_groups: list[dict[str, Any]]
    _group_pairs: list[list[LoRAPair]]
    _lora_ids: set[int]

    def _init_sharding(self) -> None:
        self._gram_group: dist.ProcessGroup | None = None
        self._mesh_groups: list[dist.ProcessGroup] = []
        self._sharded: bool | None = None
        self._warned_reshard = False
        self.comm_numel: dict[str, int] = {}
        """Numbers each rank sent into collectives in the last step, by purpose (for docs/scaling)."""

    def _count(self, key: str, numel: int) -> None:
        self.comm_numel[key] = self.comm_numel.get(key, 0) + int(numel)

    # collect: local canonical shards ---------------------------------------------------------
    def _pair_layouts(self, pair: LoRAPair) -> tuple[_Layout, _Layout] | None:
        A, B = pair.A, pair.B
        if not isinstance(A, DTensor) and not isinstance(B, DTensor):
            return None
        if not (isinstance(A, DTensor) and isinstance(B, DTensor)):
            raise LoRAProConfigError(
                f"{pair.name}: only one of lora_A / lora_B is a DTensor; shard the whole LoRA layer with "
                "fully_shard (both factors) or neither"
            )
        da, db = _shard_mesh_dim(A, f"{pair.name} lora_A"), _shard_mesh_dim(B, f"{pair.name} lora_B")
        if A.device_mesh != B.device_mesh or da != db:
            raise LoRAProConfigError(f"{pair.name}: lora_A and lora_B are sharded over different meshes")
        a_layout, b_layout = _Layout(A, _canonical(A, 1)), _Layout(B, _canonical(B, 0))
        group = A.device_mesh.get_group(da)
        if self._gram_group is None:
            self._gram_group = group
            self._mesh_groups = [A.device_mesh.get_group(i) for i in range(A.device_mesh.ndim)]
        elif group is not self._gram_group:
            raise LoRAProConfigError(
                f"{pair.name}: LoRA factors are sharded over different process groups; lorapro's FSDP "
                "optimizer needs every LoRA layer sharded over the same data-parallel mesh"
            )
        if a_layout.resharded and not self._warned_reshard:
            self._warned_reshard = True
            logger.warning(
                "lorapro FSDP: lora_A is sharded by rows (FSDP2's default); each step re-shards A and its "
                "gradient by columns. Pass shard_placement_fn=lorapro.integrations.fsdp."
                "lora_shard_placement_fn(model) to fully_shard to communicate only r x r terms."
            )
        return a_layout, b_layout

    def _collect(self) -> list[GroupWork]:
        self._sync_pairs()
        self.comm_numel = {}
        works = []
        any_sharded, all_sharded = False, True
        for group, pairs in zip(self.param_groups, self._group_pairs, strict=True):
            work = GroupWork(group)
            for pair in pairs:
                gA, gB = pair.A.grad, pair.B.grad
                if gA is None and gB is None:
                    continue
                layouts = self._pair_layouts(pair)
                any_sharded |= layouts is not None
                all_sharded &= layouts is not None
                dtype = compute_dtype(pair.A.dtype)
                if layouts is None:
                    A, B = pair.matrix_A(), pair.matrix_B()
                    gA = None if gA is None else pair.matrix_A(gA)
                    gB = None if gB is None else pair.matrix_B(gB)
                    a_layout = b_layout = None
                else:
                    a_layout, b_layout = layouts
                    A = pair.matrix_A(_to_canonical(pair.A, a_layout))
                    B = pair.matrix_B(_to_canonical(pair.B, b_layout))
                    gA = None if gA is None else pair.matrix_A(_to_canonical(gA, a_layout))
                    gB = None if gB is None else pair.matrix_B(_to_canonical(gB, b_layout))
                    if a_layout.resharded:
                        self._count("reshard_A", 2 * A.numel())
                A, B = A.to(dtype), B.to(dtype)
                gA = torch.zeros_like(A) if gA is None else gA.to(dtype)
                gB = torch.zeros_like(B) if gB is None else gB.to(dtype)
                work.pairs.append(
                    ShardedPairWork(pair, pair.scaling, A, B, gA, gB, a_layout=a_layout, b_layout=b_layout)
                )
            for p in group["params"]:
                if p.grad is None or id(p) in self._lora_ids:
                    continue
                work.params.append(p)
                work.grads.append(p.grad)
            works.append(work)
        if any_sharded and not all_sharded:
            raise LoRAProConfigError(
                "some LoRA layers are FSDP-sharded and others are not; apply fully_shard to the root module "
                "too, so that every LoRA factor is sharded over the same mesh"
            )
        self._sharded = any_sharded
        return works

    # the one collective the closed form needs ----------------------------------------------
    def _reduce_gram_terms(self, terms: Tensor) -> Tensor:
        if not self._sharded:
            return terms
        dist.all_reduce(terms, group=self._gram_group)
        self._count("gram_allreduce", terms.numel())
        return terms

    def _nonfinite(self, works: list[GroupWork]) -> bool:
        if not self._sharded:
            return super()._nonfinite(works)  # type: ignore[misc]
        # As the core check: the r x r terms (already all-reduced, so a NaN in any shard's
        # gradient is in every rank's terms) and the coefficients, plus the local shards of the
        # other parameters' gradients. Then every rank must take the same decision, or one rank
        # would step and another skip.
        tensors: list[Tensor] = list(self._checked)  # type: ignore[attr-defined]
        for work in works:
            tensors += [g.to_local() if isinstance(g, DTensor) else g for g in work.grads]
        flag = any_nonfinite(tensors).to(torch.float32).reshape(1)
        for group in self._mesh_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _as_param_gradients(self, w: PairWork) -> tuple[Tensor, Tensor]:
        """The local adjusted gradients as DTensors laid out like their sharded parameters."""
        if isinstance(w, ShardedPairWork) and w.a_layout is not None and w.b_layout is not None:
            assert w.adjusted_A is not None and w.adjusted_B is not None
            return _from_canonical(w.adjusted_A, w.a_layout), _from_canonical(w.adjusted_B, w.b_layout)
        return super()._as_param_gradients(w)  # type: ignore[misc]


class FSDPLoRAProSGD(_ShardedLoRAPro, LoRAProSGD):
    """:class:`~lorapro.LoRAProSGD` for models sharded with FSDP2 ``fully_shard``.

    Build it after ``fully_shard`` (the optimizer must hold the sharded DTensor parameters).
    Also works on an unsharded model, where it is exactly ``LoRAProSGD``.
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self._init_sharding()
        super().__init__(model, *args, **kwargs)


class FSDPLoRAProAdamW(_ShardedLoRAPro, LoRAProAdamW):
    """:class:`~lorapro.LoRAProAdamW` for models sharded with FSDP2 ``fully_shard``.

    Efficient mode keeps AdamW moments sharded like the factors. Full mode keeps the m x n
    moments of each layer sharded by rows (like B); see the module docstring for its traffic.
    Build it after ``fully_shard``. On an unsharded model it is exactly ``LoRAProAdamW``.
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self._init_sharding()
        super().__init__(model, *args, **kwargs)

    def _apply(self, work: GroupWork) -> None:
        if not self._sharded or work.group["mode"] == "efficient":
            super()._apply(work)
            return
        self._apply_full_sharded(work)
        self._adamw(work.group, work.params, work.grads)

    def _gather_columns(self, local: Tensor, layout: _Layout) -> Tensor:
        """Full (r, n) matrix from canonical column shards (all-gather of r x n numbers)."""
        full = _from_canonical(local, layout, to_param=False).full_tensor()
        self._count("full_mode_gather", local.numel())
        return full.reshape(local.shape[0], -1).to(local.dtype)

    def _columns_of(self, full: Tensor, layout: _Layout) -> Tensor:
        """This rank's canonical column shard of a replicated (r, n) matrix (no communication)."""
        mesh = layout.mesh
        replicated = tuple(Replicate() for _ in layout.canonical)
        shape = layout.param.shape
        dt = DTensor.from_local(full.reshape(shape), mesh, replicated, run_check=False)
        return dt.redistribute(mesh, layout.canonical).to_local().reshape(full.shape[0], -1)

    def _apply_full_sharded(self, work: GroupWork) -> None:
        """Algorithm 3 with the m x n moments sharded by rows; mirrors LoRAProAdamW._apply_full."""
        group = work.group
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if lr * wd >= 1.0:
            raise LoRAProConfigError(
                f"full mode needs lr * weight_decay < 1 (sqrt(1 - lr*wd) scales A and B), got "
                f"lr={lr}, weight_decay={wd}; lower one of them"
            )
        for w in work.pairs:
            assert isinstance(w, ShardedPairWork) and w.a_layout is not None and w.b_layout is not None
            s = w.scaling
            adjusted_A, adjusted_B = adjusted_gradients(w)  # from the coefficients _prepare solved
            A_full = self._gather_columns(w.A, w.a_layout)
            gA_full = self._gather_columns(adjusted_A, w.a_layout)
            # rows of this rank's shard of the m x n equivalent gradient: s (B gA + gB A)
            g_rows = s * (w.B @ gA_full + adjusted_B @ A_full)
            state = self.state[w.pair.B]
            if "step" not in state:
                m, n = w.b_layout.param.shape[0], A_full.shape[1]
                placements = w.b_layout.canonical
                local, _ = compute_local_shape_and_global_offset((m, n), w.b_layout.mesh, placements)
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in ("equiv_exp_avg", "equiv_exp_avg_sq"):
                    state[key] = DTensor.from_local(
                        torch.zeros(local, dtype=w.A.dtype, device=w.A.device), w.b_layout.mesh,
                        placements, run_check=False, shape=torch.Size((m, n)), stride=(n, 1),
                    )  # fmt: skip
            direction = adam_direction(
                g_rows, state["equiv_exp_avg"].to_local(), state["equiv_exp_avg_sq"].to_local(),
                state["step"],
                beta1=beta1, beta2=beta2, eps=group["eps"], out=g_rows,
            )  # fmt: skip
            del g_rows  # now the direction's other name
            partial = s * (w.B.mT @ direction)  # (r, n), summed over the row shards
            dist.all_reduce(partial, group=self._gram_group)
            self._count("full_mode_allreduce", partial.numel())
            w.grad_A = self._columns_of(partial, w.a_layout)
            w.grad_B = s * (direction @ A_full.mT)
        self._adjust(work.pairs, lambda w: group["x_mode"])  # type: ignore[attr-defined]

        decay = 1.0 - lr * wd
        factor_decay = math.sqrt(decay)
        decayed_bases: set[int] = set()
        for w in work.pairs:
            for param, value, delta, layout in (
                (w.pair.A, w.A, w.adjusted_A, w.a_layout),
                (w.pair.B, w.B, w.adjusted_B, w.b_layout),
            ):
                updated = value.clone()
                if wd != 0.0:
                    updated.mul_(factor_decay)
                updated.add_(delta, alpha=-lr)
                param.copy_(_from_canonical(updated.to(param.dtype), layout))
            base = w.pair.base_weight
            if wd != 0.0 and id(base) not in decayed_bases:
                decayed_bases.add(id(base))
                base.mul_(decay)
