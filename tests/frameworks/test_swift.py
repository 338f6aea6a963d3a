"""LoRA-Pro in ms-swift (``lorapro-swift sft``), run in ms-swift's own venv.

The configurations are examples/frameworks/swift/sft.yaml, the one a user copies, with only the
model, data, length of the run and DeepSpeed (not installed on these CPU machines) replaced.
Two micro-batches of 2 are accumulated per step, so the first-step check also covers LoRA-Pro
applied per micro-batch before ms-swift accumulates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from framework_checks import adapter_weights, first_step, max_difference, run, run_failing, trainer_losses
from tiny_model import save_tiny_llama, write_messages_jsonl

from lorapro import LoRAProConfigError
from lorapro.integrations import swift as lorapro_swift

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/frameworks/swift/sft.yaml"
CAPTURE_PLUGIN = Path(__file__).with_name("swift_capture_plugin.py")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("swift")
    save_tiny_llama(root / "model")
    write_messages_jsonl(root / "tiny.jsonl", n=4)
    return root


def config(tiny: Path, name: str, *, lorapro: bool = True, capture: bool = False, **overrides) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg.pop("lorapro_x_mode") == "sylvester"  # the example's one LoRA-Pro line
    del cfg["deepspeed"]
    cfg.update(
        model=str(tiny / "model"),
        model_type="llama",
        torch_dtype="float32",
        template="chatml",
        dataset=[str(tiny / "tiny.jsonl")],
        max_length=256,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        save_steps=2,
        logging_steps=1,
        output_dir=str(tiny / name),
        add_version=False,
        dataloader_num_workers=0,
        dataset_num_proc=1,
        use_cpu=True,
        check_model=False,  # else ms-swift asks its hub whether the model is the latest
        report_to="none",
        seed=0,
    )
    cfg.update(overrides)
    if lorapro:
        cfg["lorapro_x_mode"] = "sylvester"
    if capture:
        cfg.update(external_plugins=[str(CAPTURE_PLUGIN)], callbacks=["capture_first_step"])
    path = tiny / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tiny) -> dict[str, str]:
    """The plain run (``swift sft``, 1 step) and the LoRA-Pro run (``lorapro-swift sft``, 4 steps,
    a checkpoint every 2), both with the capture plugin, from the same A and B != 0, clipping off
    (it would scale the two runs' gradients differently)."""
    outputs = {}
    for mode, steps in (("plain", 1), ("lorapro", 4)):
        cfg = config(tiny, mode, lorapro=mode == "lorapro", capture=True, max_steps=steps, max_grad_norm=0.0)
        env = {"CAPTURE_FIRST_STEP": str(tiny / f"{mode}.pt"), "CAPTURE_SET_FACTORS": "1"}
        command = [str(BIN / ("lorapro-swift" if mode == "lorapro" else "swift")), "sft", str(cfg)]
        outputs[mode] = run(command, cwd=tiny, env=env)
    return outputs


def test_first_step_gradients_are_lora_pro(tiny, runs):
    """What the optimizer receives at step 1 (2 accumulated micro-batches) equals Theorems 2.1 +
    2.3 (float64) applied to the plain run's accumulated LoRA gradients, at the same (A, B)."""
    assert (
        "[lorapro] LoRA-Pro is on (ms-swift): lorapro.attach adjusts the gradients of 14" in runs["lorapro"]
    )
    assert "LoRA-Pro is on" not in runs["plain"]
    result = first_step(tiny / "plain.pt", tiny / "lorapro.pt")
    print(f"\nms-swift first step: {result}")
    assert result.layers == 14  # target_modules: all-linear in 2 blocks
    assert result.error < 1e-5
    assert result.plain_distance > 0.1  # plain LoRA is far from it: the check can fail


def test_loss_falls(tiny, runs):
    losses = trainer_losses(tiny / "lorapro" / "checkpoint-4")
    print(f"\nms-swift losses: {losses}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05  # the same 4 examples at every step


def test_resumes_where_the_run_left_off(tiny, runs):
    cfg = config(
        tiny, "resumed", max_grad_norm=0.0, resume_from_checkpoint=str(tiny / "lorapro" / "checkpoint-2")
    )
    resumed = run([str(BIN / "lorapro-swift"), "sft", str(cfg)], cwd=tiny)
    assert "[lorapro] LoRA-Pro is on (ms-swift)" in resumed
    difference = max_difference(
        adapter_weights(tiny / "lorapro" / "checkpoint-4"), adapter_weights(tiny / "resumed" / "checkpoint-4")
    )
    print(f"ms-swift resumed vs uninterrupted: {difference:.2e}")
    assert difference < 1e-6


def test_plain_swift_refuses_the_lorapro_yaml(tiny):
    output = run_failing([str(BIN / "swift"), "sft", str(config(tiny, "plain-cli"))], cwd=tiny)
    assert "lorapro_x_mode" in output


def test_dora_is_refused_when_training_begins():
    """ms-swift builds its callbacks before the model reaches the trainer, and DoRA is not among
    the trainer's arguments; with the flags added by hand (``swift sft --external_plugins ...``)
    the callback refuses a DoRA model when training begins, before step 1."""
    callback = lorapro_swift.SwiftLoRAProCallback()
    model = tiny_peft_model(use_dora=True)
    with pytest.raises(LoRAProConfigError, match="DoRA"):
        callback.on_train_begin(
            *trainer_state(), model=model, optimizer=torch.optim.AdamW(model.parameters())
        )
    assert callback.handle is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tuner_type", "full"], "--tuner_type full trains no LoRA pairs"),
        (["--tuner_type", "adalora"], "--tuner_type adalora"),
        (["--use_dora", "true"], "--use_dora: DoRA"),
        (["--use_galore", "true"], "GaLore"),
        (["--optimizer", "galore"], "GaLore"),
        (["--lorap_lr_ratio", "16"], "LoRA+"),
        (["--optimizer", "lorap"], "LoRA+"),
        (["--lisa_activated_layers", "2"], "LISA"),
        (["--optim", "apollo_adamw"], "optim='apollo_adamw'"),
        (["--lorapro_x_mode", "bogus"], "lorapro_x_mode='bogus'"),
    ],
)
def test_refused_before_swift_starts(tiny, flags, message, monkeypatch):
    import importlib

    launcher = importlib.import_module("swift.cli.main")  # `swift` resolves its attributes lazily
    monkeypatch.setattr(launcher, "cli_main", lambda *a, **k: pytest.fail("ms-swift started"))
    with pytest.raises(LoRAProConfigError, match="LoRA-Pro in ms-swift") as info:
        lorapro_swift.main(["sft", str(config(tiny, "refused")), *flags])
    assert message in str(info.value)


def test_callbacks_see_swifts_parsed_arguments():
    """The same checks run on ms-swift's parsed arguments when it builds the callback (for users
    who pass --external_plugins and --callbacks themselves)."""
    from types import SimpleNamespace

    args = SimpleNamespace(tuner_type="lora", optimizer="lorap", use_galore=False, lorap_lr_ratio=16.0,
                           lisa_activated_layers=0, optim="adamw_torch")  # fmt: skip
    with pytest.raises(LoRAProConfigError, match=r"LoRA\+"):
        lorapro_swift.SwiftLoRAProCallback(args, trainer=None)
    lorapro_swift.SwiftLoRAProCallback(
        SimpleNamespace(**{**vars(args), "optimizer": None, "lorap_lr_ratio": None})
    )


def test_user_plugins_and_callbacks_are_kept():
    argv = ["--model", "m", "--callbacks", "early_stop", "--external_plugins", "a.py", "b.py",
            "--lorapro_x_mode", "zero", "--lora_rank", "8"]  # fmt: skip
    out = lorapro_swift.lorapro_argv(argv)
    assert out[:4] == ["--model", "m", "--lora_rank", "8"]
    assert out[4:] == ["--external_plugins", "a.py", "b.py", str(lorapro_swift.PLUGIN_FILE),
                       "--callbacks", "lorapro_zero", "early_stop"]  # fmt: skip


def test_a_lorapro_optimizer_with_the_callback_is_refused():
    """ms-swift's optimizer registry (--optimizer NAME) can hold a lorapro optimizer registered by
    another plugin; with the callback it would adjust the gradients twice."""
    from lorapro import LoRAProAdamW

    model = tiny_peft_model()
    callback = lorapro_swift.SwiftLoRAProCallback()
    with pytest.raises(LoRAProConfigError, match="adjust the gradients twice"):
        callback.on_train_begin(*trainer_state(), model=model, optimizer=LoRAProAdamW(model, lr=1e-3))


def tiny_peft_model(**lora):
    import peft

    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    return peft.get_peft_model(layer, peft.LoraConfig(r=2, target_modules=["0"], **lora))


def trainer_state():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    return (
        TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
        TrainerState(),
        TrainerControl(),
    )
