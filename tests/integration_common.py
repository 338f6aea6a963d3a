"""Tiny models and data shared by the integration tests and the processes they launch.

Everything is built from a config with a fixed seed (nothing comes from a model hub), small
enough that a Trainer step takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 32
SEQ = 12


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_lora_llama(seed: int = 0, r: int = 4, modules_to_save=None, random_b: bool = False, **config):
    """A 2-layer Llama with LoRA on q, v, up and down. ``random_b=True`` starts from B != 0 so
    the closed form is exercised away from PEFT's B = 0 initialisation (and FSDP tests see
    non-trivial Gram matrices from step 1)."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(**config))
    lora = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        modules_to_save=modules_to_save, init_lora_weights=not random_b,
    )  # fmt: skip
    return get_peft_model(base, lora)


def pattern_tokens(n: int, seed: int = 1) -> torch.Tensor:
    """Sequences that count up by a per-sequence step (1 or 2) mod VOCAB from a random start:
    learnable in a few steps, so a falling loss means the optimizer works."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


class PatternDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 1):
        self.tokens = pattern_tokens(n, seed)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the batch (all sequences have the same length, so
    the mean over a global batch is the mean of equal-sized micro-batch means)."""
    return model(input_ids=tokens, labels=tokens).loss


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, with wrapper prefixes (DDP's ``module.``) removed."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name.removeprefix("module.")] = p.detach().clone()
    return out
