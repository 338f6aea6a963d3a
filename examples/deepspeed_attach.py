"""LoRA-Pro under DeepSpeed ZeRO-1/2/3, bf16 and ZeRO-Offload, with DeepSpeed's own optimizer.

    pip install 'lorapro[deepspeed]'
    torchrun --nproc_per_node 2 examples/deepspeed_attach.py --config examples/deepspeed/zero2.json
    torchrun --nproc_per_node 2 examples/deepspeed_attach.py --config examples/deepspeed/zero3_bf16.json
    torchrun --nproc_per_node 2 examples/deepspeed_attach.py --config examples/deepspeed/zero2_offload.json

``lorapro.attach(model)`` before ``deepspeed.initialize``: each micro-batch's LoRA gradients are
replaced by LoRA-Pro's inside backward, before DeepSpeed accumulates, reduces and partitions them,
so DeepSpeed's own AdamW (from the config's ``optimizer`` section, or any client optimizer that
is not a lorapro one) runs LoRA-Pro's efficient mode. Under ZeRO-3 the factors are partitioned;
attach takes what it needs from them in the forward pass of their own modules. The learning rate
comes from the config. Full mode needs lorapro's optimizer and ZeRO stage 0 (see
deepspeed_zero0.py).
"""

from __future__ import annotations

import json

import torch
from common import CountingDataset, lora_model, parser, tear_down_distributed

import lorapro


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="DeepSpeed JSON config with an optimizer section")
    args = p.parse_args(argv)
    if args.mode != "efficient":
        p.error("attach runs efficient mode; full mode needs lorapro's optimizer (deepspeed_zero0.py)")

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    with open(args.config) as f:
        config = json.load(f)
    result = train(args, config)  # the engine is freed when it returns
    tear_down_distributed()
    return result


def train(args, config: dict) -> dict:
    import deepspeed

    model = lora_model(args)
    handle = lorapro.attach(model)  # before initialize: DeepSpeed reduces the adjusted gradients
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    data = CountingDataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
    batch_size = config["train_micro_batch_size_per_gpu"]
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    losses = []  # per micro-batch, this rank's share
    while engine.global_steps < args.steps:
        for batch in loader:
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed's optimizer, on LoRA-Pro's gradients, at each boundary
            losses.append(loss.item())
            if engine.global_steps >= args.steps:
                break
    if rank == 0:
        stage = config["zero_optimization"]["stage"]
        print(
            f"DeepSpeed ZeRO-{stage} + lorapro.attach on {world} process(es): loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}; the A/B-only part computed {handle.basis_computations} times"
        )
    return {"losses": losses, "basis_computations": handle.basis_computations}


if __name__ == "__main__":
    main()
