"""lorapro inside transformers.Trainer: the Trainer's step is exactly a hand-written lorapro loop
(learning rate, betas, eps, weight decay, accumulation, clipping, scheduler all wired through),
bf16 and gradient checkpointing train, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

import lorapro
from integration_common import PatternDataset, lm_loss, tiny_lora_llama, trainable_state
from lorapro.integrations.trainer import (
    BASE_WEIGHTS_NAME,
    LoRAProTrainer,
    lorapro_optimizer_cls_and_kwargs,
    lorapro_param_groups,
)

pytestmark = pytest.mark.usefixtures("single_thread")


HYPER = dict(learning_rate=3e-2, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7)


def training_args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
        max_grad_norm=0.05, warmup_steps=2, lr_scheduler_type="linear", use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, data_seed=0, train_sampling_strategy="sequential",
        disable_tqdm=True, dataloader_num_workers=0, **HYPER,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def reference_run(
    steps: int, mode: str = "efficient", random_b: bool = True, attach_fused: bool = False
) -> dict[str, torch.Tensor]:
    """The loop the Trainer should be running: full-batch (8 sequences = 2 micro-batches of 4)
    mean loss, clip the raw gradients to 0.05, LoRAProAdamW with the same hyper-parameters,
    linear schedule with 2 warm-up steps. ``attach_fused``: lorapro.attach + torch's fused AdamW
    instead, so the clipped gradients are the adjusted ones."""
    model = tiny_lora_llama(random_b=random_b)
    hyper = dict(
        lr=HYPER["learning_rate"], betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]),
        eps=HYPER["adam_epsilon"], weight_decay=HYPER["weight_decay"],
    )  # fmt: skip
    if attach_fused:
        lorapro.attach(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **hyper, fused=True)
    else:
        opt = lorapro.LoRAProAdamW(model, **hyper, mode=mode)
    sched = get_linear_schedule_with_warmup(opt, 2, steps)
    tokens = PatternDataset(8).tokens
    for _ in range(steps):
        lm_loss(model, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()
    return trainable_state(model)


def assert_same_params(got: dict, expected: dict, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def test_trainer_step_is_the_lorapro_step(tmp_path):
    """LoRAProTrainer and the stock Trainer with the factory hook both equal the hand-written loop:
    every hyper-parameter, accumulation over 2 micro-batches, clipping and the schedule are wired."""
    expected = reference_run(6)

    trainer = LoRAProTrainer(
        model=tiny_lora_llama(random_b=True),
        args=training_args(tmp_path / "a"),
        train_dataset=PatternDataset(8),
    )
    trainer.train()
    opt = trainer.lorapro
    assert type(opt) is lorapro.LoRAProAdamW
    assert len(opt.pairs) == 2 * 4  # 2 layers x (q, v, up, down)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.99), 1e-7, 0.1)
    assert group["lr"] == pytest.approx(0.0)  # the linear schedule ran to its end
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert sum(n > 0.05 for n in norms) >= 3  # clipping was active
    assert_same_params(trainable_state(trainer.model), expected)

    args = training_args(tmp_path / "b")
    stock = Trainer(
        model=tiny_lora_llama(random_b=True), args=args, train_dataset=PatternDataset(8),
        optimizer_cls_and_kwargs=lorapro_optimizer_cls_and_kwargs(args),
    )  # fmt: skip
    stock.train()
    assert type(stock.optimizer.optimizer) is lorapro.LoRAProAdamW
    assert_same_params(trainable_state(stock.model), expected)


def test_lora_pairs_stay_in_one_group_and_no_decay_rule_is_the_trainers():
    model = tiny_lora_llama(modules_to_save=["lm_head"])
    for module in model.modules():  # give the head a bias: the Trainer does not decay biases
        if isinstance(module, torch.nn.Linear) and module.out_features == 32 and module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros(32))
    pairs = lorapro.find_lora_pairs(model)
    # a rule that would split every pair: A decays, B does not
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    groups = lorapro_param_groups(model, 0.1, decay_parameter_names=names)
    decay = {id(p) for p in groups[0]["params"]}
    assert all(id(p.A) in decay and id(p.B) in decay for p in pairs)
    default = lorapro_param_groups(model, 0.1)
    no_decay = {id(p) for p in default[1]["params"]}
    assert default[1]["weight_decay"] == 0.0
    assert any("bias" in n and id(p) in no_decay for n, p in model.named_parameters())
    lorapro.LoRAProAdamW(model, lr=1e-3, params=default)  # accepted: pairs are whole


def test_sgd_through_the_trainer(tmp_path):
    trainer = LoRAProTrainer(
        model=tiny_lora_llama(), args=training_args(tmp_path, max_steps=2), train_dataset=PatternDataset(8),
        lorapro_optimizer="sgd", lorapro_kwargs={"momentum": 0.9},
    )  # fmt: skip
    trainer.train()
    assert type(trainer.lorapro) is lorapro.LoRAProSGD
    assert trainer.lorapro.param_groups[0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in trainer.lorapro.state.values())


def test_bf16_with_gradient_checkpointing_and_modules_to_save(tmp_path):
    """bf16 autocast on the CPU, gradient checkpointing and a fully trained head: the loss falls,
    the head and every LoRA factor move, moments stay float32. And checkpointing changes nothing:
    in float32 the parameters equal a run without it (the failure guarded against: reentrant
    checkpointing with nothing upstream requiring a gradient gives the LoRA factors none)."""
    args = dict(max_steps=12, max_grad_norm=1.0, warmup_steps=0)
    model = tiny_lora_llama(modules_to_save=["lm_head"])
    before = trainable_state(model)
    dtypes = set()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    trainer = LoRAProTrainer(
        model=model, args=training_args(tmp_path / "bf16", bf16=True, gradient_checkpointing=True, **args),
        train_dataset=PatternDataset(8),
    )  # fmt: skip
    trainer.train()
    assert dtypes == {torch.bfloat16}  # autocast really ran the LoRA layers in bf16
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 0.05, losses
    after = trainable_state(model)
    assert any("modules_to_save" in n for n in after)
    for name in after:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
        assert after[name].dtype == torch.float32
    assert all(v.dtype == torch.float32 for s in trainer.lorapro.state.values() for v in s.values())

    results = []
    for gc in (True, False):
        t = LoRAProTrainer(
            model=tiny_lora_llama(modules_to_save=["lm_head"]),
            args=training_args(tmp_path / f"gc{gc}", gradient_checkpointing=gc, **{**args, "max_steps": 3}),
            train_dataset=PatternDataset(8),
        )
        t.train()
        results.append(trainable_state(t.model))
    assert_same_params(results[0], results[1], atol=1e-6)


@pytest.mark.parametrize(("mode", "weight_decay"), [("efficient", 0.1), ("full", 0.1)])
def test_resume_equals_uninterrupted_run(tmp_path, mode, weight_decay):
    """Checkpoint at step 3 of 6, resume in a fresh Trainer with a freshly built model: the end
    state equals the uninterrupted run's (optimizer moments, scheduler and, in full mode, the
    decayed base weights all come back from the checkpoint)."""
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=weight_decay)
    if mode == "full":
        kw["learning_rate"] = 3e-3

    def run(out, resume=None):
        model = tiny_lora_llama(random_b=True)
        trainer = LoRAProTrainer(
            model=model, args=training_args(out, **kw), train_dataset=PatternDataset(8),
            lorapro_kwargs={"mode": mode},
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        bases = {p.name: p.base_weight.detach().clone() for p in trainer.lorapro.pairs}
        return trainable_state(model), bases

    expected, expected_bases = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    assert (checkpoint / BASE_WEIGHTS_NAME).is_file() == (mode == "full")
    resumed, resumed_bases = run(tmp_path / "resumed", resume=str(checkpoint))
    assert_same_params(resumed, expected, atol=1e-7)
    for name in expected_bases:
        torch.testing.assert_close(resumed_bases[name], expected_bases[name], rtol=0, atol=1e-7)

    # The comparison can fail: resuming without the optimizer state ends elsewhere.
    stripped = tmp_path / "stripped"
    shutil.copytree(checkpoint, stripped)
    os.remove(stripped / "optimizer.pt")
    without_state, _ = run(tmp_path / "nostate", resume=str(stripped))
    assert any(not torch.allclose(without_state[n], expected[n], rtol=0, atol=1e-5) for n in expected)
    if mode == "full":  # and a full-mode checkpoint without the decayed base weights is refused
        os.remove(stripped / BASE_WEIGHTS_NAME)
        with pytest.raises(lorapro.LoRAProConfigError, match="scales the base weights in place"):
            run(tmp_path / "nobase", resume=str(stripped))


def test_stock_trainer_hook_refuses_full_mode_with_weight_decay(tmp_path):
    """The stock Trainer's checkpoints hold only the adapter, not the base weights full mode
    decays: refused up front rather than resumed wrong."""
    args = training_args(tmp_path, weight_decay=0.1)
    with pytest.raises(lorapro.LoRAProConfigError, match="LoRAProTrainer"):
        lorapro_optimizer_cls_and_kwargs(args, mode="full")
    lorapro_optimizer_cls_and_kwargs(training_args(tmp_path, weight_decay=0.0), mode="full")  # fine
