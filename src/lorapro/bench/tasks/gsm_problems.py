"""The gsm task's problems: drawn from reasoning-gym's ``gsm_symbolic``, split disjointly by
question text, and their final answers read back numerically.

Splits depend only on ``data_seed`` and their own sizes (see :func:`generate_splits`). The
questions come from ~85 templates, so test questions share templates, not numbers, with
training ones.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass

from ..data import MissingAssetError

__all__ = [
    "ANSWER_MARKER",
    "DATASET",
    "REASONING_GYM_INSTALL",
    "GSMProblem",
    "answers_match",
    "format_solution",
    "generate_splits",
    "parse_final_number",
    "require_reasoning_gym",
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


# --------------------------------------------------------------------------- problems


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


def require_reasoning_gym() -> None:
    """Raise MissingAssetError naming the install command when reasoning-gym is missing."""
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
    require_reasoning_gym()
    taken: set[str] = set()
    splits: dict[str, list[GSMProblem]] = {}
    for offset, name in enumerate(_SPLIT_ORDER):
        seed = (data_seed * len(_SPLIT_ORDER) + offset) * _SEED_STRIDE
        splits[name] = _unique_problems(seed, sizes[name], taken)
        taken.update(p.question for p in splits[name])
    return splits
