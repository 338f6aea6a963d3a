"""GPU check of lorapro.attach: correctness on the device, and the training-step overhead.

1. Correctness: a small Llama-shaped LoRA model trained 5 steps by ``lorapro.attach`` + torch
   AdamW (fused) and by ``LoRAProAdamW`` (efficient mode), in float32 and in bfloat16 parameters.
   Prints the largest parameter difference between the two, and, as the scale that difference
   must be small against, the difference from plain LoRA (torch AdamW without attach).
2. Overhead: whole training steps (forward, backward, optimizer) of a Llama-shaped model in bf16
   (``--blocks`` decoder blocks of Llama-2-7B shapes by default, batch ``--batch`` x ``--seq``
   tokens, LoRA r = 8 on every linear layer): plain LoRA + fused AdamW against attach + fused
   AdamW, steps interleaved, median step time and the overhead in %.

    PYTHONPATH=src python benchmarks/gpu_check.py                 # on a CUDA machine
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --small   # a quick run anywhere
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorapro

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden: int, intermediate: int, heads: int, blocks: int, vocab: int, dtype, device, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LINEAR, init_lora_weights=False)
    return get_peft_model(base, lora)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model, lr: float, fused: bool):
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0, fused=fused)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def correctness(device, dtype, small: bool) -> None:
    dims = (64, 128, 4, 2, 128) if small else (512, 1376, 8, 2, 1000)
    reference = llama(*dims, dtype=dtype, device=device)
    attached, plain = copy.deepcopy(reference), copy.deepcopy(reference)
    fused = device.type == "cuda" or dtype in (torch.float32, torch.float64)
    runs = {
        "LoRAProAdamW": (reference, lorapro.LoRAProAdamW(reference, lr=1e-3)),
        "attach + AdamW": (attached, adamw(attached, lr=1e-3, fused=fused)),
        "plain LoRA": (plain, adamw(plain, lr=1e-3, fused=fused)),
    }
    handle = lorapro.attach(attached)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, dims[-1], (4, 64), generator=g).to(device)
    for _ in range(5):
        for model, opt in runs.values():
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    handle.remove()

    def distance(a, b):
        pairs = zip(trainable(a), trainable(b), strict=True)
        return max((x.float() - y.float()).abs().max().item() for x, y in pairs)

    to_ref = distance(attached, reference)
    to_plain = distance(plain, reference)
    print(
        f"correctness {str(dtype).removeprefix('torch.')}: max |attach+AdamW - LoRAProAdamW| = {to_ref:.2e}; "
        f"max |plain LoRA - LoRAProAdamW| = {to_plain:.2e} (ratio {to_ref / to_plain:.1e})"
    )


def overhead(device, small: bool, blocks: int, batch: int, seq: int, steps: int) -> None:
    dims = (64, 160, 4, blocks, 128) if small else (4096, 11008, 32, blocks, 32000)
    plain = llama(*dims, dtype=torch.bfloat16, device=device)
    attached = copy.deepcopy(plain)
    handle = lorapro.attach(attached)
    fused = device.type == "cuda"
    runs = {
        "LoRA + AdamW (fused)": (plain, adamw(plain, lr=1e-5, fused=fused)),
        "attach + AdamW (fused)": (attached, adamw(attached, lr=1e-5, fused=fused)),
    }
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, dims[-1], (batch, seq), generator=g).to(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(steps + 3):  # three warm-up steps
        for key, (model, opt) in runs.items():
            sync(device)
            start = time.perf_counter()
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= 3:
                times[key].append(time.perf_counter() - start)
    base, pro = (statistics.median(t) for t in times.values())
    n_pairs = len(handle.pairs)
    print(
        f"overhead: {blocks} blocks of hidden {dims[0]} / intermediate {dims[1]}, {n_pairs} LoRA layers r=8, "
        f"batch {batch} x {seq}, bf16, {steps} steps each: LoRA {base * 1e3:.1f} ms, LoRA-Pro (attach) "
        f"{pro * 1e3:.1f} ms per step, overhead {pro / base - 1:+.2%}"
    )
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a quick run on any device")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for dtype in (torch.float32, torch.bfloat16):
        correctness(device, dtype, args.small)
    overhead(device, args.small, args.blocks, args.batch, args.seq, args.steps)


if __name__ == "__main__":
    main()
