"""LoRA-Pro in a hand-written Accelerate loop: prepare(), accumulate(), mixed precision.

    python examples/accelerate_loop.py --mixed-precision bf16          # one process (CPU: bf16 autocast)
    accelerate launch --num_processes 2 examples/accelerate_loop.py    # data parallel
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu      # same, gloo on the CPU

Build the optimizer from the (unwrapped) PEFT model before ``prepare``; Accelerate wraps it
without touching the LoRA factors, skips its step while accumulating, and all-reduces the
gradients before the step that runs. With FSDP2 (``--fsdp2``-style Accelerate configs) the
same code works: Accelerate swaps the optimizer's parameters for sharded DTensors inside
``prepare``, and the lorapro optimizers follow the swap and work on the shards.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from common import CountingDataset, default_lr, lora_model, parser

import lorapro


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.accumulation,
        cpu=args.cpu or not torch.cuda.is_available(),
    )  # fmt: skip
    model = lora_model(args)
    optimizer = lorapro.LoRAProAdamW(model, lr=default_lr(args), weight_decay=0.01, mode=args.mode)
    loader = torch.utils.data.DataLoader(CountingDataset(), batch_size=8, shuffle=True)
    # Accelerate steps a prepared scheduler once per process per optimizer step: count them all.
    total = args.steps * accelerator.num_processes + 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    losses, step = [], 0
    model.train()
    while step < args.steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()  # a no-op while accumulating
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                losses.append(accelerator.gather(loss.detach()).mean().item())
                step += 1
                if step >= args.steps:
                    break
    if accelerator.is_main_process:
        print(
            f"{accelerator.num_processes} process(es), mixed precision {args.mixed_precision}: "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    accelerator.end_training()
    return {"losses": losses}


if __name__ == "__main__":
    main()
