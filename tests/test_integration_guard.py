"""The pair guard and the DeepSpeed config check, in one process and without DeepSpeed: a wrapper
that swaps the optimizer's parameters (as DeepSpeed ZeRO and Accelerate's FSDP2 do) makes the
first step fail loudly instead of silently training plain LoRA."""

from __future__ import annotations

import pytest
import torch

import lorapro
from integration_common import lm_loss, pattern_tokens, tiny_lora_llama
from lorapro.integrations.deepspeed import check_deepspeed_config
from lorapro.integrations.guard import assert_owns_pairs, unwrap_lorapro


class Wrapper:  # what Accelerate and DeepSpeed wrappers look like from outside
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_flat_partition_swap_is_caught_at_the_first_step():
    model = tiny_lora_llama(random_b=True)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)  # the check is built in
    assert unwrap_lorapro(Wrapper(Wrapper(opt))) is opt
    assert_owns_pairs(Wrapper(opt))  # untouched: fine

    # ZeRO-1/2 replace each group's parameters by one flat fp32 slice of all of them
    params = opt.param_groups[0]["params"]
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    opt.param_groups[0]["params"] = [flat]
    lm_loss(model, pattern_tokens(4)).backward()
    flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
    before = flat.detach().clone()
    with pytest.raises(lorapro.LoRAProConfigError, match="no longer among the optimizer's parameters"):
        opt.step()
    assert torch.equal(flat, before)  # nothing was stepped


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ({"zero_optimization": {"stage": 1}}, "flat fp32 partitions"),
        ({"zero_optimization": {"stage": 2}}, "ZeRO stage 0"),
        ({"zero_optimization": {"stage": 3}}, "FSDP2"),
        ({"bf16": {"enabled": True}}, "torch_autocast"),
        ({"fp16": {"enabled": "auto"}}, "torch_autocast"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' section"),
    ],
)
def test_unsupported_deepspeed_configs_say_why_and_what_instead(config, phrase):
    with pytest.raises(lorapro.LoRAProConfigError, match=phrase):
        check_deepspeed_config({"train_micro_batch_size_per_gpu": 1, **config})


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"zero_optimization": {"stage": 0}},
        {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
        {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    ],
)
def test_supported_deepspeed_configs_pass(config):
    check_deepspeed_config(config)
