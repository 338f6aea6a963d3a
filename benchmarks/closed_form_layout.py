"""Why the closed form runs the way it does on the CPU: two measurements behind adjust_pairs.

1. Skinny matmuls by operand layout (m = 4096 and 11008, r = 8): ``B^T B`` and ``B^T grad_B``
   as two matmuls on the (m, r) factors, against one matmul ``B^T [B, grad_B]`` on their
   concatenation (including the copy that builds it).
2. The whole adjustment (``adjust_pairs``) of 4 Llama-2-7B blocks, per layer against stacked by
   shape, interleaved: median wall time and minor page faults per call (fresh gradients
   every call, as in training).

Example: python benchmarks/closed_form_layout.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from step_overhead import build_model, lora_params, set_grads

import lorapro
from lorapro._base import PairWork, adjust_pairs


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


def stacking(blocks: int, rank: int, repeats: int) -> None:
    model = build_model(blocks, rank)
    params = lora_params(model)
    pairs = lorapro.find_lora_pairs(model)
    samples: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for i in range(repeats + 2):
        for stack in (False, True):
            set_grads(params, seed=i)
            works = [PairWork(p, p.scaling, p.A, p.B, p.A.grad, p.B.grad) for p in pairs]
            faults, start = minor_faults(), time.perf_counter()
            adjust_pairs(works, lambda w: "sylvester", stack=stack)
            elapsed, faults = time.perf_counter() - start, minor_faults() - faults
            if i >= 2:  # the first calls grow the heap
                samples[stack].append((elapsed, faults))
    print(f"\n| adjust_pairs, {blocks} blocks, r = {rank} | median ms | median minor page faults |")
    print("|---|---|---|")
    for stack, rows in samples.items():
        name = "stacked by shape (GPU path)" if stack else "per layer (CPU path)"
        ms = statistics.median(t for t, _ in rows) * 1e3
        print(f"| {name} | {ms:.1f} | {statistics.median(f for _, f in rows):.0f} |")


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
        stacking(args.blocks, args.rank, args.repeats)


if __name__ == "__main__":
    main()
