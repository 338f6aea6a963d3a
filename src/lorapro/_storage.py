"""Where the LoRA factors live, and the one place the library meets the engines' storage.

- **Detection** (:func:`is_dtensor`, :func:`is_zero3_partition`, :func:`deepspeed_manages`,
  :func:`full_shape`, :func:`local_tensor`): FSDP2's DTensor parameters, DeepSpeed ZeRO-3's
  partitions (``ds_id``, ``ds_shape``) and ZeRO 1/2's links to flat partitions (``_hp_mapping``).
  attach, the optimizers and the pair tracker ask here and nowhere else.
- **The optimizers' storage adapter**: every layer of a step gets a :class:`PlainStorage` (whole
  factors: one process, DDP, DeepSpeed stage 0; every call is the identity) or a
  :class:`ShardedStorage` (FSDP2's ``fully_shard``), with one interface, so the step has no
  branch on the engine.

Under FSDP2 every parameter is a ``DTensor`` holding one shard, and gradients arrive already
reduce-scattered (averaged over ranks). The closed form needs the whole factors only through
four r x r products, and each is a sum over the shards of a well-chosen sharding:

- B (m, r) sharded by rows (``Shard(0)``, FSDP2's default): ``B^T B = sum_k B_k^T B_k`` and
  ``B^T grad_B = sum_k B_k^T grad_B_k``;
- A (r, n) sharded by columns (``Shard(1)``): ``A A^T = sum_k A_k A_k^T`` and
  ``grad_A A^T = sum_k grad_A_k A_k^T``.

So the optimizers work on each rank's local shards in that *canonical* layout (A by columns,
B by rows), one ``all_reduce`` of the (k, 4, r, r) terms per bucket makes them global, every
rank solves the same r x r problems, and the adjusted gradients are formed shard by shard
(``grad_A_k`` needs only ``A_k``, ``grad_B_k`` only ``B_k``). FSDP2 shards A by rows (by the
rank r) unless told otherwise: ``lorapro.integrations.fsdp.lora_shard_placement_fn`` places A by
columns; with the default placement each step re-shards A and its gradient (an all-to-all of
A-sized tensors per layer) and says so once in the log.

Full mode keeps its m x n moments sharded by rows like B; its step also gathers A and the
adjusted grad_A (r x n each) and all-reduces ``B^T D`` (r x n) per layer: O(r n) numbers,
never an m x n matrix.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import LoRAProConfigError

if TYPE_CHECKING:
    from .pairs import LoRAPair

__all__ = [
    "FactorSharding",
    "FactorStorage",
    "PlainStorage",
    "ShardedStorage",
    "deepspeed_manages",
    "full_shape",
    "is_dtensor",
    "is_partitioned",
    "is_zero3_partition",
    "local_tensor",
    "local_tensors",
]

logger = logging.getLogger(__name__)


# -- detection ----------------------------------------------------------------------------------
def _dtensor_class() -> type | None:
    # No DTensor can exist before torch.distributed.tensor was imported, so a plain model never
    # pays for importing it (nor needs a torch built with distributed support).
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t: Any) -> bool:
    """A DTensor (FSDP2), also seen through wrappers that keep its ``_local_tensor``."""
    return type(t).__name__ == "DTensor" or isinstance(getattr(t, "_local_tensor", None), Tensor)


def is_zero3_partition(t: Any) -> bool:
    """A parameter DeepSpeed ZeRO-3 converted in place (partitioned, gathered around its module)."""
    return hasattr(t, "ds_id")


def is_partitioned(t: Any) -> bool:
    """Held whole only around its own module's forward and backward (FSDP2, ZeRO-3)."""
    return is_dtensor(t) or is_zero3_partition(t)


def deepspeed_manages(t: Any) -> bool:
    """Does DeepSpeed step this parameter on a flat partition of its own (ZeRO 1-3, bf16/fp16
    master weights)? A torch optimizer built for it would then never update it."""
    return hasattr(t, "_hp_mapping") or is_zero3_partition(t)


def full_shape(t: Any) -> torch.Size:
    """The whole parameter's shape (a ZeRO-3 partition's own ``shape`` is (0,))."""
    return getattr(t, "ds_shape", t.shape)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    cls = _dtensor_class()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`local_tensor` of each (the list itself when no DTensor can exist)."""
    cls = _dtensor_class()
    if cls is None:
        return tensors
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def _shard_mesh_dim(t: Any, what: str) -> int:
    from torch.distributed.tensor import Replicate, Shard

    dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or any(not isinstance(p, Shard | Replicate) for p in t.placements):
        raise LoRAProConfigError(
            f"{what} has placements {tuple(t.placements)}: lorapro's optimizers support LoRA factors "
            "sharded over exactly one mesh dimension (FSDP2, or HSDP's (Replicate, Shard)); keep the LoRA "
            "layers out of tensor parallelism"
        )
    return dims[0]


@dataclass(frozen=True)
class _Factor:
    """One factor's DTensor and the placement the Gram sums want it in (the canonical one)."""

    param: Any  # DTensor
    canonical: tuple

    @property
    def mesh(self) -> Any:
        return self.param.device_mesh

    @property
    def resharded(self) -> bool:
        return tuple(self.param.placements) != self.canonical

    def local(self, t: Any) -> Tensor:
        """The local shard of ``t`` (the parameter or its gradient) in the canonical placement."""
        if tuple(t.placements) != self.canonical:
            t = t.redistribute(self.mesh, self.canonical)
        return t.to_local()

    def as_param(self, local: Tensor, *, like_param: bool = True) -> Any:
        """A canonical local shard (any view of it) back into a DTensor, laid out like the
        parameter (``like_param=True``) or left in the canonical placement."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, _ = compute_local_shape_and_global_offset(self.param.shape, self.mesh, self.canonical)
        dt = DTensor.from_local(
            local.reshape(shape), self.mesh, self.canonical, run_check=False,
            shape=self.param.shape, stride=self.param.stride(),
        )  # fmt: skip
        if like_param and self.resharded:
            dt = dt.redistribute(self.mesh, tuple(self.param.placements))
        return dt


class FactorStorage(Protocol):
    """How one layer's factors are stored, as the optimizers' step sees them. The factors and their
    gradients come out as matrices (``local_A`` (r, n_k), ``local_B`` (m_k, r): this rank's share),
    and the step's results go back laid out like the parameters (``as_params``); full mode also
    needs A whole (``full_columns``), a product over B's rows summed (``sum_over_rows``) and its
    moments laid out like B's rows (``moment_zeros``)."""

    def local_A(self, t: Any) -> Tensor: ...
    def local_B(self, t: Any) -> Tensor: ...
    def as_params(self, local_A: Tensor, local_B: Tensor) -> tuple[Any, Any]: ...
    def columns(self, local_A: Tensor) -> int: ...
    def full_columns(self, local: Tensor) -> Tensor: ...
    def own_columns(self, full: Tensor) -> Tensor: ...
    def sum_over_rows(self, partial: Tensor) -> Tensor: ...
    def moment_zeros(self, shape: tuple[int, ...], like: Tensor) -> Any: ...


class PlainStorage:
    """Whole factors (one process, DDP, DeepSpeed stage 0): every conversion is the identity (a view
    at most) and nothing is communicated."""

    def __init__(self, pair: LoRAPair) -> None:
        self.pair = pair

    def local_A(self, t: Any) -> Tensor:
        return self.pair.matrix_A(t)

    def local_B(self, t: Any) -> Tensor:
        return self.pair.matrix_B(t)

    def as_params(self, local_A: Tensor, local_B: Tensor) -> tuple[Tensor, Tensor]:
        return self.pair.param_A(local_A), self.pair.param_B(local_B)

    def columns(self, local_A: Tensor) -> int:
        return local_A.shape[-1]

    def full_columns(self, local: Tensor) -> Tensor:
        return local

    def own_columns(self, full: Tensor) -> Tensor:
        return full

    def sum_over_rows(self, partial: Tensor) -> Tensor:
        return partial

    def moment_zeros(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


class ShardedStorage:
    """One LoRA layer whose factors are DTensor shards: conversions and the collectives its
    step needs, each counted in :attr:`FactorSharding.comm_numel`."""

    def __init__(self, pair: LoRAPair, a: _Factor, b: _Factor, sharding: FactorSharding) -> None:
        self.pair = pair
        self._a, self._b = a, b
        self._sharding = sharding

    def local_A(self, t: Any) -> Tensor:
        """(r, n_k) local column shard of A or of a tensor laid out like A."""
        if self._a.resharded:
            self._sharding.count("reshard_A", t.to_local().numel())
        return self.pair.matrix_A(self._a.local(t))

    def local_B(self, t: Any) -> Tensor:
        """(m_k, r) local row shard of B or of a tensor laid out like B."""
        return self.pair.matrix_B(self._b.local(t))

    def as_params(self, local_A: Tensor, local_B: Tensor) -> tuple[Any, Any]:
        """Local canonical shards (adjusted gradients, updated factors) as DTensors laid out like
        the parameters."""
        return self._a.as_param(local_A), self._b.as_param(local_B)

    def columns(self, local_A: Tensor) -> int:
        """n, the number of columns of the whole A matrix."""
        A = self._a.param
        return A.numel() // A.shape[0]

    def full_columns(self, local: Tensor) -> Tensor:
        """The whole (r, n) matrix from this rank's column shard (an all-gather of r x n numbers)."""
        full = self._a.as_param(local, like_param=False).full_tensor()
        self._sharding.count("full_mode_gather", local.numel())
        return full.reshape(local.shape[0], -1).to(local.dtype)

    def own_columns(self, full: Tensor) -> Tensor:
        """This rank's column shard of an (r, n) matrix every rank holds whole (no communication)."""
        from torch.distributed.tensor import DTensor, Replicate

        replicated = tuple(Replicate() for _ in self._a.canonical)
        dt = DTensor.from_local(full.reshape(self._a.param.shape), self._a.mesh, replicated, run_check=False)
        return dt.redistribute(self._a.mesh, self._a.canonical).to_local().reshape(full.shape[0], -1)

    def sum_over_rows(self, partial: Tensor) -> Tensor:
        """Sum, in place, a product over B's rows (such as ``B^T D``) across the row shards."""
        dist.all_reduce(partial, group=self._sharding.group)
        self._sharding.count("full_mode_allreduce", partial.numel())
        return partial

    def moment_zeros(self, shape: tuple[int, ...], like: Tensor) -> Any:
        """An (m, n) zero DTensor sharded by rows like B (full mode's moments); ``shape`` is the
        local (m_k, n) of this rank's rows, ``like`` gives the dtype."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        b = self._b
        m, n = b.param.shape[0], shape[-1]
        local, _ = compute_local_shape_and_global_offset((m, n), b.mesh, b.canonical)
        zeros = torch.zeros(local, dtype=like.dtype, device=b.param.to_local().device)
        return DTensor.from_local(
            zeros, b.mesh, b.canonical, run_check=False, shape=torch.Size((m, n)), stride=(n, 1)
        )


class FactorSharding:
    """An optimizer's view of its LoRA factors' sharding, rebuilt at every step's collect.

    Every LoRA layer's factors are DTensors sharded over one data-parallel process group, or
    none are: the Gram terms are summed over that one group.
    """

    def __init__(self) -> None:
        self.group: Any = None  # the process group the factor shards are summed over
        self._mesh_groups: list[Any] = []
        self._warned_reshard = False
        self._seen_sharded = self._seen_plain = False
        self._dtensor: type | None = None  # DTensor's class, looked up once per step
        self._flag_device = torch.device("cpu")  # where the agreement all-reduce runs (NCCL: CUDA)
        self.comm_numel: dict[str, int] = {}

    @property
    def active(self) -> bool:
        """Did this step's collect meet sharded factors?"""
        return self._seen_sharded

    def count(self, key: str, numel: int) -> None:
        self.comm_numel[key] = self.comm_numel.get(key, 0) + int(numel)

    def begin_step(self) -> None:
        self._seen_sharded = self._seen_plain = False
        self._dtensor = _dtensor_class()
        self.comm_numel = {}

    def storage(self, pair: LoRAPair) -> FactorStorage:
        """The layer's storage: its shards and collectives, or :class:`PlainStorage`."""
        cls = self._dtensor
        a_sharded = cls is not None and isinstance(pair.A, cls)
        b_sharded = cls is not None and isinstance(pair.B, cls)
        if not a_sharded and not b_sharded:
            self._seen_plain = True
            return PlainStorage(pair)
        if pair.experts > 1:
            raise LoRAProConfigError(
                f"{pair.name}: LoRA on MoE experts (target_parameters) with FSDP2-sharded factors is not "
                "supported by lorapro's optimizers; leave the expert parameters out of the adapter or out "
                "of fully_shard"
            )
        if not (a_sharded and b_sharded):
            raise LoRAProConfigError(
                f"{pair.name}: only one of lora_A / lora_B is a DTensor; shard the whole LoRA layer with "
                "fully_shard (both factors) or neither"
            )
        from torch.distributed.tensor import Shard

        A, B = pair.A, pair.B
        da, db = _shard_mesh_dim(A, f"{pair.name} lora_A"), _shard_mesh_dim(B, f"{pair.name} lora_B")
        if A.device_mesh != B.device_mesh or da != db:
            raise LoRAProConfigError(f"{pair.name}: lora_A and lora_B are sharded over different meshes")

        def canonical(t: Any, dim: int) -> tuple:
            return tuple(Shard(dim) if isinstance(p, Shard) else p for p in t.placements)

        a, b = _Factor(A, canonical(A, 1)), _Factor(B, canonical(B, 0))
        group = A.device_mesh.get_group(da)
        if self.group is None:
            self.group = group
            self._mesh_groups = [A.device_mesh.get_group(i) for i in range(A.device_mesh.ndim)]
            self._flag_device = A.to_local().device
        elif group is not self.group:
            raise LoRAProConfigError(
                f"{pair.name}: LoRA factors are sharded over different process groups; lorapro's "
                "optimizers need every LoRA layer sharded over the same data-parallel mesh"
            )
        if a.resharded and not self._warned_reshard:
            self._warned_reshard = True
            logger.warning(
                "lorapro: lora_A is sharded by rows (FSDP2's default); each step re-shards A and its "
                "gradient by columns. Pass shard_placement_fn=lorapro.integrations.fsdp."
                "lora_shard_placement_fn(model) to fully_shard to communicate only r x r terms."
            )
        self._seen_sharded = True
        return ShardedStorage(pair, a, b, self)

    def end_collect(self) -> None:
        if self._seen_sharded and self._seen_plain:
            raise LoRAProConfigError(
                "some LoRA layers are FSDP-sharded and others are not; apply fully_shard to the root module "
                "too, so that every LoRA factor is sharded over the same mesh"
            )

    def reduce_terms(self, terms: Tensor) -> Tensor:
        """Sum the (k, 4, r, r) Gram terms over the shards (the identity for plain tensors)."""
        if not self._seen_sharded:
            return terms
        dist.all_reduce(terms, group=self.group)
        self.count("gram_allreduce", terms.numel())
        return terms

    def agree(self, flag: Tensor) -> bool:
        """``bool(flag)``, made the same on every rank of the mesh when the factors are sharded:
        a rank that skips a step while another takes it would leave the shards inconsistent."""
        if not self._seen_sharded:
            return bool(flag)
        flag = flag.to(device=self._flag_device, dtype=torch.float32).reshape(1)
        for group in self._mesh_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
