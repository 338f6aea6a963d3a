"""A tiny random-init Llama with a byte-level BPE tokenizer, and a few chat examples, written
as a Hugging Face model folder that every framework loads offline (nothing is downloaded).

Only transformers and tokenizers are used, so this runs inside each framework's own venv.
"""

from __future__ import annotations

import json
from pathlib import Path

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
#: ChatML, the template the three frameworks ship under the name ``chatml``.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]


def examples(n: int = 16) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs: small sums in words, deterministic."""
    pairs = []
    for i in range(n):
        a, b = i % 6, (3 * i + 1) % 6
        pairs.append(
            (
                f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
            )
        )
    return pairs


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"user\n{q}\nassistant\n{a}\nsystem\nYou are a helpful assistant." for q, a in examples(64)]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOT, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-32 Llama (float32) and its tokenizer into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_alpaca(path: Path, n: int = 16) -> Path:
    """The examples as an alpaca JSON list (instruction / input / output)."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in examples(n)]
    Path(path).write_text(json.dumps(rows, indent=1))
    return Path(path)


def write_messages_jsonl(path: Path, n: int = 16) -> Path:
    """The examples as chat JSONL, one ``{"messages": [...]}`` per line."""
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in examples(n)
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
