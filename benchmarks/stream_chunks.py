"""Why the efficient step runs the way it does on the CPU: two measurements behind
``lorapro._solve.solve_pairs`` and ``adjusted_chunks``.

1. Operand layouts, per layer (m = 4096 and 11008, n = 4096, r = 8). The four r x r terms:
   four small matmuls on the factors and gradients as they are; the same with B and grad_B
   viewed c rows at a time (64-byte rows, ``PACKED_ROW_BYTES`` below; the library used this
   layout on the CPU until the closed form became one code path for the optimizers and
   ``lorapro.attach``) and the c diagonal blocks summed; two matmuls on the concatenations
   ``[B, grad_B]`` and ``[A; grad_A]`` built in a
   reused buffer (copies included). The B side of the adjusted gradient,
   ``grad_B @ coef + B @ coef2``: as is, and packed with block-diagonal coefficients.
2. Whole ``LoRAProAdamW`` steps (efficient mode) on 4 Llama-2-7B blocks and on MiniLM-L6-shaped
   layers with the adjusted gradients streamed in chunks of several sizes, from layer by layer
   to all at once, steps interleaved round-robin: median step time, minor page faults per
   step and the step's transient peak (see step_overhead.py). The chunk size is an internal
   constant (``lorapro._solve.CPU_CHUNK_BYTES``); this script sets it for each row.

Example: python benchmarks/stream_chunks.py
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from step_overhead import build_model, lora_params, set_grads, transient_peak_bytes

import lorapro
import lorapro._solve

#: Row width of the packed layout measured in ``layouts`` (c = 64 bytes / (r x element size)).
PACKED_ROW_BYTES = 64


def median_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def layouts(rank: int, n: int = 4096) -> None:
    """Per layer: the four r x r terms, and the B side of the adjusted gradients."""
    c = max(1, PACKED_ROW_BYTES // (rank * 4))
    print(
        f"| m | terms: four matmuls us | terms: B packed {c} rows at a time us | terms: concatenations + "
        f"two matmuls us | B side: (m, r) x (r, r) us | B side: packed, (m/{c}, {c}r) x ({c}r, {c}r) us |"
    )
    print("|---|---|---|---|---|---|")
    for m in (4096, 11008):
        cells = [median_us(f) for f in layout_candidates(m, n, rank, c)]
        print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")


def layout_candidates(m: int, n: int, rank: int, c: int) -> list:
    A, gA, B, gB = torch.randn(rank, n), torch.randn(rank, n), torch.randn(m, rank), torch.randn(m, rank)
    Bc, gBc = B.view(m // c, c * rank), gB.view(m // c, c * rank)
    out = torch.empty(4, rank, rank)
    wide = torch.empty(2, c * rank, c * rank)
    z, y = torch.empty(m, 2 * rank), torch.empty(2 * rank, n)
    b_terms, a_terms = torch.empty(rank, 2 * rank), torch.empty(2 * rank, rank)
    coef, coef2 = torch.randn(rank, rank), torch.randn(rank, rank)
    packed, packed2 = torch.block_diag(*[coef] * c), torch.block_diag(*[coef2] * c)
    out_b = torch.empty(m, rank)

    def four():
        torch.mm(B.mT, B, out=out[0])
        torch.mm(A, A.mT, out=out[1])
        torch.mm(B.mT, gB, out=out[2])
        torch.mm(gA, A.mT, out=out[3])

    def four_packed():
        torch.mm(Bc.mT, Bc, out=wide[0])
        torch.mm(A, A.mT, out=out[1])
        torch.mm(Bc.mT, gBc, out=wide[1])
        torch.mm(gA, A.mT, out=out[3])
        out[0::2] = wide.unflatten(-1, (c, rank)).unflatten(-3, (c, rank)).diagonal(dim1=1, dim2=3).sum(-1)

    def concatenated():
        torch.cat((B, gB), dim=1, out=z)
        torch.cat((A, gA), dim=0, out=y)
        torch.mm(B.mT, z, out=b_terms)
        torch.mm(y, A.mT, out=a_terms)

    def b_side():
        torch.mm(gB, coef, out=out_b).addmm_(B, coef2)

    def b_side_packed():
        torch.mm(gBc, packed, out=out_b.view(m // c, c * rank)).addmm_(Bc, packed2)

    return [four, four_packed, concatenated, b_side, b_side_packed]


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


CHUNKS = {  # row label: chunk bytes
    "layer by layer": 0,
    "256 KiB": 256 << 10,
    f"{lorapro._solve.CPU_CHUNK_BYTES >> 20} MiB (the CPU default)": lorapro._solve.CPU_CHUNK_BYTES,
    "16 MiB": 16 << 20,
    "all at once": math.inf,
}


def chunk_sizes(label: str, make_model, repeats: int) -> None:
    """LoRAProAdamW steps with each chunk size, interleaved, fresh gradients every step."""
    default = lorapro._solve.CPU_CHUNK_BYTES
    runs = {}
    for name in CHUNKS:
        model = make_model()
        params = lora_params(model)
        runs[name] = (params, lorapro.LoRAProAdamW(model, lr=1e-5))
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in CHUNKS}
    peaks = {}
    try:
        for i in range(repeats + 2):
            for name, chunk in CHUNKS.items():
                params, opt = runs[name]
                lorapro._solve.CPU_CHUNK_BYTES = chunk
                set_grads(params, seed=i)
                faults, start = minor_faults(), time.perf_counter()
                opt.step()
                elapsed, faults = time.perf_counter() - start, minor_faults() - faults
                if i >= 2:  # the first steps create the state and grow the heap
                    samples[name].append((elapsed, faults))
        for name, chunk in CHUNKS.items():
            params, opt = runs[name]
            lorapro._solve.CPU_CHUNK_BYTES = chunk
            set_grads(params, seed=repeats + 2)
            peaks[name] = transient_peak_bytes(opt.step)
    finally:
        lorapro._solve.CPU_CHUNK_BYTES = default
    layers = len(runs[next(iter(CHUNKS))][1].pairs)
    print(
        f"\n| LoRAProAdamW step, {label}, {layers} LoRA layers, chunks of | median ms | median minor page "
        "faults | transient peak MB |"
    )
    print("|---|---|---|---|")
    for name, rows in samples.items():
        ms = statistics.median(t for t, _ in rows) * 1e3
        faults = statistics.median(f for _, f in rows)
        print(f"| {name} | {ms:.2f} | {faults:.0f} | {peaks[name] / 1e6:.1f} |")


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
    chunk_sizes(f"{args.blocks} Llama-2-7B blocks", lambda: build_model(args.blocks, args.rank), args.repeats)
    chunk_sizes("MiniLM-L6 shapes", lambda: minilm_shaped(args.rank), args.repeats)


if __name__ == "__main__":
    main()
