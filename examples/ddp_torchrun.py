"""LoRA-Pro with plain PyTorch DDP under torchrun (CPU/gloo or GPU/nccl).

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --mode full --accumulation 4

The optimizer may be built from the DDP-wrapped model (pairs are found by module, and DDP is a
module containing the PEFT model). ``optimizer.step()`` runs after ``backward`` has all-reduced
(averaged) the gradients, so the closed form sees the global-batch gradient and every rank
computes the same update: no extra communication. Accumulate micro-batches under ``no_sync``
and step once.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import CountingDataset, default_lr, lora_model, parser, tear_down_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

import lorapro


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args(argv)

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    losses = train(args)  # the DDP model and its optimizer are freed when it returns
    tear_down_distributed()
    return {"losses": losses}


def train(args) -> list[float]:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = DDP(lora_model(args).to(device), device_ids=[device] if cuda else None)
    optimizer = lorapro.LoRAProAdamW(model, lr=default_lr(args), weight_decay=0.01, mode=args.mode)
    data = CountingDataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch, sampler=sampler, drop_last=True)

    losses, step, epoch = [], 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        while step < args.steps:
            micro = [next(batches, None) for _ in range(args.accumulation)]
            if micro[-1] is None:
                break
            for i, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                last = i == len(micro) - 1
                with model.no_sync() if not last else torch.enable_grad():  # all-reduce once
                    loss = model(**batch).loss / len(micro)
                    loss.backward()
            optimizer.step()  # on the averaged gradients
            optimizer.zero_grad()
            total = loss.detach() * len(micro)
            dist.all_reduce(total)
            losses.append(total.item() / world)
            step += 1
        epoch += 1
    if rank == 0:
        print(f"DDP on {world} process(es), {args.mode} mode: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses


if __name__ == "__main__":
    main()
