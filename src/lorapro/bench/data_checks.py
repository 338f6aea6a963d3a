"""Checks of a prepared task's splits that decide whether a benchmark on them can mean anything,
run once after the data is split and before anything trains:

- :func:`check_labels` refuses a classification task whose classes cannot be learned from its
  training split (fewer training examples than classes, or most test examples of classes that
  never occur in training);
- :func:`split_overlap` counts the validation and test examples whose input also occurs in the
  training split (a contaminated test set makes a method that memorises look better), and
  :func:`overlap_warnings` says so;
- :func:`unseen_test_classes` warns about a minority of test classes never seen in training.

The splits are read through their public fields only: ``input_ids`` (tokenised texts),
``prompts`` (prompt/response splits: the prompt is the input) or ``images``; a split with none
of them is not checked for overlap.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from .errors import SetupError

__all__ = [
    "check_labels",
    "contaminated_test_set",
    "example_keys",
    "overlap_warnings",
    "split_overlap",
    "unseen_test_classes",
]

#: At most this many classes are named in a warning; the rest are counted.
_LISTED = 5


def example_keys(split: Any) -> list[Hashable] | None:
    """One hashable key per example: the input the model sees (token ids, a prompt's token ids, an
    image's pixels); None for a split of another kind."""
    if hasattr(split, "prompts"):
        return [tuple(p) for p in split.prompts]
    if hasattr(split, "input_ids"):
        return [tuple(ids) for ids in split.input_ids]
    images = getattr(split, "images", None)
    if images is not None and hasattr(images, "numpy"):
        return [hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in images.cpu()]
    return None


def split_overlap(prepared: Any) -> dict[str, dict[str, int]]:
    """For validation and test: how many of their examples have an input that also occurs in the
    training split (``{"test": {"in_training": 40, "examples": 40}, ...}``); empty when the splits
    cannot be compared."""
    train = example_keys(prepared.train)
    if train is None:
        return {}
    seen = set(train)
    found: dict[str, dict[str, int]] = {}
    for name in ("validation", "test"):
        keys = example_keys(getattr(prepared, name))
        if keys is None:
            continue
        found[name] = {"in_training": sum(k in seen for k in keys), "examples": len(keys)}
    return found


def contaminated_test_set(overlap: dict[str, dict[str, int]]) -> str | None:
    """The verdict's caveat when test examples occur in training, in one clause; else None."""
    test = overlap.get("test") or {}
    if not test.get("in_training"):
        return None
    return (
        f"the test set is contaminated: {test['in_training']} of {test['examples']} test examples also "
        "occur in the training split"
    )


def overlap_warnings(overlap: dict[str, dict[str, int]]) -> list[str]:
    """A warning for each split that shares examples with the training split."""
    warnings = []
    test = contaminated_test_set(overlap)
    if test:
        warnings.append(
            f"{test}, so the verdict does not measure generalisation (a method that memorises the "
            "training data looks better); remove them from the test data (with --eval-file: use a file "
            "disjoint from the training file)"
        )
    val = overlap.get("validation") or {}
    if val.get("in_training"):
        warnings.append(
            f"{val['in_training']} of {val['examples']} validation examples also occur in the training "
            "split, so the learning rates were chosen on data the methods trained on; remove them from "
            "the validation data"
        )
    return warnings


def _labels(split: Any) -> list[int] | None:
    labels = getattr(split, "labels", None)
    if labels is None:
        return None
    return [int(x) for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]


def _class_names(prepared: Any) -> Sequence[str]:
    return prepared.info.get("classes") or []


def check_labels(prepared: Any, error: type[SetupError] = SetupError) -> None:
    """Refuse, in one line naming the numbers, a classification task whose classes the training
    split cannot teach: fewer training examples than classes, or more than half of the test
    examples in classes that never occur in training. Tasks without labels pass."""
    train, test = _labels(prepared.train), _labels(prepared.test)
    if train is None or test is None:
        return
    classes = len(_class_names(prepared)) or len(set(train) | set(test))
    seen = set(train)
    unseen = [y for y in test if y not in seen]
    fix = (
        "no method can learn them; use data with several training examples per class "
        "(a larger --train-size, or fewer classes)"
    )
    if len(train) < classes:
        raise error(
            f"the training split has {len(train)} examples for {classes} classes ({len(seen)} of them "
            f"occur in it); {fix}"
        )
    if test and 2 * len(unseen) > len(test):
        raise error(
            f"{len(unseen)} of {len(test)} test examples belong to {len(set(unseen))} classes that never "
            f"occur in the {len(train)} training examples; {fix}"
        )


def unseen_test_classes(prepared: Any) -> list[str]:
    """A warning (one short line) when some test examples belong to classes that never occur in
    training (classification splits with ``labels``); empty for tasks without classes."""
    train, test = _labels(prepared.train), _labels(prepared.test)
    if train is None or test is None:
        return []
    seen = set(train)
    unseen = Counter(y for y in test if y not in seen)
    if not unseen:
        return []
    names = _class_names(prepared)
    label = lambda c: f"{names[c]!r}" if 0 <= c < len(names) else str(c)  # noqa: E731
    ordered = sorted(unseen.items(), key=lambda item: (-item[1], item[0]))
    listed = ", ".join(f"{label(c)} ({n} test example{'s' if n > 1 else ''})" for c, n in ordered[:_LISTED])
    if len(ordered) > _LISTED:
        listed += f" and {len(ordered) - _LISTED} more"
    share = sum(unseen.values()) / max(1, len(test))
    return [
        f"test class(es) never seen in training: {listed}, {share:.1%} of the test set; no method can learn "
        "them from this training data (a larger --train-size or another --data-seed may include them)"
    ]
