"""One rank of a multi-process lorapro run on the CPU (gloo on 127.0.0.1).

Launched by ``tests/test_integration_distributed.py`` the way torchrun launches a script: the
environment carries RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT. Runs the named
scenarios one after the other in the same process group and writes each rank's trainable
parameters to ``<out>/<scenario>_rank<k>.pt``; the test compares them with one process trained
on the same global batch.

Every scenario trains ``tiny_lora_llama(random_b=True)`` for STEPS steps on the 8 sequences of
``PatternDataset(8)`` (one global batch per step), so the single-process reference is the same
for all of them: ``reference_params(mode)`` below.

    python tests/distributed_worker.py OUT ddp accelerate fsdp2 ...
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorapro
from integration_common import PatternDataset, lm_loss, tiny_lora_llama, trainable_state

STEPS = 4
GLOBAL_BATCH = 8
HYPER = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
MODE_LR = {"efficient": 1e-2, "full": 2e-3}


def make_optimizer(model, mode="efficient", cls=None):
    cls = cls or lorapro.LoRAProAdamW
    return cls(model, **{**HYPER, "lr": MODE_LR[mode]}, mode=mode)


def reference_params(mode: str = "efficient") -> dict[str, torch.Tensor]:
    """One process, the whole global batch per step: what every rank must end with.
    ``mode="plain"`` is torch.optim.AdamW (plain LoRA), to tell the two apart."""
    model = tiny_lora_llama(random_b=True)
    if mode == "plain":
        lr = HYPER["lr"]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **{**HYPER, "lr": lr})
    else:
        opt = make_optimizer(model, mode)
    tokens = PatternDataset(GLOBAL_BATCH).tokens
    for _ in range(STEPS):
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
    return trainable_state(model)


def local_rows(rank: int, world: int) -> torch.Tensor:
    tokens = PatternDataset(GLOBAL_BATCH).tokens
    per = GLOBAL_BATCH // world
    return tokens[rank * per : (rank + 1) * per]


def _trainer_args(out: str, **extra):
    """TrainingArguments for STEPS steps of 2 micro-batches of 2 per rank with the HYPER settings
    of the reference (constant rate, no clipping, sequential sampling)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], adam_beta1=HYPER["betas"][0],
        adam_beta2=HYPER["betas"][1], adam_epsilon=HYPER["eps"], lr_scheduler_type="constant",
        max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no",
        train_sampling_strategy="sequential", disable_tqdm=True, seed=0, **extra,
    )  # fmt: skip


def _hf_deepspeed_config(stage: int, **zero) -> dict:
    """A DeepSpeed config in the Trainer's style: sizes and clipping from TrainingArguments."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, **zero}, "steps_per_print": 10**9,
    }  # fmt: skip


def scenario_ddp(rank: int, world: int) -> dict[str, torch.Tensor]:
    """DDP around the PEFT model, optimizer built from the DDP-wrapped model; each rank sees
    half of the batch in two micro-batches (accumulated under no_sync, the last one syncs)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(tiny_lora_llama(random_b=True))
    opt = make_optimizer(model)  # pairs found through the wrapper
    assert len(opt.pairs) == 8, len(opt.pairs)
    return _ddp_train(model, opt, rank, world)


def _ddp_train(model, opt, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Half of the global batch per rank, in two micro-batches accumulated under no_sync."""
    micro = local_rows(rank, world).chunk(2)
    for _ in range(STEPS):
        with model.no_sync():
            (lm_loss(model, micro[0]) / 2).backward()
        (lm_loss(model, micro[1]) / 2).backward()
        opt.step()
        opt.zero_grad()
    return trainable_state(model)


def _plain_adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HYPER)


def scenario_ddp_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """lorapro.attach + torch.optim.AdamW under DDP with no_sync accumulation: each micro-batch's
    gradient is adjusted on each rank before DDP's all-reduce, which equals LoRAProAdamW on the
    global batch (the adjustment is linear)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = tiny_lora_llama(random_b=True)
    lorapro.attach(inner)
    model = DDP(inner)
    return _ddp_train(model, _plain_adamw(model), rank, world)


def scenario_ddp_full(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Full mode under DDP: every rank keeps the same m x n moments and decays the same W0."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(tiny_lora_llama(random_b=True))
    opt = make_optimizer(model, "full")
    rows = local_rows(rank, world)
    for _ in range(STEPS):
        lm_loss(model, rows).backward()
        opt.step()
        opt.zero_grad()
    return trainable_state(model)


def scenario_accelerate(rank: int, world: int) -> dict[str, torch.Tensor]:
    """accelerator.prepare(model, optimizer, dataloader) with gradient accumulation over 2
    micro-batches of 2 per rank: 2 ranks x 2 x 2 = the global batch of 8 per step."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    assert accelerator.num_processes == world
    model = tiny_lora_llama(random_b=True)
    opt = make_optimizer(model)
    loader = torch.utils.data.DataLoader(PatternDataset(GLOBAL_BATCH), batch_size=2, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    steps = 0
    while steps < STEPS:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = lm_loss(model, batch["input_ids"])
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
    return trainable_state(accelerator.unwrap_model(model))


def _fsdp2_run(mode: str, lora_placement: bool) -> dict[str, torch.Tensor]:
    """FSDP2 (fully_shard on each decoder layer and the root) with the LoRA factors sharded;
    the lorapro optimizer computes the r x r Gram terms from local shards and all-reduces
    them. Each rank sees half of the global batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lorapro.integrations.fsdp import full_state, lora_shard_placement_fn

    model = tiny_lora_llama(random_b=True)
    place = lora_shard_placement_fn(model) if lora_placement else None
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    opt = lorapro.LoRAProAdamW(model, **{**HYPER, "lr": MODE_LR[mode]}, mode=mode)
    assert all(isinstance(t, DTensor) for p in opt.pairs for t in (p.A, p.B))
    rows = local_rows(dist.get_rank(), dist.get_world_size())
    for _ in range(STEPS):
        lm_loss(model, rows).backward()
        opt.step()
        opt.zero_grad()
    result = full_state(model)
    result["__comm_numel__"] = torch.tensor([opt.comm_numel.get(k, 0) for k in COMM_KEYS])
    return result


COMM_KEYS = ("gram_allreduce", "reshard_A", "full_mode_gather", "full_mode_allreduce")


def _sharded(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    from lorapro.integrations.fsdp import lora_shard_placement_fn

    model = tiny_lora_llama(seed=seed, random_b=True)
    place = lora_shard_placement_fn(model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    return model


def scenario_fsdp2_full_resume(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Full mode, checkpointed after half the steps (each rank saves its own shards of the
    model and of the DTensor m x n moments), resumed into a model built from another seed."""
    import io

    from lorapro.integrations.fsdp import full_state

    rows = local_rows(rank, world)

    def train(model, opt, steps):
        for _ in range(steps):
            lm_loss(model, rows).backward()
            opt.step()
            opt.zero_grad()

    model = _sharded()
    opt = lorapro.LoRAProAdamW(model, **{**HYPER, "lr": MODE_LR["full"]}, mode="full")
    train(model, opt, STEPS // 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    del model, opt
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model = _sharded(seed=123)
    model.load_state_dict(saved["model"])
    opt = lorapro.LoRAProAdamW(model, **{**HYPER, "lr": MODE_LR["full"]}, mode="full")
    opt.load_state_dict(saved["optimizer"])
    train(model, opt, STEPS - STEPS // 2)
    return full_state(model)


def scenario_fsdp2(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _fsdp2_run("efficient", lora_placement=True)


def scenario_fsdp2_default_placement(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _fsdp2_run("efficient", lora_placement=False)


def scenario_fsdp2_full(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _fsdp2_run("full", lora_placement=True)


def scenario_trainer_ddp(rank: int, world: int) -> dict[str, torch.Tensor]:
    """LoRAProTrainer under torchrun: the Trainer wraps the model in DDP itself; 2 ranks x 2
    micro-batches of 2 = the global batch of 8 per step."""
    import tempfile

    from lorapro.integrations.trainer import LoRAProTrainer

    with tempfile.TemporaryDirectory() as out:
        args = _trainer_args(out, ddp_backend="gloo", logging_steps=1)
        model = tiny_lora_llama(random_b=True)
        trainer = LoRAProTrainer(model=model, args=args, train_dataset=PatternDataset(8))
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
        assert type(trainer.lorapro) is lorapro.LoRAProAdamW
        return trainable_state(trainer.model)


def _ds_config(stage: int = 0, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, **extra,
    }  # fmt: skip


def _ds_train(engine, rank: int, world: int) -> None:
    micro = local_rows(rank, world).chunk(2)
    for _ in range(STEPS):
        for tokens in micro:
            engine.backward(lm_loss(engine, tokens))
            engine.step()


def scenario_deepspeed_zero0(rank: int, world: int) -> dict[str, torch.Tensor]:
    """DeepSpeed ZeRO stage 0 with lorapro as the client optimizer, 2 micro-batches accumulated by
    the engine: the engine all-reduces, then calls lorapro on the LoRA factors as they are."""
    from lorapro.integrations import deepspeed as lds

    model = tiny_lora_llama(random_b=True)
    opt = make_optimizer(model)
    engine, engine_opt, _, _ = lds.initialize(model=model, optimizer=opt, config=_ds_config())
    assert engine_opt is opt, type(engine_opt)
    _ds_train(engine, rank, world)
    return trainable_state(engine.module)


def scenario_deepspeed_zero0_autocast(rank: int, world: int) -> dict[str, torch.Tensor]:
    """ZeRO stage 0 with DeepSpeed's torch_autocast (bf16 compute, fp32 weights): supported; the
    result is bf16-noisy, so the test checks that lorapro ran, not the digits."""
    from lorapro.integrations import deepspeed as lds

    model = tiny_lora_llama(random_b=True)
    opt = make_optimizer(model)
    config = _ds_config(torch_autocast={"enabled": True, "dtype": "bfloat16"})
    engine, engine_opt, _, _ = lds.initialize(model=model, optimizer=opt, config=config)
    assert engine_opt is opt, type(engine_opt)
    dtypes = set()
    model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out: dtypes.add(out.dtype)
    )
    _ds_train(engine, rank, world)
    assert dtypes == {torch.bfloat16}, dtypes
    lds.assert_owns_pairs(opt)
    return trainable_state(engine.module)


def scenario_deepspeed_refusals(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each unsupported DeepSpeed set-up raises LoRAProConfigError naming the reason: the config
    check for ZeRO 1/2/3, bf16/fp16 master weights and an optimizer section; and, for a user who
    calls deepspeed.initialize directly with a lorapro optimizer (ZeRO 1, 2, 3, or stage 0 with
    the bf16 section), the optimizer's own check at the first step: DeepSpeed has replaced its
    parameters by flat partitions or master copies, which would otherwise get plain AdamW."""
    import deepspeed

    from lorapro.integrations import deepspeed as lds

    messages = {}
    cases = {
        "zero1": _ds_config(1), "zero2": _ds_config(2), "zero3": _ds_config(3),
        "bf16": _ds_config(bf16={"enabled": True}), "fp16": _ds_config(fp16={"enabled": True}),
        "optimizer": _ds_config(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}),
    }  # fmt: skip
    for name, config in cases.items():
        model = tiny_lora_llama(random_b=True)
        try:
            lds.initialize(model=model, optimizer=make_optimizer(model), config=config)
        except lorapro.LoRAProConfigError as exc:
            messages[name] = str(exc)
    direct = {
        "zero1_direct": _ds_config(1, zero_allow_untested_optimizer=True),
        "zero2_direct": _ds_config(2, zero_allow_untested_optimizer=True),
        "zero3_direct": _ds_config(3, zero_allow_untested_optimizer=True),
        "bf16_direct": _ds_config(0, bf16={"enabled": True}, zero_allow_untested_optimizer=True),
    }
    for name, config in direct.items():
        model = tiny_lora_llama(random_b=True)
        try:  # (bf16's master-weight optimizer already steps once inside initialize)
            opt = make_optimizer(model)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            _ds_train(engine, rank, world)
        except lorapro.LoRAProConfigError as exc:
            messages[name] = str(exc)
    expected = {
        "zero1": "flat fp32 partitions", "zero2": "flat fp32 partitions", "zero3": "flat fp32 partitions",
        "bf16": "torch_autocast", "fp16": "torch_autocast", "optimizer": "'optimizer' section",
        **dict.fromkeys(direct, "DeepSpeed manages this model's LoRA factors"),
    }  # fmt: skip
    assert messages.keys() == expected.keys(), sorted(messages)
    for name, phrase in expected.items():
        # bf16's master-weight optimizer steps the client optimizer inside initialize, before
        # it links the parameters: the optimizer sees its parameters swapped instead
        alternative = "no longer among the optimizer's parameters" if name == "bf16_direct" else phrase
        assert phrase in messages[name] or alternative in messages[name], (name, messages[name])
    return {"refused": torch.tensor(len(messages))}


def _trainer_deepspeed(stage: int) -> dict[str, torch.Tensor]:
    import tempfile

    from lorapro.integrations.trainer import LoRAProTrainer

    with tempfile.TemporaryDirectory() as out:
        args = _trainer_args(out, deepspeed=_hf_deepspeed_config(stage))
        try:
            trainer = LoRAProTrainer(
                model=tiny_lora_llama(random_b=True), args=args, train_dataset=PatternDataset(8)
            )
        except lorapro.LoRAProConfigError as exc:
            assert stage != 0 and "flat fp32 partitions" in str(exc), str(exc)
            return {"refused": torch.tensor(1)}
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
        assert type(trainer.lorapro) is lorapro.LoRAProAdamW
        return trainable_state(trainer.model)


def scenario_trainer_deepspeed_zero0(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _trainer_deepspeed(0)


def scenario_trainer_deepspeed_zero2(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _trainer_deepspeed(2)


def _count_forwards(model) -> list[int]:
    """Count the forward calls of one lora_A module (gradient checkpointing runs each twice)."""
    calls = [0]
    module = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


DS_ADAMW = {"type": "AdamW", "params": {**HYPER, "torch_adam": True, "adam_w_mode": True}}


def _deepspeed_attach(
    stage: int, zero: dict | None = None, checkpointing: bool = False, **extra
) -> dict[str, torch.Tensor]:
    """lorapro.attach before deepspeed.initialize with DeepSpeed's own optimizer section: the
    adjusted gradients are what DeepSpeed accumulates, reduces (or reduce-scatters) and steps."""
    import deepspeed

    model = tiny_lora_llama(random_b=True)
    if checkpointing:  # the forward runs again inside backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = _count_forwards(model)
    handle = lorapro.attach(model)
    config = _ds_config(stage, optimizer=extra.pop("optimizer", DS_ADAMW), **extra)
    config["zero_optimization"].update(zero or {})
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    _ds_train(engine, rank=dist.get_rank(), world=dist.get_world_size())
    assert handle.basis_computations >= STEPS, handle.basis_computations  # refreshed after every step
    assert calls[0] == (2 if checkpointing else 1) * STEPS * 2, calls  # 2 micro-batches per step
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trained, enabled=stage == 3):  # ZeRO-3: whole factors
        # fp32 copies: under the bf16 section the module holds bf16 weights
        return {k: v.float() for k, v in trainable_state(engine.module).items()}


def scenario_deepspeed_zero1_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _deepspeed_attach(1)


def scenario_deepspeed_zero2_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _deepspeed_attach(2, {"overlap_comm": False})


def scenario_deepspeed_zero2_overlap_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """overlap_comm reduces each bucket while backward still runs: the hooks have already
    replaced the gradients it reduces."""
    return _deepspeed_attach(2, {"overlap_comm": True, "reduce_bucket_size": 500})


def scenario_deepspeed_zero3_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """ZeRO-3 with every factor partitioned (no persistence): each factor is whole only around
    its own module's forward and backward; attach takes the Gram matrices in the forward."""
    return _deepspeed_attach(3, {"overlap_comm": False, "stage3_param_persistence_threshold": 0})


def scenario_deepspeed_zero3_checkpointing_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _deepspeed_attach(3, {"stage3_param_persistence_threshold": 0}, checkpointing=True)


def scenario_deepspeed_zero3_persistent_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """ZeRO-3's default: factors below stage3_param_persistence_threshold stay gathered after the
    first step (in the first step they are released like the others)."""
    return _deepspeed_attach(3, {"overlap_comm": True})


def scenario_deepspeed_zero2_offload_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """ZeRO-Offload: the optimizer state and step on the CPU, with DeepSpeed's own CPU Adam
    (built on first use)."""
    optimizer = {"type": "AdamW", "params": {**HYPER, "adam_w_mode": True}}
    return _deepspeed_attach(2, {"offload_optimizer": {"device": "cpu"}}, optimizer=optimizer)


def scenario_deepspeed_zero2_bf16_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The bf16 section: bf16 weights and gradients, fp32 master weights in DeepSpeed's optimizer."""
    return _deepspeed_attach(2, {"overlap_comm": False}, bf16={"enabled": True})


def scenario_deepspeed_zero3_bf16_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _deepspeed_attach(3, {"stage3_param_persistence_threshold": 0}, bf16={"enabled": True})


def scenario_deepspeed_zero2_bf16_plain(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The same bf16 run without attach (plain LoRA): how far bf16 alone moves the result from
    the fp32 reference, the noise floor the bf16 attach run is judged against."""
    import deepspeed

    model = tiny_lora_llama(random_b=True)
    config = _ds_config(2, optimizer=DS_ADAMW, bf16={"enabled": True})
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    _ds_train(engine, rank, world)
    return {k: v.float() for k, v in trainable_state(engine.module).items()}


def scenario_trainer_deepspeed_callback(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A stock Trainer with deepspeed= (ZeRO-2, no optimizer section: the Trainer's own torch AdamW
    becomes DeepSpeed's client optimizer) and LoRAProCallback: LoRA-Pro efficient mode."""
    import tempfile

    from transformers import Trainer

    from lorapro.integrations.trainer import LoRAProCallback

    config = _hf_deepspeed_config(2, overlap_comm=True)

    class Recording(LoRAProCallback):
        def on_train_end(self, *args, **kwargs):
            self.computed = self.handle.basis_computations  # the hooks' cache, refreshed each step
            super().on_train_end(*args, **kwargs)

    callback = Recording()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=tiny_lora_llama(random_b=True), args=_trainer_args(out, deepspeed=config),
            train_dataset=PatternDataset(8), callbacks=[callback],
        )  # fmt: skip
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
        assert callback.handle is None and callback.computed >= STEPS, callback.computed  # removed at the end
        return trainable_state(trainer.model)


def scenario_accelerate_deepspeed_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Accelerate with DeepSpeedPlugin(zero_stage=2), attach and a stock torch AdamW (DeepSpeed's
    client optimizer), gradient accumulation 2: LoRA-Pro efficient mode."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier scenarios made one without DeepSpeed
    plugin = DeepSpeedPlugin(hf_ds_config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 4 * world,
        "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
    })  # fmt: skip
    # Accelerate picks a distributed backend only for accelerators (or cpu=True, which turns
    # DeepSpeed off): on this CPU-only machine it is named explicitly.
    gloo = InitProcessGroupKwargs(backend="gloo")
    try:
        accelerator = Accelerator(
            deepspeed_plugin=plugin, gradient_accumulation_steps=2, kwargs_handlers=[gloo]
        )
        assert accelerator.distributed_type == "DEEPSPEED", accelerator.distributed_type
        assert accelerator.num_processes == world, accelerator.num_processes
        model = tiny_lora_llama(random_b=True)
        handle = lorapro.attach(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HYPER)
        loader = torch.utils.data.DataLoader(PatternDataset(GLOBAL_BATCH), batch_size=2, shuffle=False)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        assert len(loader) == 2  # 2 micro-batches of 2 per rank: one optimizer step per pass
        for _ in range(STEPS):
            for batch in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(lm_loss(model, batch["input_ids"]))
                    opt.step()
                    opt.zero_grad()
        assert model.global_steps == STEPS, model.global_steps  # the DeepSpeed engine's count
        assert handle.basis_computations >= STEPS
        return trainable_state(accelerator.unwrap_model(model))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _fsdp2_attach(
    attach_first: bool, reshard_after_forward: bool = True, per_layer: bool = True, checkpointing=False
) -> dict[str, torch.Tensor]:
    """FSDP2 (fully_shard on each decoder layer and the root), lorapro.attach, a stock torch
    AdamW on the sharded parameters; 2 micro-batches per rank accumulated (FSDP2 reduce-scatters
    each micro-batch's adjusted gradient and sums the shards)."""
    from torch.distributed.fsdp import fully_shard

    from lorapro.integrations.fsdp import full_state

    model = tiny_lora_llama(random_b=True)
    if checkpointing:  # the forward runs again inside backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = _count_forwards(model)
    handle = lorapro.attach(model) if attach_first else None
    for layer in model.base_model.model.model.layers if per_layer else ():
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    handle = handle or lorapro.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HYPER)
    micro = local_rows(dist.get_rank(), dist.get_world_size()).chunk(2)
    for _ in range(STEPS):
        for tokens in micro:
            (lm_loss(model, tokens) / len(micro)).backward()
        opt.step()
        opt.zero_grad()
    assert handle.basis_computations >= STEPS, handle.basis_computations
    assert calls[0] == (2 if checkpointing else 1) * STEPS * len(micro), calls
    return full_state(model)


def scenario_fsdp2_attach(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _fsdp2_attach(attach_first=False)


def scenario_fsdp2_attach_checkpointing(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _fsdp2_attach(attach_first=False, checkpointing=True)


def scenario_fsdp2_attach_root_only(rank: int, world: int) -> dict[str, torch.Tensor]:
    """fully_shard on the root only: one unit, unsharded for the whole forward and backward."""
    return _fsdp2_attach(attach_first=False, per_layer=False)


def scenario_fsdp2_attach_before_shard(rank: int, world: int) -> dict[str, torch.Tensor]:
    """attach before fully_shard: the next forward pass finds the sharded factors and follows them."""
    return _fsdp2_attach(attach_first=True, reshard_after_forward=False)


def scenario_attach_refusals(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A LoRA embedding sharded by FSDP2 has no lora_A / lora_B module to follow: attach raises
    LoRAProConfigError at the first forward pass instead of adjusting shards."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    from integration_common import tiny_llama_config

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), config)
    lorapro.attach(model)
    fully_shard(model.base_model.model.model.embed_tokens)  # the embedding in a unit of its own
    fully_shard(model)
    try:
        lm_loss(model, local_rows(rank, world)).backward()
    except lorapro.LoRAProConfigError as exc:
        assert "LoRA embedding is sharded (FSDP2)" in str(exc), str(exc)
        return {"refused": torch.tensor(1)}
    raise AssertionError("attach adjusted an FSDP2-sharded LoRA embedding")


def scenario_fsdp2_factored_refused(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Factored mode on FSDP2-sharded factors is not supported: the first step raises before it
    changes any parameter."""
    from lorapro.integrations.fsdp import full_state

    model = _sharded()
    before = full_state(model)
    opt = lorapro.LoRAProAdamW(model, lr=MODE_LR["full"], mode="factored")
    lm_loss(model, local_rows(rank, world)).backward()
    try:
        opt.step()
    except lorapro.LoRAProConfigError as exc:
        assert "does not support FSDP2-sharded LoRA factors" in str(exc), str(exc)
        after = full_state(model)
        assert all(torch.equal(before[k], after[k]) for k in before), "a parameter changed"
        return {"refused": torch.tensor(1)}
    raise AssertionError("factored mode stepped on FSDP2 shards")


def scenario_trainer_optimizers_zero2(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A stock Trainer handed a lorapro optimizer (optimizers=) with a ZeRO-2 config: DeepSpeed
    swaps the optimizer's parameters for a flat partition; the first step raises."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
            use_cpu=True, report_to=[], save_strategy="no", deepspeed=config, disable_tqdm=True, seed=0,
        )  # fmt: skip
        model = tiny_lora_llama(random_b=True)
        trainer = Trainer(model=model, args=args, train_dataset=PatternDataset(8),
                          optimizers=(make_optimizer(model), None))  # fmt: skip
        try:  # the Trainer drops the lorapro optimizer and builds a torch AdamW for DeepSpeed
            trainer.train()
        except lorapro.LoRAProConfigError as exc:
            assert "DeepSpeed manages this model's LoRA factors" in str(exc), str(exc)
            return {"refused": torch.tensor(1)}
    raise AssertionError("the Trainer trained plain AdamW under ZeRO-2 without an error")


def scenario_accelerate_deepspeed_plugin(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Accelerate with DeepSpeedPlugin(zero_stage=2) and a lorapro optimizer: the first step raises."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier scenarios made one without DeepSpeed
    plugin = DeepSpeedPlugin(hf_ds_config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 2}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
    })  # fmt: skip
    accelerator = Accelerator(deepspeed_plugin=plugin)  # (cpu=True would turn DeepSpeed off)
    model = tiny_lora_llama(random_b=True)
    loader = torch.utils.data.DataLoader(PatternDataset(GLOBAL_BATCH), batch_size=2, shuffle=False)
    assert accelerator.distributed_type == "DEEPSPEED", accelerator.distributed_type
    try:
        model, opt, loader = accelerator.prepare(model, make_optimizer(model), loader)
        for batch in loader:
            accelerator.backward(lm_loss(model, batch["input_ids"]))
            opt.step()
            opt.zero_grad()
    except lorapro.LoRAProConfigError as exc:
        assert "DeepSpeed manages this model's LoRA factors" in str(exc), str(exc)
        return {"refused": torch.tensor(1)}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no DeepSpeed state behind
    raise AssertionError("Accelerate's DeepSpeed plugin trained a lorapro optimizer without an error")


def _swapped_after_build(cls) -> dict[str, torch.Tensor]:
    """What Accelerate's FSDP2 ``prepare(model, optimizer)`` does (Accelerate enables FSDP only on
    accelerators, so it is replayed here with its own helper): the optimizer is built on the
    unsharded model, then the model is sharded and the optimizer's parameters are swapped for
    the sharded DTensors with ``accelerate.utils.fsdp2_switch_optimizer_parameters``."""
    from accelerate.utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    from lorapro.integrations.fsdp import full_state

    model = tiny_lora_llama(random_b=True)
    opt = cls(model, **HYPER, mode="efficient")
    before = [p for _, p in model.named_parameters()]
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    after = [p for _, p in model.named_parameters()]
    mapping = {old.data_ptr: new for old, new in zip(before, after, strict=True)}  # keyed as Accelerate does
    fsdp2_switch_optimizer_parameters(opt, mapping)
    rows = local_rows(dist.get_rank(), dist.get_world_size())
    for _ in range(STEPS):
        lm_loss(model, rows).backward()
        opt.step()
        opt.zero_grad()
    return full_state(model)


def scenario_fsdp2_accelerate_swap(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _swapped_after_build(lorapro.LoRAProAdamW)


def scenario_fsdp2_without_gram_allreduce(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Negative control: the same FSDP2 run with the Gram all-reduce switched off must NOT match
    the single-process result (so the comparison can fail)."""
    from lorapro._storage import FactorSharding

    original = FactorSharding.reduce_terms
    FactorSharding.reduce_terms = lambda self, terms: terms
    try:
        return _fsdp2_run("efficient", lora_placement=True)
    finally:
        FactorSharding.reduce_terms = original


SCENARIOS = {
    name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")
}


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A rank that fails inside a collective must not leave the other waiting forever.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for name in sys.argv[2:]:
            try:
                result = SCENARIOS[name](rank, world)
                torch.save(result, out / f"{name}_rank{rank}.pt")
            except Exception:
                (out / f"{name}_rank{rank}.err").write_text(traceback.format_exc())
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
