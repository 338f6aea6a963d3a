"""Why the closed form runs the way it does on the CPU: two measurements behind adjust_pairs.

1. Skinny matmuls by operand layout (m = 4096 and 11008, r = 8): ``B^T B`` and ``B^T grad_B``
   as two matmuls on the (m, r) factors, against one matmul ``B^T [B, grad_B]`` on their
   concatenation (including the copy that builds it).
2. The whole adjustment (``adjust_pairs``) of 4 Llama-2-7B blocks and of MiniLM-L6-shaped
   layers, layer by layer, in stacks of equal shape capped at 1 MiB (the CPU default) and in
   uncapped stacks (the GPU default), interleaved: median wall time and minor page faults
   per call (fresh gradients every call, as in training).

Example: python benchmarks/closed_form_layout.py
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from step_overhead import build_model, lora_params, set_grads

import lorapro
from lorapro._base import CPU_MAX_STACK_BYTES, PairWork, adjust_pairs


def median_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def layouts(rank: int) -> None:
    print("| m | B^T B + B^T gB (two matmuls) us | cat + B^T [B, gB] (one matmul) us |")
    print("|---|---|---|")
    for m in (4096, 11008):
        B, gB = torch.randn(m, rank), torch.randn(m, rank)
        two = median_us(lambda: (B.mT @ B, B.mT @ gB))  # noqa: B023
        one = median_us(lambda: B.mT @ torch.cat((B, gB), dim=1))  # noqa: B023
        print(f"| {m} | {two:.1f} | {one:.1f} |")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


MINILM_SHAPES = {  # name: (out, in), one MiniLM-L6 encoder layer's linear layers
    "query": (384, 384), "key": (384, 384), "value": (384, 384), "attn_out": (384, 384),
    "intermediate": (1536, 384), "output": (384, 1536),
}  # fmt: skip


def minilm_shaped(rank: int) -> torch.nn.Module:
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (out_f, in_f) in MINILM_SHAPES.items():
                setattr(self, name, torch.nn.Linear(in_f, out_f, bias=False))

    torch.manual_seed(0)
    targets = list(MINILM_SHAPES)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    return get_peft_model(torch.nn.Sequential(*(Layer() for _ in range(6))), config)


def stacking(label: str, model: torch.nn.Module, repeats: int) -> None:
    """adjust_pairs with stacks capped at several sizes, interleaved, fresh gradients each call."""
    params = lora_params(model)
    pairs = lorapro.find_lora_pairs(model)
    limits = {
        "layer by layer (max_stack_bytes=0)": 0,
        f"stacks <= {CPU_MAX_STACK_BYTES >> 20} MiB (the CPU default)": None,
        "whole shapes (max_stack_bytes=inf, the GPU default)": math.inf,
    }
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in limits}
    for i in range(repeats + 2):
        for name, limit in limits.items():
            set_grads(params, seed=i)
            works = [PairWork(p, p.scaling, p.A, p.B, p.A.grad, p.B.grad) for p in pairs]
            faults, start = minor_faults(), time.perf_counter()
            adjust_pairs(works, lambda w: "sylvester", max_stack_bytes=limit)
            elapsed, faults = time.perf_counter() - start, minor_faults() - faults
            if i >= 2:  # the first calls grow the heap
                samples[name].append((elapsed, faults))
    print(f"\n| adjust_pairs, {label}, {len(pairs)} LoRA layers | median ms | median minor page faults |")
    print("|---|---|---|")
    for name, rows in samples.items():
        ms = statistics.median(t for t, _ in rows) * 1e3
        print(f"| {name} | {ms:.2f} | {statistics.median(f for _, f in rows):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rank {args.rank}\n")
    with torch.no_grad():
        layouts(args.rank)
        stacking(f"{args.blocks} Llama-2-7B blocks", build_model(args.blocks, args.rank), args.repeats)
        stacking("MiniLM-L6 shapes", minilm_shaped(args.rank), args.repeats)


if __name__ == "__main__":
    main()
