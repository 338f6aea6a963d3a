"""Tokenising the ``jsonl:PATH`` task's records into prompt and response ids.

A prompt/response line is used as it is (no chat template); a chat line is rendered with the
tokenizer's chat template, everything before the assistant's reply being the prompt. The
prompt is never cut; a response that does not fit after it loses its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .causal_lm import PromptResponseSplit
from .jsonl_format import JsonlFormatError, JsonlRecord

__all__ = ["ResponseSplit", "encode_records", "subset"]


@dataclass
class ResponseSplit(PromptResponseSplit):
    """Tokenised records, with per example the reference response (``references``), its file
    and line (``where``) and whether its response was cut (``cut``)."""

    references: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    cut: list[bool] = field(default_factory=list)


def _render(record: JsonlRecord, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids (ending with the end-of-sequence token) of one record."""
    eos = tokenizer.eos_token_id
    if record.messages is None:
        prompt = tokenizer(record.prompt)["input_ids"]  # with the tokenizer's own BOS, if it adds one
        return list(prompt), tokenizer(record.response, add_special_tokens=False)["input_ids"] + [eos]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "'messages' need the tokenizer's chat template, and this model's tokenizer has none; "
            "write the line as 'prompt' and 'response' instead"
        )
    turns = [dict(m) for m in record.messages]
    try:
        prompt_text = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as exc:  # jinja's TemplateError and whatever a template raises on purpose
        raise ValueError(f"the chat template refuses these messages: {exc}") from None
    # The template's own text already holds any BOS: no special tokens added on top.
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if whole.startswith(prompt_text):
        # The reply as the template writes it, end-of-turn marker included; anything after
        # the last end-of-sequence token (a newline) is never generated, so not trained.
        response = tokenizer(whole[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        if eos in response:
            response = response[: len(response) - response[::-1].index(eos)]
        else:
            response.append(eos)
    else:  # a template that renders earlier turns differently once a reply follows
        response = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"] + [eos]
    return list(prompt), list(response)


def encode_records(
    records: Sequence[JsonlRecord], tokenizer: Any, max_length: int
) -> tuple[ResponseSplit, list[str]]:
    """All records tokenised, and the errors of the ones that cannot be used (file:line: reason).

    A response that does not fit after its prompt loses its end (counted in ``truncated``);
    a prompt of ``max_length`` tokens or more leaves nothing of the response: an error.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise JsonlFormatError("the model's tokenizer has no end-of-sequence token (eos_token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    split = ResponseSplit([], [], int(pad))
    errors: list[str] = []
    for record in records:
        try:
            prompt, response = _render(record, tokenizer)
        except ValueError as exc:
            errors.append(f"{record.where}: {exc}")
            continue
        room = max_length - len(prompt)
        if room < 1:
            errors.append(
                f"{record.where}: nothing of the response is left after truncation: the prompt alone takes "
                f"{len(prompt)} tokens of --max-length {max_length}; raise --max-length or shorten the prompt"
            )
            continue
        split.cut.append(len(response) > room)
        split.truncated += split.cut[-1]
        response = response[:room]
        split.prompts.append(prompt)
        split.targets.append(response)
        split.references.append(record.reference)
        split.where.append(record.where)
    return split, errors


def subset(split: ResponseSplit, indices: Sequence[int]) -> ResponseSplit:
    """The examples of ``split`` at ``indices``, in that order."""
    return ResponseSplit(
        [split.prompts[i] for i in indices],
        [split.targets[i] for i in indices],
        split.pad_token_id,
        truncated=sum(split.cut[i] for i in indices),
        references=[split.references[i] for i in indices],
        where=[split.where[i] for i in indices],
        cut=[split.cut[i] for i in indices],
    )
