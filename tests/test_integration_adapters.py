"""After training with lorapro the adapter is an ordinary PEFT adapter: ``save_pretrained`` writes
it, ``PeftModel.from_pretrained`` loads it onto a fresh base model, ``merge_and_unload`` merges it,
and all three give the trained model's outputs (``modules_to_save`` heads included)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import LlamaForCausalLM, TrainingArguments

import lorapro
from integration_common import PatternDataset, lm_loss, tiny_llama_config, tiny_lora_llama
from lorapro.integrations.trainer import LoRAProTrainer

pytestmark = pytest.mark.usefixtures("single_thread")


def train_with_optimizer(mode: str):
    model = tiny_lora_llama(modules_to_save=["lm_head"])
    opt = lorapro.LoRAProAdamW(model, lr=1e-2 if mode == "efficient" else 2e-3, mode=mode)
    tokens = PatternDataset(8).tokens
    for _ in range(5):
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
    return model


def train_with_trainer(mode: str, out):
    model = tiny_lora_llama(modules_to_save=["lm_head"])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=5, learning_rate=2e-3, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True, weight_decay=0.0,
    )  # fmt: skip
    trainer = LoRAProTrainer(
        model=model, args=args, train_dataset=PatternDataset(8), lorapro_kwargs={"mode": mode}
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return model


def fresh_base() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights tiny_lora_llama(seed=0) started from
    return LlamaForCausalLM(tiny_llama_config())


@pytest.mark.parametrize("how", ["optimizer-efficient", "trainer-full"])
def test_saved_adapter_loads_and_merges_to_the_trained_model(tmp_path, how):
    kind, mode = how.split("-")
    if kind == "optimizer":
        model = train_with_optimizer(mode)
        model.save_pretrained(tmp_path / "adapter")
    else:
        model = train_with_trainer(mode, tmp_path)
    model.eval()
    tokens = PatternDataset(4, seed=7).tokens
    with torch.no_grad():
        expected = model(input_ids=tokens).logits

    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files

    base = fresh_base()
    with torch.no_grad():
        untrained = base(input_ids=tokens).logits
    assert (untrained - expected).abs().max() > 1e-3  # training changed the outputs

    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=0, atol=1e-6)

    merged = loaded.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=0, atol=1e-5)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    model = train_with_optimizer("efficient")
    head = model.base_model.model.lm_head
    trained = head.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained, head.original_module.weight)  # the copy trained, the original did not
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(), tmp_path)
    torch.testing.assert_close(loaded.base_model.model.lm_head.modules_to_save["default"].weight, trained)
