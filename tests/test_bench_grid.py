"""How each method's learning rate is chosen: refinement around the best rate (the same rule for
every method), the rule printed for each choice (ties included), and the resolution stated."""

from __future__ import annotations

import math

import pytest

from bench_runs import run_with_score as _fake_run
from lorapro.bench.grid import choice_rule, grid_plan, refine_around_best, resolution, selection_rule
from lorapro.bench.tasks import Metric


def _refine(grid, peak, rounds):
    def score(lr):  # unimodal in log(lr), peaked at `peak`
        return -abs(math.log(lr / peak))

    runs = {lr: _fake_run(lr, score(lr)) for lr in grid}
    tried: list[float] = []

    def run(lr):
        tried.append(lr)
        return _fake_run(lr, score(lr))

    added = refine_around_best(runs, rounds, Metric("accuracy"), None, run)
    assert added == tried
    return tried


@pytest.mark.parametrize(
    ("grid", "peak", "rounds", "expected"),
    [
        # Half-steps in log space on both sides of the best rate, rounded to two digits.
        ((1e-4, 5e-4, 2e-3), 5e-4, 1, [2.2e-4, 1e-3]),
        # A second round halves again around the (new) best rate.
        ((1e-4, 5e-4, 2e-3), 7e-4, 2, [2.2e-4, 1e-3, 3.3e-4, 7.1e-4]),
        # At an end, the inner half-step mirrored outwards.
        ((1e-4, 1e-3), 1e-5, 1, [3.2e-5, 3.2e-4]),
        ((1e-4, 5e-4, 2e-3), 5e-4, 0, []),
        ((1e-3,), 1e-3, 1, []),  # one rate: no spacing to halve
    ],
)
def test_refinement_halves_the_spacing_around_the_best_rate(grid, peak, rounds, expected):
    assert _refine(grid, peak, rounds) == pytest.approx(expected)


def test_refinement_stops_where_the_midpoints_round_to_tried_rates():
    # Midpoints 1.05e-3 and 1.15e-3 round (two digits) to 1e-3 and 1.1e-3, both tried.
    runs = {lr: _fake_run(lr, s) for lr, s in ((1e-3, 0.1), (1.1e-3, 0.9), (1.2e-3, 0.1))}
    tried = []
    refine_around_best(runs, 3, Metric("accuracy"), None, lambda lr: tried.append(lr) or _fake_run(lr, 0.0))
    assert tried == []


def test_choice_rule_names_the_winner_the_runner_up_and_every_tie():
    metric = Metric("accuracy")
    scores = {1e-3: 0.8, 1e-2: 0.8, 1e-4: 0.5, 1e-1: math.nan}
    text = choice_rule(scores, 1e-3, metric, {1e-3: "grid", 1e-2: "grid"}, diverged=[1e-1])
    assert text == (
        "lr 0.001: highest validation accuracy 0.8000 of 4 rates; tied with 0.01: the smaller rate is kept; "
        "runner-up 0.0001 at 0.5000; diverged at 0.1"
    )
    loss = choice_rule(
        {1e-3: 1.2, 4e-3: 0.9}, 4e-3, Metric("loss", higher_is_better=False), {4e-3: "refinement"}
    )
    assert (
        loss == "lr 0.004 (a refinement): lowest validation loss 0.9000 of 2 rates; runner-up 0.001 at 1.2000"
    )
    assert selection_rule(metric) == "highest validation accuracy on seed 0; a tie keeps the smaller rate"


def test_resolution_and_plan_state_how_finely_the_rate_is_located():
    assert resolution([1e-4, 5e-4, 2e-3], 5e-4) == {
        "lower": 1e-4,
        "upper": 2e-3,
        "factor": 5.0,
        "bracketed": True,
    }
    edge = resolution([1e-4, 5e-4], 5e-4)
    assert edge["factor"] == 5.0 and not edge["bracketed"]
    assert resolution([1e-3], 1e-3)["factor"] is None
    plan = grid_plan((1e-4, 5e-4, 2e-3), 2, 1)
    assert "(x4 to x5 apart)" in plan and "one round of half-steps in log space" in plan
    assert "no refinement (--refine 1" in grid_plan((1e-4, 4e-4), 0, 0)
