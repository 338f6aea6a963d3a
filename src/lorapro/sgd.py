"""LoRA-Pro with SGD (Algorithm 1 of the paper), plus momentum and L2 weight decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ._base import GroupWork, LoRAProOptimizer
from ._solve import Solved
from ._validation import check_number
from .closed_form import XMode
from .functional import sgd_update

__all__ = ["LoRAProSGD"]


class LoRAProSGD(LoRAProOptimizer):
    """SGD whose LoRA factor gradients are replaced by LoRA-Pro's optimal ones (Theorem 2.1).

    Args:
        model: the model holding PEFT LoRA layers (pairs are found by module).
        lr: learning rate.
        momentum: heavy-ball momentum; it accumulates the *adjusted* gradients.
        weight_decay: L2 penalty added to the gradient, as ``torch.optim.SGD`` does; for LoRA
            factors it is added after the adjustment, since the closed form assumes LoRA's
            own gradients ``s B^T g`` and ``s g A^T``.
        x_mode: ``"sylvester"`` (Theorem 2.3), ``"zero"`` or ``"symmetric"`` (Eq. 16).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step whose gradients hold NaN/Inf;
            either way nothing is modified.
        params: parameters or param groups to optimise (default: every trainable parameter
            of ``model``). Both factors of a LoRA pair must be in the same group.

    Parameters that are not LoRA factors (heads, ``modules_to_save``, biases) get plain SGD.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        x_mode: XMode = "sylvester",
        *,
        nonfinite: str = "raise",
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "x_mode": x_mode}
        super().__init__(model, params, defaults, nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        group["momentum"] = check_number("momentum", group["momentum"])

    def _expected_state_shapes(self, group, param):
        return {"momentum_buffer": tuple(param.shape)} if group["momentum"] != 0.0 else {}

    def _apply(self, work: GroupWork, solved: Solved) -> None:
        # LoRA factors chunk by chunk as their adjusted gradients are produced, then the rest.
        for params, grads in self._adjusted_updates(work, solved):
            self._sgd(work.group, params, grads)
        self._sgd(work.group, work.params, work.grads)

    def _sgd(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        new_buffers = sgd_update(
            params, grads, buffers, lr=group["lr"], momentum=group["momentum"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip
        if group["momentum"] != 0.0:
            for p, buf in zip(params, new_buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf
