"""Optimizer step time of LoRAProAdamW's modes side by side, the factored second moments among
them, on one MiniLM-L6-shaped block (q, k, v, o: 384 x 384; up: 1536 x 384; down: 384 x 1536;
LoRA r = 8 on all six), on the CPU.

The modes' steps are interleaved in one process, so that whatever else runs on the machine slows
every mode alike. Prints the median ``optimizer.step()`` time per mode (the backward pass is not
timed) and the optimizer state kept for the LoRA factors.

    python benchmarks/factored_second_moments.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorapro

MODES = ("efficient", "full", "factored", "factored-first-moment", "factored-sm3", "factored-nmf")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(384, 384) for _ in range(4))
        self.up, self.down = nn.Linear(384, 1536), nn.Linear(1536, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.o(self.q(x) * self.k(x) + self.v(x))
        return self.down(torch.relu(self.up(h)))


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    targets = ["q", "k", "v", "o", "up", "down"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    return get_peft_model(Block(), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 5 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {mode: build() for mode in MODES}
    opts = {mode: lorapro.LoRAProAdamW(models[mode], lr=1e-4, mode=mode) for mode in MODES}
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(5 + args.steps):
        for mode in MODES:
            models[mode](x).square().mean().backward()
            start = time.perf_counter()
            opts[mode].step()
            elapsed = time.perf_counter() - start
            opts[mode].zero_grad()
            if i >= 5:
                times[mode].append(elapsed)
    for mode in MODES:
        opt = opts[mode]
        state = sum(
            t.numel()
            for pair in opt.pairs
            for p in (pair.A, pair.B)
            for key, t in opt.state[p].items()
            if key != "step"
        )
        median = 1e3 * statistics.median(times[mode])
        print(f"{mode:22s} step {median:7.1f} ms (median of {args.steps}), state on the factors {state}")


if __name__ == "__main__":
    main()
