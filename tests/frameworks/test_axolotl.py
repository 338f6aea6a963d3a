"""LoRA-Pro in axolotl (``plugins: [lorapro.integrations.axolotl.LoRAProPlugin]``), run in
axolotl's own venv.

The configurations are examples/frameworks/axolotl/lora-1b.yml, the one a user copies, with only
the model, data, length of the run and the GPU-only settings (flash attention, Triton LoRA
kernels, sample packing, bf16) replaced. It keeps the example's gradient checkpointing and LoRA
dropout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from framework_checks import adapter_weights, first_step, max_difference, run, run_failing, trainer_losses
from tiny_model import save_tiny_llama, write_alpaca

from lorapro import LoRAProConfigError
from lorapro.integrations import axolotl as lorapro_axolotl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/frameworks/axolotl/lora-1b.yml"
PLUGIN = "lorapro.integrations.axolotl.LoRAProPlugin"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("axolotl")
    save_tiny_llama(root / "model")
    write_alpaca(root / "tiny.json", n=4)
    return root


def config(tiny: Path, name: str, *, lorapro: bool = True, capture: bool = False, **overrides) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg.pop("plugins") == [PLUGIN]  # the example's LoRA-Pro lines
    cfg.update(
        base_model=str(tiny / "model"),
        datasets=[{"path": str(tiny / "tiny.json"), "ds_type": "json", "type": "alpaca"}],
        val_set_size=0,
        evals_per_epoch=None,
        output_dir=str(tiny / name),
        dataset_prepared_path=str(tiny / "prepared"),
        sequence_len=256,
        sample_packing=False,
        eval_sample_packing=False,
        micro_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=4,
        optimizer="adamw_torch",
        lr_scheduler="constant",
        learning_rate=0.01,
        warmup_ratio=0.0,
        saves_per_epoch=None,
        save_steps=2,
        logging_steps=1,
        bf16=False,
        tf32=False,
        attn_implementation="eager",
        # axolotl's Triton LoRA kernels need CUDA
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        lora_embedding_kernel=False,
        special_tokens={"pad_token": "<|endoftext|>"},
        loss_watchdog_threshold=None,  # the example's 5.0 would stop a random model (loss ln 300 = 5.7)
        seed=0,
    )
    cfg.update(overrides)
    plugins = ([PLUGIN] if lorapro else []) + (["axolotl_capture_plugin.CapturePlugin"] if capture else [])
    if plugins:
        cfg["plugins"] = plugins
    path = tiny / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl_train(tiny: Path, cfg: Path, env: dict[str, str] | None = None) -> str:
    return run([str(BIN / "axolotl"), "train", str(cfg)], cwd=tiny, env=env)


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, str]:
    """The plain run (1 step) and the LoRA-Pro run (4 steps, a checkpoint every 2), both with the
    capture plugin, from the same A and B != 0 (axolotl does not seed the LoRA initialisation),
    clipping off (it would scale the two runs' gradients differently)."""
    outputs = {}
    for mode, steps in (("plain", 1), ("lorapro", 4)):
        cfg = config(tiny, mode, lorapro=mode == "lorapro", capture=True, max_steps=steps, max_grad_norm=0.0)
        env = {"CAPTURE_FIRST_STEP": str(tiny / f"{mode}.pt"), "CAPTURE_SET_FACTORS": "1"}
        outputs[mode] = axolotl_train(tiny, cfg, env=env)
    return outputs


def test_first_step_gradients_are_lora_pro(tiny, runs):
    """What the optimizer receives at step 1 equals Theorems 2.1 + 2.3 (float64) applied to the
    plain run's LoRA gradients of the same batch, at the same (A, B), with the example's gradient
    checkpointing and LoRA dropout."""
    assert "LoRA-Pro is on (axolotl): lorapro.attach adjusts the gradients of 14" in runs["lorapro"]
    assert "LoRA-Pro is on" not in runs["plain"]
    result = first_step(tiny / "plain.pt", tiny / "lorapro.pt")
    print(f"\naxolotl first step: {result}")
    assert result.layers == 14  # the example's seven lora_target_modules in 2 blocks
    assert result.error < 1e-5
    assert result.plain_distance > 0.1  # plain LoRA is far from it: the check can fail


def test_loss_falls(tiny, runs):
    losses = trainer_losses(tiny / "lorapro" / "checkpoint-4")
    print(f"\naxolotl losses: {losses}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05  # the same 4 examples at every step


def test_resumes_where_the_run_left_off(tiny, runs):
    cfg = config(
        tiny, "resumed", max_grad_norm=0.0, resume_from_checkpoint=str(tiny / "lorapro" / "checkpoint-2")
    )
    resumed = axolotl_train(tiny, cfg)
    assert "LoRA-Pro is on (axolotl)" in resumed
    difference = max_difference(
        adapter_weights(tiny / "lorapro" / "checkpoint-4"), adapter_weights(tiny / "resumed" / "checkpoint-4")
    )
    print(f"axolotl resumed vs uninterrupted: {difference:.2e}")
    assert difference < 1e-6


def test_refused_when_the_config_is_registered(tiny):
    """axolotl runs the plugin's register() on the raw YAML: a refused setting stops the command
    before the model or the data load (and it is not swallowed like an import error)."""
    output = run_failing(
        [str(BIN / "axolotl"), "train", str(config(tiny, "dora", peft_use_dora=True))], cwd=tiny
    )
    assert "LoRAProConfigError: LoRA-Pro in axolotl: peft_use_dora" in output
    assert not (tiny / "dora").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter": None}, "no adapter (full fine-tuning) trains no LoRA pairs"),
        ({"adapter": "vera"}, "adapter: vera"),
        ({"peft_use_dora": True}, "peft_use_dora: DoRA"),
        ({"loraplus_lr_ratio": 16}, "loraplus_lr_ratio (LoRA+)"),
        ({"optimizer": "galore_adamw"}, "optim='galore_adamw'"),
        ({"optimizer": "q_galore_adamw8bit"}, "Q-GaLore"),
        ({"optimizer": "polora"}, "PoLoRA"),
        ({"optimizer": "lomo"}, "optim='lomo'"),
        ({"lisa_n_layers": 2}, "LISA"),
        ({"relora": True}, "ReLoRA"),
        ({"rl": "dpo"}, "RL trainers"),
    ],
)
def test_refused_settings(tiny, overrides, message):
    cfg = yaml.safe_load(config(tiny, "refused").read_text())
    cfg.update(overrides)
    with pytest.raises(LoRAProConfigError, match="LoRA-Pro in axolotl") as info:
        lorapro_axolotl.LoRAProPlugin().register(cfg)
    assert message in str(info.value)


def test_learning_rate_groups_that_split_a_pair_are_refused():
    """Per-module learning rates (axolotl's lr_groups, or LoRA+ by any route) that give A and B
    of one layer different rates: refused when training begins, and the hooks come off."""
    import peft
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"])
    )
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    optimizer = torch.optim.AdamW([{"params": a, "lr": 1e-3}, {"params": b, "lr": 1.6e-2}])
    callback = lorapro_axolotl.AnnouncingLoRAProCallback("axolotl")
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.raises(LoRAProConfigError, match="learning rate"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    assert callback.handle is None


def test_x_mode_is_read_from_the_yaml():
    """``lorapro_x_mode`` is a key of axolotl's config once the plugin registers its schema: it
    reaches the callback, and axolotl's validation refuses a value that is not a choice."""
    from pydantic import ValidationError

    plugin = lorapro_axolotl.LoRAProPlugin()
    assert plugin.get_input_args() == "lorapro.integrations.axolotl.LoRAProArgs"
    (callback,) = plugin.add_callbacks_post_trainer({"lorapro_x_mode": "zero"}, trainer=None)
    assert callback.x_mode == "zero"
    (callback,) = plugin.add_callbacks_post_trainer({}, trainer=None)
    assert callback.x_mode == "sylvester"
    with pytest.raises(ValidationError):
        lorapro_axolotl.LoRAProArgs(lorapro_x_mode="bogus")
