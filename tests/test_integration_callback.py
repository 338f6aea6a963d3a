"""LoRAProCallback: an existing Trainer / TRL SFTTrainer script with any ``optim=`` becomes LoRA-Pro
efficient mode by adding one callback. Also the routes that must not silently train plain AdamW
with a lorapro optimizer (set_adapter after build, add_param_group)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer

import lorapro
from integration_common import VOCAB, PatternDataset, lm_loss, tiny_lora_llama, trainable_state
from lorapro.integrations.trainer import LoRAProCallback, LoRAProTrainer
from test_integration_trainer import assert_same_params, reference_run, training_args

pytestmark = pytest.mark.usefixtures("single_thread")


def test_callback_turns_the_trainers_fused_adamw_into_lora_pro(tmp_path):
    expected = reference_run(6, attach_fused=True)
    callback = LoRAProCallback()
    trainer = Trainer(
        model=tiny_lora_llama(random_b=True), args=training_args(tmp_path, optim="adamw_torch_fused"),
        train_dataset=PatternDataset(8), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert callback.handle is None  # removed at the end of training
    assert_same_params(trainable_state(trainer.model), expected)


def assert_trains_lora_pro(build) -> None:
    """``build(name, callbacks)`` makes a trainer; with the callback the loss falls and the
    parameters end away from the same trainer without it (so the adjusted gradients were used)."""
    runs = {}
    for name, callbacks in (("pro", [LoRAProCallback()]), ("plain", [])):
        trainer = build(name, callbacks)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (losses, trainable_state(trainer.model))
    losses, params = runs["pro"]
    assert losses[-1] < losses[0]
    assert max((params[n] - runs["plain"][1][n]).abs().max().item() for n in params) > 1e-3


def test_callback_with_adafactor_trains_and_differs_from_plain(tmp_path):
    def build(name, callbacks):
        return Trainer(
            model=tiny_lora_llama(random_b=True),
            args=training_args(tmp_path / name, optim="adafactor", max_grad_norm=0.0, learning_rate=1e-2),
            train_dataset=PatternDataset(8), callbacks=callbacks,
        )  # fmt: skip

    assert_trains_lora_pro(build)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def test_trl_sft_trainer_with_the_callback(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(f"t{(3 * i + 2 * j) % (VOCAB - 2)}" for j in range(10)) for i in range(8)]

    def build(name, callbacks):
        config = trl.SFTConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=6, learning_rate=3e-2,
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
            optim="adamw_torch", max_length=16, dataset_num_proc=None,
        )  # fmt: skip
        return trl.SFTTrainer(
            model=tiny_lora_llama(random_b=True), args=config, processing_class=tiny_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"text": texts}), callbacks=callbacks,
        )  # fmt: skip

    assert_trains_lora_pro(build)


def test_callback_refuses_a_lorapro_optimizer(tmp_path):
    trainer = LoRAProTrainer(
        model=tiny_lora_llama(random_b=True), args=training_args(tmp_path), train_dataset=PatternDataset(8),
        callbacks=[LoRAProCallback()],
    )  # fmt: skip
    with pytest.raises(lorapro.LoRAProConfigError, match="adjust the gradients twice"):
        trainer.train()


# -- lorapro optimizers: routes that used to train plain AdamW ------------------------------------


def two_adapter_model():
    from peft import LoraConfig

    model = tiny_lora_llama(random_b=True)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    return model


def test_set_adapter_after_the_optimizer_was_built_raises_when_not_owned():
    model = two_adapter_model()
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)  # adapter "default" active, "b" frozen
    model.set_adapter("b")
    lm_loss(model, PatternDataset(4).tokens).backward()
    before = copy.deepcopy(trainable_state(model))
    with pytest.raises(lorapro.LoRAProConfigError, match="adapter 'b' is active"):
        opt.step()
    assert all(torch.equal(v, trainable_state(model)[k]) for k, v in before.items())


def test_set_adapter_after_build_is_followed_when_owned():
    """Both adapters' factors given to the optimizer: after set_adapter("b") b gets LoRA-Pro (not
    the plain AdamW it got as an 'ordinary' parameter)."""
    model = two_adapter_model()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = lorapro.LoRAProSGD(model, lr=0.1, params=params)
    model.set_adapter("b")
    for p in params:
        p.requires_grad_(True)
    raw = copy.deepcopy(model)
    tokens = PatternDataset(4).tokens
    lm_loss(raw, tokens).backward()
    lm_loss(model, tokens).backward()
    opt.step()
    pairs = lorapro.find_lora_pairs(raw)
    assert [p.adapter for p in pairs] == ["b", "b"] and [p.name for p in opt.pairs] == [p.name for p in pairs]
    for pair, now in zip(pairs, opt.pairs, strict=True):
        gA, gB = lorapro.optimal_gradients(
            pair.A.detach(), pair.B.detach(), pair.A.grad, pair.B.grad, pair.scaling
        )
        torch.testing.assert_close(now.A.detach(), pair.A.detach() - 0.1 * gA, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(now.B.detach(), pair.B.detach() - 0.1 * gB, rtol=1e-5, atol=1e-7)


def test_add_param_group_with_lora_factors():
    """A new adapter's factors added with add_param_group are trained as a LoRA pair; half a pair
    in a new group is refused at once, leaving the optimizer as it was."""
    model = two_adapter_model()
    opt = lorapro.LoRAProAdamW(model, lr=1e-2)
    model.base_model.set_adapter(["default", "b"])
    b_pairs = [p for p in lorapro.find_lora_pairs(model) if p.adapter == "b"]
    with pytest.raises(lorapro.LoRAProConfigError, match="same parameter group"):
        opt.add_param_group({"params": [b_pairs[0].A]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [t for p in b_pairs for t in (p.A, p.B)], "lr": 1e-3})
    assert any(p.adapter == "b" for p in opt.pairs)
    lm_loss(model, PatternDataset(4).tokens).backward()
    opt.step()
