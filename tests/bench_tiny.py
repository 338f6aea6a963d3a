"""A tiny benchmark task for harness tests: a 2-layer BERT built from a config (no download)
on synthetic token sequences whose label is whether token 7 occurs, which LoRA can learn
in a few dozen steps. It records per-example test outcomes unless made with
``per_example=False`` (as tasks of earlier versions, whose stored runs lack them)."""

from __future__ import annotations

import torch
from torch import nn

from lorapro.bench.models import encoder_linear_names
from lorapro.bench.tasks import PreparedTask, Task, TaskOptions
from lorapro.bench.text import Encoded, accuracy_scores, evaluate_accuracy

VOCAB = 32


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _data(n: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, torch.randint(0, 8, (1,), generator=g)] = 7
    return Encoded(ids.tolist(), labels.tolist(), pad_token_id=0)


class TinyTask(Task):
    name = "tiny"
    description = "synthetic token task, 2-layer BERT"
    default_train_size = 64
    default_val_size = 32
    default_test_size = 32
    default_epochs = 2
    default_batch_size = 16

    def __init__(self, per_example: bool = True) -> None:
        self.prepared_count = 0
        self.per_example = per_example

    def prepare(self, options: TaskOptions) -> PreparedTask:
        self.prepared_count += 1
        n_train = options.train_size or self.default_train_size
        data = {
            "train": _data(n_train, 1 + options.data_seed),
            "validation": _data(options.val_size or self.default_val_size, 2 + options.data_seed),
            "test": _data(options.test_size or self.default_test_size, 3 + options.data_seed),
        }

        def evaluate(model: nn.Module, split: str) -> dict[str, float]:
            if self.per_example:
                return accuracy_scores(model, data[split])
            return {"accuracy": evaluate_accuracy(model, data[split])}

        return PreparedTask(
            train=data["train"],
            validation=data["validation"],
            test=data["test"],
            load_model=_tiny_bert,
            lora_targets=encoder_linear_names,
            loss=lambda model, batch: model(**batch).loss,
            evaluate=evaluate,
            peft_task_type="SEQ_CLS",
            info={"sizes": {k: len(v) for k, v in data.items()}, "data_notes": []},
        )
