"""A tiny random Llama and a word-level tokenizer saved as a Hugging Face model folder, as a
user's ``--model PATH`` would be (built in a test's temporary folder; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

_TEXT = """the a an is of to and what how many much plus minus times equals answer question film movie
good great lovely superb bad dull boring awful number so total apples pears has buys more tom ann ####"""
WORDS = [*_TEXT.split(), *(str(i) for i in range(21))]
SPECIAL = ["[UNK]", "[PAD]", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
#: A chat template in the usual shape: each turn as ``<|role|> content <|end|>``, and the
#: assistant header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="@@", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<eos>",
        additional_special_tokens=SPECIAL[3:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder: Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-32 Llama and its tokenizer into ``folder`` (save_pretrained)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
