"""Worker for tests/test_resume_process.py: train, checkpoint, and resume in separate processes.

    python tests/resume_worker.py save DIR     # every config: K steps, torch.save model + optimizer
    python tests/resume_worker.py resume DIR   # every config: fresh model (other seed), load, K more steps

The test imports this module for the uninterrupted reference run, so the model, the batches and the
optimizer settings exist in one place. Everything runs on one CPU thread: a bitwise comparison across
processes needs the same reduction order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro

STEPS_BEFORE = 3
STEPS_AFTER = 3


@dataclass(frozen=True)
class Config:
    kind: str  # "sgd" or "adamw"
    mode: str | None  # AdamW mode
    x_mode: str
    dtype: str  # "float32" or "bfloat16"
    scaler: bool = False  # train through torch.amp.GradScaler("cpu") (its state is checkpointed too)

    @property
    def name(self) -> str:
        scaler = "-scaler" if self.scaler else ""
        return f"{self.mode or self.kind}-{self.x_mode}-{self.dtype}{scaler}"


CONFIGS = (
    [
        Config(kind, mode, x_mode, dtype)
        for dtype in ("float32", "bfloat16")
        for kind, mode in (("sgd", None), ("adamw", "efficient"), ("adamw", "full"))
        for x_mode in lorapro.X_MODES
    ]
    + [Config("adamw", "efficient", "sylvester", "float32", scaler=True)]
    + [Config("adamw", "factored", "sylvester", dtype) for dtype in ("float32", "bfloat16")]
)


class Net(nn.Module):
    """LoRA on an Embedding, a Conv2d and a Linear layer; the head is trained fully (modules_to_save)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.hidden = nn.Linear(72, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        x = torch.tanh(self.conv(self.emb(ids).unsqueeze(1))).flatten(1)
        return self.head(torch.tanh(self.hidden(x)))


def build_model(config: Config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=3, lora_alpha=6, target_modules=["emb", "conv", "hidden"], modules_to_save=["head"],
        init_lora_weights=False,
    )  # fmt: skip
    return get_peft_model(Net(), lora).to(getattr(torch, config.dtype))


def build_optimizer(config: Config, model: nn.Module):
    if config.kind == "sgd":
        opt = lorapro.LoRAProSGD(model, lr=0.05, momentum=0.9, weight_decay=0.01, x_mode=config.x_mode)
    else:
        lr = 3e-3 if config.mode == "efficient" else 1e-3
        # full mode refuses weight decay on bf16 base weights (it would round away)
        wd = 0.0 if (config.mode in ("full", "factored") and config.dtype != "float32") else 0.01
        opt = lorapro.LoRAProAdamW(model, lr=lr, weight_decay=wd, mode=config.mode, x_mode=config.x_mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8**step)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2, enabled=config.scaler)
    return opt, sched, scaler


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 12, (8, 4), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(model, opt, sched, scaler, first_step: int, steps: int) -> None:
    for step in range(first_step, first_step + steps):
        ids, y = batch(step)
        scaler.scale(F.cross_entropy(model(ids).float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()


def uninterrupted(config: Config) -> dict[str, torch.Tensor]:
    model = build_model(config)
    train(model, *build_optimizer(config, model), 0, STEPS_BEFORE + STEPS_AFTER)
    return model.state_dict()


def save(directory: Path) -> None:
    for config in CONFIGS:
        model = build_model(config)
        opt, sched, scaler = build_optimizer(config, model)
        train(model, opt, sched, scaler, 0, STEPS_BEFORE)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
        }
        torch.save(checkpoint, directory / f"{config.name}.pt")


def resume(directory: Path) -> None:
    for config in CONFIGS:
        checkpoint = torch.load(directory / f"{config.name}.pt", weights_only=True)
        model = build_model(config, seed=123)  # another init: everything must come from the checkpoint
        model.load_state_dict(checkpoint["model"])
        opt, sched, scaler = build_optimizer(config, model)
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        if config.scaler:
            scaler.load_state_dict(checkpoint["scaler"])
        train(model, opt, sched, scaler, STEPS_BEFORE, STEPS_AFTER)
        torch.save(model.state_dict(), directory / f"{config.name}.final.pt")


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    phase, directory = argv[1], Path(argv[2])
    {"save": save, "resume": resume}[phase](directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
