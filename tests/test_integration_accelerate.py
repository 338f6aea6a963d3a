"""lorapro through ``accelerator.prepare(model, optimizer, dataloader)`` in one process:
gradient accumulation gives exactly the full-batch step, and bf16 mixed precision trains with
float32 parameters and moments. (Two processes: tests/test_integration_distributed.py.)"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import lorapro
from integration_common import PatternDataset, lm_loss, tiny_lora_llama, trainable_state


@pytest.fixture(autouse=True)
def fresh_state():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(before)


def run(accelerator: Accelerator, steps: int, batch_size: int):
    model = tiny_lora_llama(random_b=True)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    loader = torch.utils.data.DataLoader(PatternDataset(8), batch_size=batch_size, shuffle=False)
    dtypes = set()  # what the LoRA layers compute in during training
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses, done = [], 0
    while done < steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = lm_loss(model, batch["input_ids"])
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
            if accelerator.sync_gradients:
                done += 1
    return accelerator.unwrap_model(model), opt, losses, dtypes


def test_accumulation_equals_the_full_batch_step():
    """4 micro-batches of 2 accumulated = one step on all 8 sequences; the prepared optimizer
    must not step in between (Accelerate skips the inner steps) and must see the summed gradients."""
    model, opt, _, dtypes = run(Accelerator(cpu=True, gradient_accumulation_steps=4), steps=3, batch_size=2)
    assert type(opt.optimizer) is lorapro.LoRAProAdamW
    assert dtypes == {torch.float32}
    assert all(float(s["step"]) == 3 for s in opt.optimizer.state.values())

    reference = tiny_lora_llama(random_b=True)
    ref_opt = lorapro.LoRAProAdamW(reference, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    for _ in range(3):
        lm_loss(reference, PatternDataset(8).tokens).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    expected, got = trainable_state(reference), trainable_state(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_mixed_precision_trains_with_float32_state():
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model, opt, losses, dtypes = run(accelerator, steps=15, batch_size=4)
    assert dtypes == {torch.bfloat16}  # the LoRA layers really ran in bf16
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.optimizer.state.values() for v in s.values())
