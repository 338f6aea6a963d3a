"""FSDP optimizer pieces that need no process group (the sharded runs are in
test_integration_distributed.py): on an unsharded model the FSDP classes are exactly the core
optimizers, and the placement function picks A's columns."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Shard

import lorapro
from integration_common import PatternDataset, lm_loss, tiny_lora_llama, trainable_state
from lorapro.integrations.fsdp import FSDPLoRAProAdamW, FSDPLoRAProSGD, lora_shard_placement_fn


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("fsdp_cls", "core_cls", "kwargs"),
    [
        (FSDPLoRAProAdamW, lorapro.LoRAProAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (FSDPLoRAProAdamW, lorapro.LoRAProAdamW, {"lr": 2e-3, "weight_decay": 0.1, "mode": "full"}),
        (FSDPLoRAProSGD, lorapro.LoRAProSGD, {"lr": 0.1, "momentum": 0.9}),
    ],
)
def test_unsharded_fsdp_optimizer_is_the_core_optimizer(fsdp_cls, core_cls, kwargs):
    results = []
    for cls in (fsdp_cls, core_cls):
        model = tiny_lora_llama(random_b=True)
        opt = cls(model, **kwargs)
        for _ in range(3):
            lm_loss(model, PatternDataset(8).tokens).backward()
            opt.step()
            opt.zero_grad()
        results.append(trainable_state(model))
    for name in results[1]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_placement_puts_a_on_columns_only():
    model = tiny_lora_llama()
    place = lora_shard_placement_fn(model)
    for pair in lorapro.find_lora_pairs(model):
        assert place(pair.A) == Shard(1)
        assert place(pair.B) is None  # FSDP2's default: Shard(0), rows of B
    assert place(model.base_model.model.lm_head.weight) is None
