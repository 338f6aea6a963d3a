"""Tokenised text splits with per-batch padding, and classification accuracy (per example too)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Split
from .devices import model_device
from .records import Scores, accuracy_scores_of

__all__ = ["Encoded", "accuracy_scores", "correct_predictions", "encode", "evaluate_accuracy"]


@dataclass
class Encoded:
    """A tokenised text split: unpadded token ids per example (padding happens per batch)."""

    input_ids: list[list[int]]
    labels: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad just to the longest example in the batch: short sentences would otherwise
        pay for max_length tokens each."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode(tokenizer: Any, split: Split, max_length: int = 64) -> Encoded:
    """Tokenise a split once; every method and epoch reuses the result."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if len(split) == 0:  # e.g. --val-size 0; fast tokenizers fail on an empty batch
        return Encoded([], [], int(pad))
    out = tokenizer(list(split.texts), truncation=True, max_length=max_length, padding=False)
    return Encoded(list(out["input_ids"]), list(split.labels), int(pad))


@torch.no_grad()
def correct_predictions(model: nn.Module, data: Encoded, batch_size: int = 128) -> list[int]:
    """1 where the argmax prediction equals the label, else 0, in the split's order. Batches are
    formed from length-sorted examples so dynamic padding wastes little."""
    if len(data) == 0:
        return []
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    correct = [0] * len(data)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in data.batch(chunk).items()}
            labels = batch.pop("labels")
            hits = (model(**batch).logits.argmax(dim=-1) == labels).tolist()
            for i, hit in zip(chunk, hits, strict=True):
                correct[i] = int(hit)
    finally:
        model.train(was_training)
    return correct


def evaluate_accuracy(model: nn.Module, data: Encoded, batch_size: int = 128) -> float:
    """Accuracy of argmax predictions (the order of the batches does not change it)."""
    if len(data) == 0:
        return float("nan")
    return sum(correct_predictions(model, data, batch_size)) / len(data)


def accuracy_scores(model: nn.Module, data: Encoded, batch_size: int = 128) -> Scores:
    """``{"accuracy": ...}`` with each example's correctness, for the verdict's paired bootstrap."""
    return accuracy_scores_of(correct_predictions(model, data, batch_size) if len(data) else [])
