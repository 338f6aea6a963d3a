"""Shared by the examples: a small causal LM with LoRA and a synthetic data set.

By default the model is a 2-layer Llama built from a config (nothing is downloaded), so every
example runs on a laptop CPU in seconds. ``--model PATH`` loads a local Hugging Face model
folder instead (any causal LM; LoRA goes on its attention and MLP projections).
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB, SEQ = 64, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="local Hugging Face model folder (default: a tiny Llama)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--lr", type=float, default=None,
        help="default: 1e-2 in efficient mode (a LoRA rate for the tiny model), 2e-3 in full and factored "
        "mode (a full fine-tuning rate): docs/choosing.md",
    )  # fmt: skip
    p.add_argument("--mode", choices=["efficient", "full", "factored"], default="efficient")
    p.add_argument("--seed", type=int, default=0)
    return p


def default_lr(args) -> float:
    return args.lr if args.lr is not None else (1e-2 if args.mode == "efficient" else 2e-3)


def base_model(args):
    """The model without LoRA (the same weights for the same --seed)."""
    torch.manual_seed(args.seed)
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def lora_model(args, modules_to_save=None):
    """The PEFT model: LoRA r=args.rank, alpha=2r, on every projection the model has."""
    base = base_model(args)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    targets = [t for t in TARGETS if t in names] or "all-linear"
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets,
        modules_to_save=modules_to_save, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(base, config)


class CountingDataset(torch.utils.data.Dataset):
    """Sequences counting up by 1 or 2 from a random start (mod vocab): easy to learn."""

    def __init__(self, n: int = 256, vocab: int = VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 3, (n, 1), generator=g)
        self.tokens = (start + step * torch.arange(SEQ)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tear_down_distributed() -> None:
    """End a distributed example: the process group is destroyed by every rank together, after
    everything that holds it is gone.

    DDP's reducer, FSDP2's state and DeepSpeed's engine keep references to the process group.
    Dropped only after ``destroy_process_group`` (as ``main`` returns), their teardown can hang
    one rank forever while the other has exited. So each example trains in a function whose
    locals are freed when it returns, then calls this: collect any reference cycle, meet at a
    barrier, destroy.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
