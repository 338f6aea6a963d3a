"""LoRA-Pro with the optimizer you already use: lorapro.attach(model), then any optimizer.

    python examples/attach_any_optimizer.py                          # torch AdamW (fused on CPU)
    python examples/attach_any_optimizer.py --optimizer adamw8bit    # bitsandbytes AdamW8bit
    python examples/attach_any_optimizer.py --optimizer adafactor    # transformers' Adafactor
    python examples/attach_any_optimizer.py --trainer --optimizer adamw_torch_fused   # Trainer + callback
    torchrun --nproc_per_node 2 examples/attach_any_optimizer.py --trainer \
        --deepspeed examples/deepspeed/trainer_zero2.json        # the Trainer's deepspeed= + callback

After ``lorapro.attach(model)``, every backward leaves LoRA-Pro's adjusted gradients in the
LoRA factors' ``.grad`` (efficient mode, Algorithm 2, with an AdamW-like optimizer; Algorithm 1
with SGD). Accumulation, clipping (of the adjusted gradients) and the optimizer need nothing
else. In a Trainer, ``callbacks=[LoRAProCallback()]`` does the same with any ``optim=``, also
with ``deepspeed=`` (the Trainer's optimizer, or the config's ``optimizer`` section, then steps
LoRA-Pro's gradients under ZeRO-1/2/3).
"""

from __future__ import annotations

import tempfile

import torch
from common import CountingDataset, default_lr, lora_model, parser, tear_down_distributed

import lorapro


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    raise SystemExit(f"unknown --optimizer {name!r}: adamw, sgd, adamw8bit or adafactor")


def loop(args) -> list[float]:
    model = lora_model(args)
    handle = lorapro.attach(model)  # before the optimizer or after: both work
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optimizer, params, default_lr(args))
    loader = torch.utils.data.DataLoader(CountingDataset(), batch_size=8, shuffle=True)
    losses: list[float] = []
    model.train()
    while len(losses) < args.steps:
        micro = []
        for batch in loader:
            loss = model(**batch).loss / args.accumulation
            loss.backward()  # .grad now holds LoRA-Pro's gradients (summed over micro-batches)
            micro.append(loss.item())
            if len(micro) == args.accumulation:
                torch.nn.utils.clip_grad_norm_(params, 1.0)  # clips the adjusted gradients
                optimizer.step()
                optimizer.zero_grad()
                losses.append(sum(micro))
                micro = []
                if len(losses) == args.steps:
                    break
    layers = len(handle.pairs)
    print(f"attach + {args.optimizer}: {layers} LoRA layers, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    handle.remove()
    return losses


def trainer(args) -> list[float]:
    from transformers import Trainer, TrainingArguments

    from lorapro.integrations.trainer import LoRAProCallback

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="lorapro-attach-"), max_steps=args.steps,
        per_device_train_batch_size=8, gradient_accumulation_steps=args.accumulation,
        learning_rate=default_lr(args), optim=args.optimizer, max_grad_norm=1.0,
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, deepspeed=args.deepspeed,
    )  # fmt: skip
    trainer = Trainer(
        model=lora_model(args), args=training_args, train_dataset=CountingDataset(),
        callbacks=[LoRAProCallback()],
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise SystemExit("the Trainer did not enable DeepSpeed (launch with torchrun)")
    engine = f"Trainer + {type(trainer.model_wrapped).__name__}"
    if training_args.process_index == 0:
        print(
            f"{engine}, optim={args.optimizer!r} + LoRAProCallback: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    return losses


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--optimizer", default=None, help="loop: adamw (default), sgd, adamw8bit, adafactor; "
                   "--trainer: any Trainer optim string (default adamw_torch_fused)")  # fmt: skip
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--trainer", action="store_true", help="a stock Trainer with LoRAProCallback")
    p.add_argument("--deepspeed", default=None, help="with --trainer: a DeepSpeed JSON config (torchrun)")
    args = p.parse_args(argv)
    if args.mode != "efficient":
        raise SystemExit("attach gives efficient mode; full mode needs lorapro.LoRAProAdamW(mode='full')")
    if args.optimizer is None:
        args.optimizer = "adamw_torch_fused" if args.trainer else "adamw"
    if not args.trainer:
        return {"losses": loop(args)}
    losses = trainer(args)  # the Trainer (and its DeepSpeed engine) is freed when it returns
    if torch.distributed.is_initialized():  # torchrun: the Trainer made a process group
        tear_down_distributed()
    return {"losses": losses}


if __name__ == "__main__":
    main()
