"""FSDP2 pieces that need no process group (the sharded runs are in
test_integration_distributed.py): the old FSDP optimizer names are deprecated aliases of the
core optimizers, and the placement function picks A's columns."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Shard

import lorapro
from integration_common import PatternDataset, lm_loss, tiny_lora_llama
from lorapro.integrations.fsdp import lora_shard_placement_fn

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("old", "core"), [("FSDPLoRAProAdamW", "LoRAProAdamW"), ("FSDPLoRAProSGD", "LoRAProSGD")]
)
def test_fsdp_optimizer_names_are_deprecated_aliases_of_the_core_optimizers(old, core):
    import lorapro.integrations.fsdp as fsdp

    with pytest.warns(FutureWarning, match=f"lorapro.{core} handles FSDP2-sharded factors itself"):
        cls = getattr(fsdp, old)
    assert cls is getattr(lorapro, core)
    with pytest.raises(AttributeError, match="no attribute 'FSDPLoRAProAdam'"):
        fsdp.FSDPLoRAProAdam  # noqa: B018 - a misspelling is not silently an optimizer


def test_unsharded_optimizer_reports_no_communication():
    model = tiny_lora_llama(random_b=True)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2, mode="full")
    lm_loss(model, PatternDataset(8).tokens).backward()
    opt.step()
    assert opt.comm_numel == {}


def test_placement_puts_a_on_columns_only():
    model = tiny_lora_llama()
    place = lora_shard_placement_fn(model)
    for pair in lorapro.find_lora_pairs(model):
        assert place(pair.A) == Shard(1)
        assert place(pair.B) is None  # FSDP2's default: Shard(0), rows of B
    assert place(model.base_model.model.lm_head.weight) is None
