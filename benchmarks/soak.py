"""Soak test: a tiny bf16 model trained for many steps with every optimizer mode and x_mode.

The model (an Embedding, a Linear stack and a Conv1d, LoRA on all of them, the head trained fully) is kept
in bfloat16, starts from PEFT's B = 0 initialisation and learns a fixed random teacher on fresh batches.
Each run uses nonfinite="raise", so a single NaN/Inf gradient aborts it. Reported per run: the mean loss
over the first and the last 100 steps, the loss on a held-out batch before and after, the largest parameter
magnitude, whether every parameter and state tensor is finite, and the time per step.

    python benchmarks/soak.py                     # 10,000 steps, 9 runs (3 modes x 3 x_modes)
    python benchmarks/soak.py --steps 500 --x-modes sylvester

The exit status is 1 if any run ends non-finite or without a lower loss. The slow test in
tests/test_mixed_precision.py runs a shorter version through :func:`soak`.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro

VOCAB, SEQ, DIM, CLASSES = 32, 8, 16, 4
LEARNING_RATES = {"sgd": 0.1, "efficient": 3e-3, "full": 1e-3}


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1)
        self.inp = nn.Linear(DIM, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2)  # (batch, DIM, SEQ)
        x = torch.tanh(self.conv(x)).mean(2)
        return self.head(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def teacher_labels(ids: torch.Tensor) -> torch.Tensor:
    """A fixed random labelling rule the student can learn: a random bag-of-tokens linear classifier."""
    gen = torch.Generator().manual_seed(12345)
    weights = torch.randn(VOCAB, CLASSES, generator=gen)
    return weights[ids].sum(1).argmax(1)


def make_batch(gen: torch.Generator, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return ids, teacher_labels(ids)


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["emb", "conv", "inp", "hidden"], modules_to_save=["head"]
    )
    return get_peft_model(Student(), config).to(torch.bfloat16)


@dataclass
class SoakResult:
    mode: str
    x_mode: str
    steps: int
    first_loss: float  # mean over the first 100 steps
    last_loss: float  # mean over the last 100 steps
    heldout_before: float
    heldout_after: float
    max_abs_param: float
    finite: bool
    seconds_per_step: float

    @property
    def ok(self) -> bool:
        return self.finite and self.last_loss < self.first_loss and self.heldout_after < self.heldout_before


def soak(mode: str, x_mode: str, steps: int, seed: int = 0) -> SoakResult:
    """Train one configuration for ``steps`` steps in bfloat16; mode is "sgd", "efficient" or "full"."""
    model = build(seed)
    lr = LEARNING_RATES[mode]
    if mode == "sgd":
        opt = lorapro.LoRAProSGD(model, lr=lr, momentum=0.9, weight_decay=1e-4, x_mode=x_mode)
    else:
        # Full mode decays W0 too, which bf16 cannot represent step by step (refused): no decay there.
        wd = 0.0 if mode == "full" else 0.01
        opt = lorapro.LoRAProAdamW(model, lr=lr, weight_decay=wd, mode=mode, x_mode=x_mode)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.1 * lr)
    gen = torch.Generator().manual_seed(seed + 1)
    heldout = make_batch(torch.Generator().manual_seed(999), n=512)

    def heldout_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(heldout[0]).float(), heldout[1]).item()

    before = heldout_loss()
    window = min(100, max(1, steps // 10))
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        ids, y = make_batch(gen)
        loss = F.cross_entropy(model(ids).float(), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    tensors = list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]
    return SoakResult(
        mode=mode,
        x_mode=x_mode,
        steps=steps,
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        heldout_before=before,
        heldout_after=heldout_loss(),
        max_abs_param=max(float(p.detach().abs().max()) for p in model.parameters()),
        finite=all(bool(torch.isfinite(t).all()) for t in tensors) and all(map(math.isfinite, losses)),
        seconds_per_step=elapsed / steps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--modes", default="sgd,efficient,full")
    parser.add_argument("--x-modes", default=",".join(lorapro.X_MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# lorapro soak: {args.steps} steps per run, bfloat16, torch {torch.__version__}, "
        f"{platform.machine()} {platform.processor() or ''} threads={args.threads}"
    )
    header = f"{'mode':<10} {'x_mode':<10} {'first':>7} {'last':>7} {'held-before':>11} {'held-after':>10}"
    print(header + f" {'max|p|':>7} {'finite':>6} {'ms/step':>8} {'total s':>8}")
    results = []
    for mode in args.modes.split(","):
        for x_mode in args.x_modes.split(","):
            r = soak(mode, x_mode, args.steps)
            results.append(r)
            print(
                f"{r.mode:<10} {r.x_mode:<10} {r.first_loss:7.4f} {r.last_loss:7.4f} "
                f"{r.heldout_before:11.4f} {r.heldout_after:10.4f} {r.max_abs_param:7.3f} {r.finite!s:>6} "
                f"{1e3 * r.seconds_per_step:8.2f} {r.steps * r.seconds_per_step:8.1f}",
                flush=True,
            )
    total = sum(r.steps for r in results)
    bad = [asdict(r) for r in results if not r.ok]
    print(f"# {len(results)} runs, {total} steps soaked, {len(bad)} failed")
    for b in bad:
        print("# FAILED:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
