"""LoRA-Pro on FSDP2 (torch.distributed.fsdp.fully_shard) with sharded LoRA factors.

    torchrun --nproc_per_node 2 examples/fsdp2.py --attach         # efficient mode, any optimizer
    torchrun --nproc_per_node 2 examples/fsdp2.py --mode full      # m x n moments sharded by rows
    torchrun --nproc_per_node 2 examples/fsdp2.py                  # efficient mode, LoRAProAdamW
    torchrun --nproc_per_node 2 examples/fsdp2.py --default-placement

``--attach``: ``lorapro.attach(model)`` and a stock ``torch.optim.AdamW`` on the sharded
parameters. The hooks adjust the gradients FSDP2 computes for its unsharded copies of the
factors, before its reduce-scatter; lorapro adds no collective.

Otherwise ``lorapro.LoRAProAdamW``, built after sharding, works on each rank's shards.
Shard every decoder block and the root with ``fully_shard``, passing
``lora_shard_placement_fn(model)`` so that the LoRA A factors are split by columns (B by rows is
FSDP2's default). Then the optimizer's only collective is one all-reduce of the r x r Gram terms
per step. Build the optimizer after sharding. Save with each rank's ``state_dict()`` (or
torch.distributed.checkpoint); gather with ``full_state`` for small exports.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import CountingDataset, default_lr, lora_model, parser, tear_down_distributed
from torch.distributed.fsdp import fully_shard

import lorapro
from lorapro.integrations.fsdp import full_state, lora_shard_placement_fn


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--default-placement", action="store_true", help="FSDP2's default Shard(0) for A too")
    p.add_argument("--attach", action="store_true", help="lorapro.attach + torch AdamW (efficient mode)")
    args = p.parse_args(argv)
    if args.attach and args.mode != "efficient":
        p.error("--attach runs efficient mode; full mode needs LoRAProAdamW")

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    result = train(args)  # the sharded model and its optimizer are freed when it returns
    tear_down_distributed()
    return result


def train(args) -> dict:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")

    model = lora_model(args).to(device)
    place = None if args.default_placement else lora_shard_placement_fn(model)
    for block in model.base_model.model.model.layers:
        fully_shard(block, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    if args.attach:
        lorapro.attach(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=default_lr(args), weight_decay=0.01)
    else:
        optimizer = lorapro.LoRAProAdamW(model, lr=default_lr(args), weight_decay=0.01, mode=args.mode)

    data = CountingDataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler, drop_last=True)
    losses, step = [], 0
    while step < args.steps:
        for batch in loader:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()  # FSDP2 reduce-scatters (averages) the gradients
            optimizer.step()  # r x r all-reduce, then each rank updates its shards
            optimizer.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
            step += 1
            if step >= args.steps:
                break
    # numbers sent into lorapro's collectives in the last step (attach makes none)
    traffic = {} if args.attach else dict(optimizer.comm_numel)
    params = full_state(model)  # every rank gathers the trained factors; rank 0 could save them
    if rank == 0:
        print(f"FSDP2 on {world} process(es), {args.mode} mode: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"optimizer collectives in the last step (numbers per rank): {traffic}")
    return {"losses": losses, "traffic": traffic, "gathered_numel": sum(t.numel() for t in params.values())}


if __name__ == "__main__":
    main()
