"""LoRA-Pro as a DeepSpeed client optimizer (ZeRO stage 0), on CPU or GPU.

    pip install --no-build-isolation deepspeed     # optional; not a lorapro dependency
    torchrun --nproc_per_node 2 examples/deepspeed_zero0.py
    torchrun --nproc_per_node 2 examples/deepspeed_zero0.py --autocast bfloat16
    torchrun --nproc_per_node 2 examples/deepspeed_zero0.py --stage 2   # refused, with the reason

ZeRO stage 0 all-reduces the gradients and calls lorapro as it is. Stages 1-3 and DeepSpeed's
bf16/fp16 master-weight modes replace the optimizer's parameters by flat fp32 partitions or
copies, on which the per-layer closed form cannot run: ``lorapro.integrations.deepspeed.initialize``
refuses them with a LoRAProConfigError that says why and what to use instead. For bf16 compute
use the ``torch_autocast`` section (fp32 weights). With the Trainer, pass the same config as
``TrainingArguments(deepspeed=...)`` to ``LoRAProTrainer``.
"""

from __future__ import annotations

import torch
from common import CountingDataset, default_lr, lora_model, parser, tear_down_distributed

import lorapro
from lorapro.integrations import deepspeed as lorapro_deepspeed


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    args = p.parse_args(argv)

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9,
    }  # fmt: skip
    if args.autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": args.autocast}
    result = train(args, config)  # the engine and the optimizer are freed when it returns
    tear_down_distributed()
    return result


def train(args, config: dict) -> dict:
    model = lora_model(args)
    optimizer = lorapro.LoRAProAdamW(model, lr=default_lr(args), weight_decay=0.01, mode=args.mode)
    try:
        engine, optimizer, _, _ = lorapro_deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
    except lorapro.LoRAProConfigError as exc:
        if torch.distributed.get_rank() == 0:
            print(f"refused: {exc}")
        return {"refused": str(exc)}

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    data = CountingDataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    losses = []  # per micro-batch, rank 0's share
    while engine.global_steps < args.steps:
        for batch in loader:
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # lorapro steps at each accumulation boundary
            losses.append(loss.item())
            if engine.global_steps >= args.steps:
                break
    if rank == 0:
        print(f"DeepSpeed ZeRO-0 on {world} process(es): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"losses": losses}


if __name__ == "__main__":
    main()
