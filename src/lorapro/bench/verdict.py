"""The benchmark's verdict: each method against LoRA (and full fine-tuning where it ran) on the
test split's selection metric, with a 95% interval and one word, and the warnings a reader of
the verdict needs (a test set too small to separate the methods, one seed, intervals over
seeds only, test classes never seen in training).

The statistics are :mod:`lorapro.bench.stats`'; this module picks what is compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .outcomes import BenchResult, MethodOutcome
from .records import examples_of
from .stats import NOT_DECIDED, RESAMPLES, WITHIN_NOISE, Comparison, SeedOutcome, compare, examples_needed

__all__ = ["REFERENCES", "comparisons", "edge_warnings", "verdict_warnings"]

#: What every method is compared with, in this order, where it ran.
REFERENCES = ("lora", "full")


def _seed_outcomes(outcome: MethodOutcome, metric: str) -> list[SeedOutcome]:
    out = []
    for run in outcome.runs:
        examples = examples_of(run).get(metric) or {}
        out.append(
            SeedOutcome(
                run.seed, run.test.get(metric, math.nan), examples.get("values"), examples.get("weights")
            )
        )
    return out


def comparisons(result: BenchResult, *, resamples: int = RESAMPLES) -> list[Comparison]:
    """Every method with runs against each reference with runs (LoRA first; against full
    fine-tuning, the methods other than LoRA, whose difference from full is full's row above)."""
    metric = result.task.selection_metric
    done = {o.method: o for o in result.outcomes if o.runs}
    found: list[Comparison] = []
    for reference in REFERENCES:
        if reference not in done:
            continue
        theirs = _seed_outcomes(done[reference], metric.name)
        for method, outcome in done.items():
            if method == reference or (reference == "full" and method == "lora" and "lora" in done):
                continue
            mine = _seed_outcomes(outcome, metric.name)
            higher = metric.higher_is_better
            found.append(compare(method, reference, metric.name, higher, mine, theirs, resamples=resamples))
    return found


def verdict_warnings(result: BenchResult, found: Sequence[Comparison]) -> list[str]:
    """What the verdict cannot tell, in sentences; empty when nothing needs saying."""
    warnings: list[str] = []
    metric = result.task.selection_metric.name
    seeds = max((len(o.runs) for o in result.outcomes), default=0)
    if seeds == 1:
        warnings.append(
            "one seed: the intervals cover the test sample only, not training randomness (which can "
            "reorder methods a small test set cannot separate); run --seeds 3 or more"
        )
    against_lora = [c for c in found if c.reference == "lora"]
    decided = [c for c in against_lora if c.verdict != NOT_DECIDED]
    if decided and all(c.verdict == WITHIN_NOISE for c in decided):
        n = next((c.n_examples for c in decided if c.n_examples), None)
        widths = [c.half_width for c in decided if c.half_width is not None]
        largest = max(decided, key=lambda c: abs(c.difference) if math.isfinite(c.difference) else -1)
        spread = f"95% interval half-widths {min(widths):.3g} to {max(widths):.3g}"
        if n:
            text = (
                "the test set is too small to separate the methods: every difference from LoRA on test "
                f"{metric} is within noise ({spread} on {n} test examples)"
            )
            need = examples_needed(n, max(widths), largest.difference)
            if need is not None and need > n:
                text += (
                    f"; telling apart the largest difference ({largest.method}, {largest.difference:+.3g}) "
                    f"would take about {need} test examples"
                )
        else:  # intervals over seeds only
            text = (
                f"the seeds cannot separate the methods: every difference from LoRA on test {metric} is "
                f"within noise ({spread}, over seeds); more seeds narrow these intervals"
            )
        warnings.append(text)
    seed_only = sorted({name for c in found if c.kind == "seeds" for name in (c.method, c.reference)})
    if seed_only:
        warnings.append(
            "intervals over seeds only for comparisons with "
            f"{', '.join(seed_only)}: their stored runs predate per-example test outcomes, so the test "
            "sample's own noise is not in those intervals (runs trained now record them)"
        )
    undecided = [f"{c.method} vs {c.reference}" for c in found if c.verdict == NOT_DECIDED]
    if undecided:
        warnings.append(
            f"no interval for {', '.join(undecided)}: one seed and no per-example test outcomes stored"
        )
    warnings += edge_warnings(result.outcomes)
    warnings += getattr(result, "data_warnings", [])
    return warnings


def edge_warnings(outcomes: Sequence[MethodOutcome]) -> list[str]:
    """A warning for each method whose chosen rate is the smallest or largest it tried: its best rate
    may lie beyond (a method tried at one rate only is not warned about: it was not tuned)."""
    found = []
    for o in outcomes:
        if o.chosen_lr is None or len(o.grid) < 2:
            continue
        lrs = sorted(o.grid)
        if o.chosen_lr in (lrs[0], lrs[-1]):
            side = "largest" if o.chosen_lr == lrs[-1] else "smallest"
            found.append(
                f"{o.method}: the chosen rate {o.chosen_lr:g} is the {side} it tried (the edge of its grid), "
                "so a better rate may lie beyond it; rerun with a larger --extend-grid or a wider --lr-grid"
            )
    return found
