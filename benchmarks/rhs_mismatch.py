"""How far ``grad_A A^T`` and ``B^T grad_B`` are apart in real training, by precision and by penalty.

For LoRA's own gradients of a loss that sees the factors only through ``B A`` the two r x r
terms are equal (both are ``s B^T G A^T``), which lets ``lorapro.attach`` take X's right-hand
side from B's gradient inside backward. They differ by rounding (float32; far more under bf16
autocast, whose products round to 8 bits) and by any loss term in the factors themselves. This
script trains LoRA (plain AdamW, no lorapro involved) on real models and prints the largest
relative difference ``||R - S||_F / max(||R||_F, ||S||_F)`` over layers and steps, for float32,
bf16 autocast, and float32 with an L2 penalty ``lam * sum ||factor||^2`` on the factors; and the
limits lorapro.attach applies (``RHS_MISMATCH_LIMITS``, by the gradients' precision), which must
sit well above rounding and below the smallest penalty that matters.

Example: python benchmarks/rhs_mismatch.py --models minilm,smollm2 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from train_step_overhead import SETUPS  # this directory (run as a script)

from lorapro.backward_hooks import RHS_MISMATCH_LIMITS


def lora_pairs(model):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    yield module.lora_A[adapter].weight, module.lora_B[adapter].weight


def worst_ratio(model) -> float:
    worst = 0.0
    for A, B in lora_pairs(model):
        if A.grad is None or B.grad is None:
            continue
        A64, B64 = A.detach().double(), B.detach().double()
        R = A.grad.double() @ A64.T
        S = B64.T @ B.grad.double()
        size = max(torch.linalg.matrix_norm(R).item(), torch.linalg.matrix_norm(S).item())
        if size > 0:
            worst = max(worst, torch.linalg.matrix_norm(R - S).item() / size)
    return worst


def run(model, batch, steps: int, autocast: bool, penalty: float) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    worst = 0.0
    for _ in range(steps):
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with cast:
            loss = model(**batch).loss
        if penalty:
            loss = loss + penalty * sum((f**2).sum() for pair in lora_pairs(model) for f in pair)
        loss.backward()
        worst = max(worst, worst_ratio(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--penalties", default="1e-6,1e-5,1e-4,1e-3,1e-2")
    args = parser.parse_args()
    limits = ", ".join(f"{str(d).removeprefix('torch.')} {v:.0e}" for d, v in RHS_MISMATCH_LIMITS.items())
    print(f"torch {torch.__version__}; lorapro.attach's limits: {limits}")
    print("| model | gradients | largest relative ||R - S|| over layers and steps |")
    print("|---|---|---|")
    for name in args.models.split(","):
        base, batch = SETUPS[name.strip()](args.batch_size, args.seq_len)
        configs = [("float32", False, 0.0), ("bf16 autocast", True, 0.0)]
        configs += [(f"float32, penalty {p}", False, float(p)) for p in args.penalties.split(",")]
        for label, autocast, penalty in configs:
            worst = run(copy.deepcopy(base), batch, args.steps, autocast, penalty)
            print(f"| {name} | {label} | {worst:.2e} |", flush=True)


if __name__ == "__main__":
    main()
