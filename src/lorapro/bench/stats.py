"""Statistics of the benchmark's verdict: means, the paired bootstrap, intervals over seeds and the
one-word verdict. A leaf module: numbers in, numbers out, nothing of the bench imported.

A comparison is between a method and a reference (LoRA, full fine-tuning) on one test metric
whose value on a split is ``sum(w * v) / sum(w)`` over its examples (weights 1 for accuracy,
scored tokens for a loss per token). Both ran on the same test examples with the same seeds,
so the comparison is *paired*: the bootstrap draws the same examples (and seeds) for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BETTER",
    "NOT_DECIDED",
    "RESAMPLES",
    "WITHIN_NOISE",
    "WORSE",
    "Comparison",
    "SeedOutcome",
    "compare",
    "examples_needed",
    "mean",
    "paired_bootstrap",
    "seed_interval",
    "spread",
    "std",
    "t_quantile",
    "verdict",
]

BETTER = "better"
WITHIN_NOISE = "within noise"
WORSE = "worse"
#: No interval could be formed (one seed and no per-example outcomes, or nothing in common).
NOT_DECIDED = "n/a"

#: Bootstrap resamples: the 2.5% and 97.5% percentiles of 2000 draws move by well under a
#: tenth of the interval's width from one random seed to another.
RESAMPLES = 2000
#: Confidence level of every interval.
LEVEL = 0.95
#: At most this many resamples' example counts are held at once (memory: CHUNK x examples).
_CHUNK = 250

#: Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); beyond, the normal's.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n-1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def spread(values: Sequence[float], digits: int = 4) -> str:
    """``0.8130 ± 0.0040 (3 seeds)``; one value has no spread to show: ``0.8130 (1 seed)``."""
    if not values:
        return "n/a"
    m = mean(values)
    shown = f"{m:.{digits}f}" if math.isfinite(m) else "n/a"
    if len(values) == 1:
        return f"{shown} (1 seed)"
    return f"{shown} ± {std(values):.{digits}f} ({len(values)} seeds)"


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def verdict(low: float | None, high: float | None, higher_is_better: bool) -> str:
    """The word for an interval of (method - reference): ``better`` or ``worse`` when it excludes
    0 (by the metric's direction), ``within noise`` when it contains 0 (an end at exactly 0
    included), ``n/a`` without an interval."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return NOT_DECIDED
    if low > 0:
        return BETTER if higher_is_better else WORSE
    if high < 0:
        return WORSE if higher_is_better else BETTER
    return WITHIN_NOISE


@dataclass(frozen=True)
class SeedOutcome:
    """One run's test result: the metric's value and, when recorded, its per-example outcomes."""

    seed: int
    value: float
    values: Sequence[float] | None = None
    weights: Sequence[float] | None = None


@dataclass(frozen=True)
class Comparison:
    """Method minus reference on one test metric, with a 95% interval and the verdict."""

    method: str
    reference: str
    metric: str
    higher_is_better: bool
    #: Mean over the common seeds of (method - reference) on the whole test set.
    difference: float
    low: float | None
    high: float | None
    verdict: str
    #: How the interval was formed, in words (or why there is none).
    basis: str
    #: "examples+seeds", "examples", "seeds" or "none".
    kind: str
    n_examples: int | None
    n_seeds: int

    @property
    def half_width(self) -> float | None:
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "reference": self.reference,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "verdict": self.verdict,
            "basis": self.basis,
            "kind": self.kind,
            "n_examples": self.n_examples,
            "n_seeds": self.n_seeds,
        }


def paired_bootstrap(
    method: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    method_weights: Sequence[Sequence[float]] | None = None,
    reference_weights: Sequence[Sequence[float]] | None = None,
    *,
    over_seeds: bool = False,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of the difference (method - reference) of a weighted mean metric.

    ``method[s][i]`` is example i's outcome in seed s's run (rows paired by seed with
    ``reference``'s). Each resample draws the test examples with replacement, the same ones for
    both methods and every seed, and takes the mean over seeds of the per-seed difference;
    with ``over_seeds`` it also draws the seeds with replacement (hierarchical bootstrap: the
    interval then covers training randomness as well as the test sample).
    """
    v_m = np.asarray(method, dtype=np.float64)
    v_r = np.asarray(reference, dtype=np.float64)
    if v_m.ndim != 2 or v_m.shape != v_r.shape or v_m.shape[1] == 0:
        raise ValueError(f"expected two equal seeds x examples arrays, got {v_m.shape} and {v_r.shape}")
    w_m = np.ones_like(v_m) if method_weights is None else np.asarray(method_weights, dtype=np.float64)
    w_r = np.ones_like(v_r) if reference_weights is None else np.asarray(reference_weights, dtype=np.float64)
    n_seeds, n = v_m.shape
    rng = np.random.default_rng(seed)
    p = np.full(n, 1.0 / n)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        counts = rng.multinomial(n, p, size=size).astype(np.float64)  # resample x example
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = (counts @ (w_m * v_m).T) / (counts @ w_m.T) - (counts @ (w_r * v_r).T) / (counts @ w_r.T)
        if over_seeds and n_seeds > 1:
            pick = rng.integers(0, n_seeds, size=(size, n_seeds))
            diff = np.take_along_axis(diff, pick, axis=1)
        out[start : start + size] = diff.mean(axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(out, [tail, 100 - tail])
    return float(low), float(high)


def seed_interval(differences: Sequence[float]) -> tuple[float, float]:
    """95% t-interval of the mean of per-seed paired differences (at least 2)."""
    if len(differences) < 2:
        raise ValueError("an interval over seeds needs at least 2 seeds")
    half = t_quantile(len(differences) - 1) * std(differences) / math.sqrt(len(differences))
    m = mean(differences)
    return m - half, m + half


def compare(
    method: str,
    reference: str,
    metric: str,
    higher_is_better: bool,
    method_runs: Sequence[SeedOutcome],
    reference_runs: Sequence[SeedOutcome],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Compare two methods' runs on their common seeds.

    With per-example outcomes in every run (the same number of examples): the paired bootstrap
    over test examples, and over seeds too when there are 3 or more. Without: a t-interval over
    2 or more seeds' paired differences (training randomness only, not the test sample's
    noise), else no interval.
    """
    mine = {r.seed: r for r in method_runs}
    theirs = {r.seed: r for r in reference_runs}
    seeds = sorted(set(mine) & set(theirs))

    def done(diff: float, low: float | None, high: float | None, basis: str, kind: str, n: int | None):
        return Comparison(
            method, reference, metric, higher_is_better, diff, low, high,
            verdict(low, high, higher_is_better), basis, kind, n, len(seeds),
        )  # fmt: skip

    if not seeds:
        return done(math.nan, None, None, "no seed run by both", "none", None)
    diffs = [mine[s].value - theirs[s].value for s in seeds]
    diff = mean(diffs)
    runs = [mine[s] for s in seeds] + [theirs[s] for s in seeds]
    lengths = {len(r.values) for r in runs if r.values is not None}
    if all(r.values is not None for r in runs) and len(lengths) == 1 and 0 not in lengths:
        (n,) = lengths
        over_seeds = len(seeds) >= 3
        low, high = paired_bootstrap(
            [mine[s].values for s in seeds],  # type: ignore[misc]
            [theirs[s].values for s in seeds],  # type: ignore[misc]
            _weights([mine[s] for s in seeds], n),
            _weights([theirs[s] for s in seeds], n),
            over_seeds=over_seeds,
            resamples=resamples,
            seed=seed,
        )
        what = f"{n} test examples" + (f" and {len(seeds)} seeds" if over_seeds else "")
        if not over_seeds and len(seeds) > 1:
            what += f" (mean of {len(seeds)} seeds)"
        kind = "examples+seeds" if over_seeds else "examples"
        return done(diff, low, high, f"paired bootstrap over {what}", kind, n)
    if len(seeds) >= 2:
        low, high = seed_interval(diffs)
        basis = f"t-interval over {len(seeds)} seeds (runs without per-example outcomes)"
        return done(diff, low, high, basis, "seeds", None)
    return done(diff, None, None, "one seed and no per-example outcomes: no interval", "none", None)


def _weights(runs: Sequence[SeedOutcome], n: int) -> list[Sequence[float]] | None:
    if all(r.weights is None for r in runs):
        return None
    return [r.weights if r.weights is not None else [1.0] * n for r in runs]


def examples_needed(n: int, half_width: float, difference: float) -> int | None:
    """Test examples an interval of half-width ``half_width`` on ``n`` examples would need to
    shrink to ``|difference|`` (widths fall as 1/sqrt(n)); None for a zero difference."""
    if not difference or not math.isfinite(difference) or not math.isfinite(half_width):
        return None
    return math.ceil(n * (half_width / abs(difference)) ** 2)
