"""LoRA-Pro in the Hugging Face Trainer: one class swap, everything else is the Trainer's.

    python examples/trainer.py                      # tiny Llama, CPU, a few seconds
    python examples/trainer.py --mode full --bf16   # Algorithm 3, bf16 autocast
    torchrun --nproc_per_node 2 examples/trainer.py # DDP (the Trainer wraps the model)
    python examples/trainer.py --resume             # stop at half, resume from the checkpoint

The optimizer comes from TrainingArguments (learning_rate, weight_decay, adam_beta1/2,
adam_epsilon) plus ``lorapro_kwargs``; gradient accumulation, max_grad_norm, the scheduler,
bf16 and checkpoints are the Trainer's own.
"""

from __future__ import annotations

import tempfile

import torch
from common import CountingDataset, default_lr, lora_model, parser
from transformers import TrainingArguments

from lorapro.integrations.trainer import LoRAProTrainer


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (works on CPU too)")
    p.add_argument("--resume", action="store_true", help="train half, then resume from the checkpoint")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="lorapro-trainer-")

    def trainer_for(max_steps: int) -> LoRAProTrainer:
        # Full mode's weight decay also decays the frozen base weights (the paper's Eq. 57-58),
        # which a PEFT adapter cannot carry: this example exports adapters, so it uses none.
        training_args = TrainingArguments(
            output_dir=out, max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            learning_rate=default_lr(args), weight_decay=0.01 if args.mode == "efficient" else 0.0,
            warmup_steps=max(1, args.steps // 10),
            lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),
            logging_steps=max(1, args.steps // 5), save_steps=max(1, args.steps // 2), report_to=[],
            seed=args.seed, disable_tqdm=True,
        )  # fmt: skip
        return LoRAProTrainer(
            model=lora_model(args), args=training_args, train_dataset=CountingDataset(),
            lorapro_kwargs={"mode": args.mode, "x_mode": "sylvester"},
        )  # fmt: skip

    trainer = trainer_for(args.steps)
    if args.resume:
        half = trainer_for(args.steps // 2)
        half.train()
        trainer.train(resume_from_checkpoint=True)  # the latest checkpoint in output_dir
    else:
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if trainer.is_world_process_zero():
        print(f"{type(trainer.lorapro).__name__}({args.mode}): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        trainer.save_model(f"{out}/adapter")  # a normal PEFT adapter
        print(f"adapter saved to {out}/adapter")
    return {"losses": losses, "output_dir": out}


if __name__ == "__main__":
    main()
