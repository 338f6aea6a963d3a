"""LoRA-Pro in LLaMA-Factory (``lorapro-llamafactory train``), run in LLaMA-Factory's own venv.

The configurations are examples/frameworks/llamafactory/qwen3_lora_sft.yaml, the one a user
copies, with only the model, data and length of the run replaced by a tiny offline set-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from framework_checks import adapter_weights, first_step, max_difference, run, trainer_losses
from tiny_model import save_tiny_llama, write_alpaca

from lorapro import LoRAProConfigError
from lorapro.integrations import llamafactory as lf

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/frameworks/llamafactory/qwen3_lora_sft.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llamafactory")
    save_tiny_llama(root / "model")
    (root / "data").mkdir()
    write_alpaca(root / "data" / "tiny.json")
    (root / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return root


def config(tiny: Path, name: str, *, lorapro: bool = True, **overrides) -> Path:
    """The example YAML with the tiny model and data, 4 examples in one batch, fp32 on the CPU."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg.pop("lorapro_x_mode") == "sylvester"  # the example's one LoRA-Pro line
    cfg.update(
        model_name_or_path=str(tiny / "model"),
        trust_remote_code=False,
        dataset="tiny",
        dataset_dir=str(tiny / "data"),
        template="chatml",
        cutoff_len=256,
        max_samples=4,
        preprocessing_num_workers=1,
        dataloader_num_workers=0,
        output_dir=str(tiny / name),
        logging_steps=1,
        save_steps=2,
        plot_loss=False,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1.0e-2,
        max_steps=4,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        bf16=False,
        use_cpu=True,
        seed=0,
    )
    cfg.update(overrides)
    if lorapro:
        cfg["lorapro_x_mode"] = "sylvester"
    path = tiny / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, str]:
    """The plain run (1 step) and the LoRA-Pro run (4 steps, a checkpoint every 2), both through
    LLaMA-Factory's Python entry point with the capture callback, from the same A and B != 0,
    clipping off (it would scale the two runs' gradients differently)."""
    driver = str(Path(__file__).with_name("llamafactory_driver.py"))
    outputs = {}
    for mode, steps in (("plain", 1), ("lorapro", 4)):
        cfg = config(tiny, mode, lorapro=mode == "lorapro", max_steps=steps, max_grad_norm=0.0)
        env = {"CAPTURE_FIRST_STEP": str(tiny / f"{mode}.pt"), "CAPTURE_SET_FACTORS": "1"}
        outputs[mode] = run([sys.executable, driver, mode, str(cfg)], cwd=tiny, env=env)
    return outputs


def test_first_step_gradients_are_lora_pro(tiny, runs):
    """What the optimizer receives at step 1 equals Theorems 2.1 + 2.3 (float64) applied to the
    plain run's LoRA gradients of the same batch, at the same (A, B)."""
    assert (
        "[lorapro] LoRA-Pro is on (LLaMA-Factory): lorapro.attach adjusts the gradients of 14"
        in runs["lorapro"]
    )
    assert "LoRA-Pro is on" not in runs["plain"]
    result = first_step(tiny / "plain.pt", tiny / "lorapro.pt")
    print(f"\nLLaMA-Factory first step: {result}")
    assert result.layers == 14  # q, k, v, o, gate, up, down in 2 blocks: lora_target: all
    assert result.error < 1e-5
    assert result.plain_distance > 0.1  # plain LoRA is far from it: the check can fail


def test_loss_falls(tiny, runs):
    losses = trainer_losses(tiny / "lorapro" / "checkpoint-4")
    print(f"\nLLaMA-Factory losses: {losses}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05  # the same 4 examples at every step


def test_cli_resumes_where_the_run_left_off(tiny, runs):
    """``lorapro-llamafactory train`` resumed from step 2 ends where the uninterrupted run did."""
    cfg = config(
        tiny, "resumed", max_grad_norm=0.0, resume_from_checkpoint=str(tiny / "lorapro" / "checkpoint-2")
    )
    resumed = run([str(BIN / "lorapro-llamafactory"), "train", str(cfg)], cwd=tiny)
    assert "[lorapro] LoRA-Pro is on (LLaMA-Factory)" in resumed
    difference = max_difference(adapter_weights(tiny / "lorapro"), adapter_weights(tiny / "resumed"))
    print(f"LLaMA-Factory resumed vs uninterrupted: {difference:.2e}")
    assert difference < 1e-6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetuning_type=full", "finetuning_type='full' trains no LoRA factors"),
        ("finetuning_type=freeze", "finetuning_type='freeze' trains no LoRA factors"),
        ("use_dora=true", "use_dora: DoRA"),
        ("loraplus_lr_ratio=16", "loraplus_lr_ratio (LoRA+)"),
        ("use_galore=true", "use_galore: GaLore"),
        ("use_apollo=true", "use_apollo: APOLLO"),
        ("use_badam=true", "use_badam: BAdam"),
        ("optim=galore_adamw", "optim='galore_adamw'"),
        ("optim=adalomo", "optim='adalomo'"),
        ("stage=dpo", "stage='dpo' is not supported"),
        ("lorapro_x_mode=bogus", "lorapro_x_mode='bogus' is not a choice"),
    ],
)
def test_refused_before_anything_loads(tiny, override, message, monkeypatch):
    monkeypatch.setattr(lf, "_llamafactory_run_exp", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(sys, "argv", ["lorapro-llamafactory"])  # main() points sys.argv at the YAML
    with pytest.raises(LoRAProConfigError, match="LoRA-Pro in LLaMA-Factory") as info:
        lf.main(["train", str(config(tiny, "refused")), override])
    assert message in str(info.value)


def test_llamafactory_cli_refuses_the_lorapro_yaml(tiny):
    """The example cannot silently train plain LoRA under ``llamafactory-cli``: its LoRA-Pro
    line is an unknown key there."""
    from llamafactory.hparams import get_train_args

    with pytest.raises(ValueError, match="lorapro_x_mode"):
        get_train_args(yaml.safe_load(config(tiny, "plain-cli").read_text()))


def test_arguments_on_the_command_line_work_too():
    rest, options = lf.pop_lorapro_options(["--stage", "sft", "--lorapro_x_mode", "zero", "--lora_rank=8"])
    assert rest == ["--stage", "sft", "--lora_rank=8"] and options == {"x_mode": "zero"}
    rest, options = lf.pop_lorapro_options(["--lorapro_x_mode=symmetric"])
    assert rest == [] and options == {"x_mode": "symmetric"}
    with pytest.raises(LoRAProConfigError, match="optim='galore_adamw_layerwise'"):
        lf.check_config(["--stage", "sft", "--finetuning_type", "lora", "--optim", "galore_adamw_layerwise"])
