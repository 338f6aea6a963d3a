"""What the causal-LM tasks (gsm, jsonl) share: a tokenised prompt/response split, the loss per
response token, and greedy decoding.

The model learns the response that follows each prompt: a batch concatenates the two with
labels -100 on the prompt and the padding, so the model's own loss is on the response only.
Decoding for exact match needs the prompts alone, left-padded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import model_device
from ..records import Scores, example_outcomes

__all__ = ["PromptResponseSplit", "greedy_answers", "loss_scores", "response_evaluator", "response_losses"]


@dataclass
class PromptResponseSplit:
    """A tokenised split: prompt ids (for generation) and response ids (``targets``, for the
    loss) apart.

    ``batch`` concatenates them, right-padded, with labels -100 on the prompt and the
    padding; ``prompt_batch`` left-pads the prompts alone, as batched decoding needs.
    """

    prompts: list[list[int]]
    targets: list[list[int]]
    pad_token_id: int
    #: Examples whose response was cut to fit max_length (the loss sees only the kept part).
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [(self.prompts[i], self.targets[i]) for i in indices]
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, (prompt, target) in enumerate(rows):
            n, m = len(prompt), len(target)
            ids[j, : n + m] = torch.tensor(prompt + target, dtype=torch.long)
            mask[j, : n + m] = 1
            labels[j, n : n + m] = torch.tensor(target, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def prompt_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.prompts[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def target_tokens(self) -> int:
        return sum(len(t) for t in self.targets)


@torch.no_grad()
def response_losses(
    model: nn.Module, split: PromptResponseSplit, batch_size: int = 4
) -> tuple[float, list[float], list[int]]:
    """Mean cross-entropy per response token over the whole split (not a mean of batch means,
    which would weight short responses more), and per example (in the split's order) its mean
    loss per response token and its number of response tokens, whose weighted mean is the first.

    Batches of 4, like training's default: the logits (batch x length x 49k vocabulary, fp32)
    dominate memory, and a larger evaluation batch would set the run's peak, not training.
    """
    if len(split) == 0:
        return float("nan"), [], []
    device = model_device(model)
    # Length-sorted batches waste little on padding; the order does not change the sum.
    order = sorted(range(len(split)), key=lambda i: len(split.prompts[i]) + len(split.targets[i]))
    total, tokens = 0.0, 0
    losses, counts = [0.0] * len(split), [0] * len(split)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in split.batch(chunk).items()}
        # The model's loss is the mean over the tokens it predicts, which are exactly the
        # labelled ones (every label follows at least one prompt token).
        labels = batch["labels"]
        n = int((labels != -100).sum())
        output = model(**batch)
        total += float(output.loss) * n
        tokens += n
        # Per example: position t's logits predict label t + 1, as in the model's own loss.
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        logits = output.logits
        per_token = F.cross_entropy(
            logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="none"
        ).view(shifted.shape)
        del output, logits
        row_n = (shifted != -100).sum(dim=1)
        row_sum = per_token.sum(dim=1)
        for i, m, loss_sum in zip(chunk, row_n.tolist(), row_sum.tolist(), strict=True):
            counts[i] = int(m)
            losses[i] = loss_sum / m if m else 0.0
    return total / tokens, losses, counts


def loss_scores(model: nn.Module, split: PromptResponseSplit, batch_size: int = 4) -> Scores:
    """``{"loss": ...}`` with each example's loss per token and token count (its weight)."""
    loss, losses, counts = response_losses(model, split, batch_size)
    return Scores({"loss": loss}, {"loss": example_outcomes(losses, counts)} if counts else {})


def response_evaluator(
    splits: Mapping[str, PromptResponseSplit],
    test_hits: Callable[[nn.Module, PromptResponseSplit], list[int]] | None,
) -> Callable[[nn.Module, str], Scores]:
    """A task's ``evaluate`` for prompt/response data: the loss per response token on every split,
    and on the test split the exact match from ``test_hits`` (1 per example answered right; NaN
    for an empty test split; none when ``test_hits`` is None). The model is evaluated in eval
    mode and left in the mode it was in."""

    def evaluate(model: nn.Module, split: str) -> Scores:
        data = splits[split]
        was_training = model.training
        model.eval()
        try:
            scores = loss_scores(model, data)
            if split == "test" and test_hits is not None:
                if len(data):
                    hits = test_hits(model, data)
                    scores["exact_match"] = sum(hits) / len(data)
                    scores.examples["exact_match"] = example_outcomes(hits)
                else:
                    scores["exact_match"] = float("nan")
        finally:
            model.train(was_training)
        return scores

    return evaluate


@torch.no_grad()
def greedy_answers(
    model: nn.Module, split: PromptResponseSplit, tokenizer: Any, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy decodings of the split's prompts (left-padded batches, KV cache), in split order."""
    device = model_device(model)
    eos = tokenizer.eos_token_id
    order = sorted(range(len(split)), key=lambda i: len(split.prompts[i]))
    texts: list[str] = [""] * len(split)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in split.prompt_batch(chunk).items()}
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=split.pad_token_id,
        )
        width = batch["input_ids"].shape[1]
        for i, row in zip(chunk, out[:, width:].tolist(), strict=True):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return texts
