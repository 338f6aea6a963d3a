"""How each method's learning rate is chosen: the common grid, its extension past an edge, its
refinement around the best point, and the rule that picked the rate, in words.

The same rules for every method: the grid stays common, it grows only where a method's optimum
is not bracketed (extension) or to halve the spacing around its best point (refinement), and
each method gets the same number of extra points for the same situation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .records import RunResult
from .tasks.base import Metric

__all__ = [
    "COARSE",
    "EDGE",
    "REFINED",
    "best_lr",
    "choice_rule",
    "extend_at_edges",
    "refine_around_best",
    "resolution",
    "round_rate",
    "selection_rule",
    "spacing",
]

#: Where a tried rate came from.
COARSE, EDGE, REFINED = "grid", "edge", "refinement"


def score(run: RunResult, selection: Metric) -> float:
    return run.validation.get(selection.name, math.nan)


def best_lr(runs: Mapping[float, RunResult], selection: Metric) -> float:
    """The rate with the best validation score; ties keep the smaller rate."""
    lrs = sorted(runs)
    best = lrs[0]
    for lr in lrs[1:]:
        if selection.better(score(runs[lr], selection), score(runs[best], selection)):
            best = lr
    return best


def round_rate(lr: float) -> float:
    """Two significant digits, so new points print cleanly (8e-3, not 8.0000001e-3)."""
    return float(f"{lr:.2g}")


def _try_rate(
    lr: float, runs: dict[float, RunResult], bar: Any, run: Callable[[float], RunResult], added: list[float]
) -> None:
    """Run one more rate, counted in the progress bar and in ``added``."""
    if bar is not None:
        bar.total += 1
    runs[lr] = run(lr)
    added.append(lr)


def extend_at_edges(
    runs: dict[float, RunResult],
    max_extensions: int,
    selection: Metric,
    bar: Any,
    run: Callable[[float], RunResult],
) -> list[float]:
    """While a method's best rate sits at an end of the grid, try one more point beyond it.

    It only grows where the optimum is not bracketed (LoRA on TREC still improved at the top
    of a grid that suits full fine-tuning). New points continue the grid's spacing at that end;
    a diverged top is not extended. Returns the rates added.
    """
    added: list[float] = []
    for _ in range(max_extensions):
        lrs = sorted(runs)
        if len(lrs) < 2:
            break
        best = best_lr(runs, selection)
        if best == lrs[-1] and not runs[best].diverged:
            new = round_rate(lrs[-1] * lrs[-1] / lrs[-2])
        elif best == lrs[0]:
            new = round_rate(lrs[0] * lrs[0] / lrs[1])
        else:
            break
        _try_rate(new, runs, bar, run, added)
    return added


def refine_around_best(
    runs: dict[float, RunResult],
    rounds: int,
    selection: Metric,
    bar: Any,
    run: Callable[[float], RunResult],
) -> list[float]:
    """Halve the log-spacing around the best rate, ``rounds`` times: each round tries the geometric
    midpoints between the best rate and its tried neighbours below and above (where it has no
    neighbour on a side, the other side's half-step mirrored), rounded to two digits; a midpoint
    already tried is skipped. Returns the rates added.
    """
    added: list[float] = []
    for _ in range(rounds):
        lrs = sorted(runs)
        if len(lrs) < 2:
            break  # one rate: no spacing to halve
        best = best_lr(runs, selection)
        i = lrs.index(best)
        # Half-steps (log space) to each neighbour; without one on a side, the other side's.
        down = math.sqrt(best / lrs[i - 1]) if i > 0 else math.sqrt(lrs[i + 1] / best)
        up = math.sqrt(lrs[i + 1] / best) if i + 1 < len(lrs) else down
        new = [lr for lr in dict.fromkeys((round_rate(best / down), round_rate(best * up))) if lr not in runs]
        if not new:
            break
        for lr in new:
            _try_rate(lr, runs, bar, run, added)
    return added


def spacing(lrs: Sequence[float]) -> tuple[float, float] | None:
    """The smallest and largest ratio between neighbouring rates; None for fewer than two."""
    lrs = sorted(lrs)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    return (min(ratios), max(ratios)) if ratios else None


def resolution(lrs: Sequence[float], chosen: float) -> dict[str, Any]:
    """How finely ``chosen`` is located among the tried rates: its neighbours, the largest ratio
    to one of them (the best rate lies within that factor of ``chosen`` if the score is
    unimodal and bracketed), and whether it is bracketed on both sides."""
    lrs = sorted(lrs)
    i = lrs.index(chosen)
    lower = lrs[i - 1] if i > 0 else None
    upper = lrs[i + 1] if i + 1 < len(lrs) else None
    ratios = [r for r in ((chosen / lower) if lower else None, (upper / chosen) if upper else None) if r]
    return {
        "lower": lower,
        "upper": upper,
        "factor": max(ratios) if ratios else None,
        "bracketed": lower is not None and upper is not None,
    }


def selection_rule(selection: Metric) -> str:
    """The rule every method's rate is chosen by, in words."""
    best = "highest" if selection.higher_is_better else "lowest"
    return f"{best} validation {selection.name} on seed 0; a tie keeps the smaller rate"


def choice_rule(
    scores: Mapping[float, float],
    chosen: float,
    selection: Metric,
    origins: Mapping[float, str] | None = None,
    diverged: Sequence[float] = (),
) -> str:
    """Why ``chosen`` won, in one line: its score, the runner-up, every rate it tied with."""
    origins = origins or {}
    best = "highest" if selection.higher_is_better else "lowest"
    mine = scores[chosen]
    where = {EDGE: " (an edge extension)", REFINED: " (a refinement)"}.get(origins.get(chosen, COARSE), "")
    text = f"lr {chosen:g}{where}: {best} validation {selection.name} {mine:.4f} of {len(scores)} rates"
    ties = sorted(lr for lr, s in scores.items() if lr != chosen and s == mine)
    others = [(lr, s) for lr, s in scores.items() if lr != chosen and s != mine and s == s]
    if ties:
        text += f"; tied with {', '.join(f'{lr:g}' for lr in ties)}: the smaller rate is kept"
    if others:
        lr, s = min(others, key=lambda x: -x[1] if selection.higher_is_better else x[1])
        text += f"; runner-up {lr:g} at {s:.4f}"
    if diverged:
        text += f"; diverged at {', '.join(f'{lr:g}' for lr in sorted(diverged))}"
    return text


def grid_plan(lr_grid: Sequence[float], extend_grid: int, refine: int) -> str:
    """How the rates are tried and how finely, in one sentence (printed and in results.md)."""
    grid = sorted(lr_grid)
    ratio = spacing(grid)
    apart = "" if ratio is None else f" ({_ratio_range(*ratio)} apart)"
    text = f"Rates tried: the grid {', '.join(f'{x:g}' for x in grid)}{apart}"
    if extend_grid:
        text += f", up to {extend_grid} more beyond an end where a method's best rate lies"
    if refine:
        rounds = "one round" if refine == 1 else f"{refine} rounds"
        text += f", then {rounds} of half-steps in log space on both sides of each method's best rate"
    else:
        text += "; no refinement (--refine 1 halves the spacing around each method's best rate)"
    return text + "."


def _ratio_range(low: float, high: float) -> str:
    return f"x{low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"x{low:.2g} to x{high:.2g}"
