"""The verdict's statistics on hand-made data whose answer is known: the paired bootstrap, the
interval over seeds, the verdict's thresholds, and which interval a comparison falls back to."""

from __future__ import annotations

import math

import pytest

from lorapro.bench.stats import (
    SeedOutcome,
    compare,
    examples_needed,
    paired_bootstrap,
    seed_interval,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize(
    ("low", "high", "higher_is_better", "word"),
    [
        (0.01, 0.03, True, "better"),
        (-0.03, -0.01, True, "worse"),
        (-0.01, 0.03, True, "within noise"),
        (0.0, 0.03, True, "within noise"),  # an end at exactly 0 does not exclude it
        (-0.03, 0.0, True, "within noise"),
        (0.0, 0.0, True, "within noise"),  # identical outcomes
        (-0.03, -0.01, False, "better"),  # a loss: lower is better
        (0.01, 0.03, False, "worse"),
        (None, None, True, "n/a"),
        (math.nan, 0.1, True, "n/a"),
    ],
)
def test_verdict_thresholds(low, high, higher_is_better, word):
    assert verdict(low, high, higher_is_better) == word


def test_paired_bootstrap_on_four_examples_has_the_known_percentiles():
    # Per-example differences (1, 0, 0, 0): a resample's mean difference is Binomial(4, 1/4) / 4,
    # whose 2.5% quantile is 0 (P(0) = 0.32) and 97.5% quantile 3/4 (P(<= 2) = 0.95, P(<= 3) = 0.996).
    low, high = paired_bootstrap([[1, 1, 0, 0]], [[0, 1, 0, 0]], resamples=20000, seed=1)
    assert (low, high) == (0.0, 0.75)
    assert verdict(low, high, True) == "within noise"


def test_paired_bootstrap_pairs_the_examples():
    # The same 300 of 600 right: paired, every example's difference is 0, so the interval is [0, 0]
    # (two unpaired accuracies of 0.5 on 600 examples would give about +-0.057).
    same = [[1] * 300 + [0] * 300]
    assert paired_bootstrap(same, same, seed=0) == (0.0, 0.0)
    # A method right on every example the reference gets wrong and as good elsewhere: better.
    low, high = paired_bootstrap([[1] * 600], [[1] * 540 + [0] * 60], seed=0)
    assert 0 < low < 0.1 < high < 0.15


def test_paired_bootstrap_takes_a_weighted_mean():
    # Loss per token: example 0 has 3 tokens at loss 1, example 1 one token at loss 0, so the split's
    # loss is 0.75; resamples draw (0, 0) -> 0, (0, 1) -> 0.75, (1, 1) -> 1 (weighted): [0, 1].
    low, high = paired_bootstrap([[1.0, 0.0]], [[0.0, 0.0]], [[3, 1]], [[3, 1]], resamples=4000, seed=0)
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_over_seeds_covers_training_randomness():
    # The method is right everywhere on seed 0 and nowhere on seeds 1 and 2; the reference never.
    # Per seed the difference is 1, 0, 0 whatever examples are drawn. Over examples only, the
    # mean over seeds is always 1/3; drawing seeds too, it is 0 with probability 8/27 and 1 with 1/27.
    method = [[1] * 50, [0] * 50, [0] * 50]
    reference = [[0] * 50] * 3
    examples_only = paired_bootstrap(method, reference, seed=0)
    assert examples_only == pytest.approx((1 / 3, 1 / 3))
    assert paired_bootstrap(method, reference, over_seeds=True, resamples=20000, seed=0) == (0.0, 1.0)


def test_seed_interval_is_students_t():
    low, high = seed_interval([0.01, 0.02, 0.03])
    half = 4.303 * 0.01 / math.sqrt(3)
    assert (low, high) == pytest.approx((0.02 - half, 0.02 + half))
    assert t_quantile(2) == 4.303 and t_quantile(1000) == 1.96
    with pytest.raises(ValueError):
        seed_interval([0.01])


def _runs(values_by_seed, per_example=True):
    return [
        SeedOutcome(seed, sum(v) / len(v), v if per_example else None)
        for seed, v in enumerate(values_by_seed)
    ]


def test_compare_uses_examples_and_seeds_then_falls_back():
    good = [[1] * 90 + [0] * 10] * 3
    poor = [[1] * 60 + [0] * 40] * 3
    c = compare("m", "lora", "accuracy", True, _runs(good), _runs(poor), seed=0)
    assert c.kind == "examples+seeds" and c.verdict == "better" and c.difference == pytest.approx(0.3)
    assert "100 test examples and 3 seeds" in c.basis and c.n_examples == 100 and c.n_seeds == 3
    # Two seeds: examples only (averaged over the seeds).
    c = compare("m", "lora", "accuracy", True, _runs(good[:2]), _runs(poor[:2]))
    assert c.kind == "examples" and "mean of 2 seeds" in c.basis
    # Runs without per-example outcomes (stored by earlier versions): a t-interval over seeds.
    c = compare("m", "lora", "accuracy", True, _runs(good, False), _runs(poor))
    assert c.kind == "seeds" and "without per-example outcomes" in c.basis
    assert c.low == c.high == pytest.approx(0.3)  # no spread over seeds
    # One seed and nothing per example: no interval, no verdict.
    c = compare("m", "lora", "accuracy", True, _runs(good[:1], False), _runs(poor[:1], False))
    assert (c.kind, c.verdict, c.low) == ("none", "n/a", None)
    # Only the seeds both ran are compared.
    c = compare("m", "lora", "accuracy", True, _runs(good), _runs(poor[:1]))
    assert c.n_seeds == 1 and c.kind == "examples"


def test_compare_a_loss_lower_is_better():
    low_loss = [SeedOutcome(0, 0.5, [0.4, 0.6] * 50, [2] * 100)]
    high_loss = [SeedOutcome(0, 0.9, [0.8, 1.0] * 50, [2] * 100)]
    c = compare("m", "lora", "loss", False, low_loss, high_loss)
    assert c.difference == pytest.approx(-0.4) and c.verdict == "better"
    assert c.high < 0


def test_examples_needed():
    # Half-width 0.04 on 1000 examples; to resolve a difference of 0.01 the width must shrink 4x.
    assert examples_needed(1000, 0.04, 0.01) == 16000
    assert examples_needed(1000, 0.04, 0.0) is None
