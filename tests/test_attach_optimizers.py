"""Under lorapro.attach, the optimizers LoRA users already have run LoRA-Pro: torch's fused AdamW,
bitsandbytes' AdamW8bit and PagedAdamW8bit (8-bit state forced on these tiny tensors),
torchao's AdamW8bit and transformers' Adafactor each train a tiny model (the loss falls) and
end away from the same optimizer on plain LoRA (so the adjusted gradients reached them)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorapro
from integration_common import lm_loss, pattern_tokens, tiny_lora_llama, trainable_state


def bnb_optimizer(name):
    def make(params):
        bnb = pytest.importorskip("bitsandbytes")
        # bitsandbytes keeps tensors under 4,096 elements in 32-bit state: force 8-bit ones
        return getattr(bnb.optim, name)(params, lr=1e-2, min_8bit_size=1)

    return make


def torchao_adamw8bit(params):
    optim = pytest.importorskip("torchao.optim")
    return optim.AdamW8bit(params, lr=1e-2, block_size=16)


def adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


OPTIMIZERS = {
    "torch_adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "bnb_adamw8bit": bnb_optimizer("AdamW8bit"),
    "bnb_paged_adamw8bit": bnb_optimizer("PagedAdamW8bit"),
    "torchao_adamw8bit": torchao_adamw8bit,
    "adafactor": adafactor,
}


def run(model, make, steps=6):
    opt = make([p for p in model.parameters() if p.requires_grad])
    tokens = pattern_tokens(8)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trains_lora_pro_under_attach(name, single_thread):
    plain = tiny_lora_llama(random_b=True, hidden_size=32, intermediate_size=64)
    model = copy.deepcopy(plain)
    handle = lorapro.attach(model)
    losses, opt = run(model, OPTIMIZERS[name])
    _, _ = run(plain, OPTIMIZERS[name])
    assert losses[-1] < losses[0] - 0.05, losses
    got, other = trainable_state(model), trainable_state(plain)
    moved_apart = max((got[n] - other[n]).abs().max().item() for n in got)
    assert moved_apart > 1e-3, moved_apart
    if name.startswith("bnb"):  # the 8-bit path really ran
        pair = handle.pairs[0]
        assert opt.state[pair.A]["state1"].dtype == torch.uint8
    assert handle.basis_computations == 6
