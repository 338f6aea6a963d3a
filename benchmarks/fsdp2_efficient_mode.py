"""Efficient mode under FSDP2, two ways, side by side: ``lorapro.attach`` + torch AdamW against
``lorapro.LoRAProAdamW(mode="efficient")`` on the shards (lorapro's placement), on 2 gloo ranks on the CPU.

Two identical Llama-shaped models (LoRA r = 8 on every linear layer), each ``fully_shard``-ed per
decoder layer and at the root, train side by side in the same process group, steps interleaved.
Prints, per way, the median training-step time and its optimizer part, what lorapro itself sent
into collectives per step, and the largest parameter difference between the two ways at the
end (both are LoRA-Pro's efficient mode: equal up to float32 rounding).

    python benchmarks/fsdp2_efficient_mode.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(args, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


def shard(model, place=None):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    return model


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import lorapro
    from lorapro.integrations.fsdp import full_state, lora_shard_placement_fn

    hyper = {"lr": 1e-3, "weight_decay": 0.01}
    attached = shard(build(args))
    lorapro.attach(attached)
    attach_opt = torch.optim.AdamW([p for p in attached.parameters() if p.requires_grad], **hyper)
    owned = build(args)
    owned = shard(owned, lora_shard_placement_fn(owned))
    owned_opt = lorapro.LoRAProAdamW(owned, **hyper, mode="efficient")
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 1024, (args.batch, args.seq), generator=g)
    runs = {"attach + torch AdamW": (attached, attach_opt), "LoRAProAdamW on the shards": (owned, owned_opt)}
    times = {k: ([], []) for k in runs}
    opt_of = {name: opt for name, (_, opt) in runs.items()}
    for step in range(args.steps + 2):
        for name, (model, opt) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            model(input_ids=tokens, labels=tokens).loss.backward()
            mid = time.perf_counter()
            opt.step()
            opt.zero_grad()
            end = time.perf_counter()
            if step >= 2:  # warm-up
                times[name][0].append(end - start)
                times[name][1].append(end - mid)
    a, b = full_state(attached), full_state(owned)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    if rank == 0:
        shape = f"{args.layers} layers of width {args.hidden}, r = {args.rank}"
        print(
            f"{world} gloo ranks, {shape}, micro-batch {args.batch} x {args.seq} per rank, "
            f"{args.steps} steps each, torch {torch.__version__}"
        )
        print("| way | median step ms | median optimizer ms | lorapro's collectives per step (numbers) |")
        print("|---|---|---|---|")
        for name in runs:
            step_ms = 1e3 * statistics.median(times[name][0])
            opt_ms = 1e3 * statistics.median(times[name][1])
            comm = dict(owned_opt.comm_numel) if opt_of[name] is owned_opt else "none (no collective call)"
            print(f"| {name} | {step_ms:.1f} | {opt_ms:.2f} | {comm} |")
        print(f"largest parameter difference between the two ways after {args.steps + 2} steps: {diff:.2e}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
