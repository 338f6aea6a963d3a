"""``--eval-every``: a validation curve recorded beside the training loss, without changing training
or the hashes of runs that do not ask for it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bench_tiny import TinyTask
from lorapro.bench.config import BenchConfig, BenchConfigError
from lorapro.bench.harness import _runtime_key, run_benchmark, run_hash
from lorapro.bench.records import VALIDATION_CURVE_KEY, validation_curve_of
from lorapro.bench.tasks import TaskOptions
from lorapro.bench.train import TrainConfig, train_and_evaluate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def prepared():
    return TinyTask().prepare(TaskOptions())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_curve_has_a_point_every_n_steps_and_at_the_end_and_training_is_unchanged(prepared, method):
    # lora_dropout and BERT's own dropout draw from the global generator: evaluation must not.
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=16, seed=1, lora_dropout=0.1)
    plain = train_and_evaluate(method, prepared, cfg, evaluate_on=("validation",), progress=False)
    curved = train_and_evaluate(
        method, prepared, cfg, evaluate_on=("validation",), progress=False, eval_every=3
    )
    assert plain.steps == curved.steps == 8  # 64 examples, batch 16, 2 epochs
    assert curved.loss_curve == plain.loss_curve  # exactly: evaluation changed nothing
    assert curved.validation == plain.validation
    assert VALIDATION_CURVE_KEY not in plain.extra and validation_curve_of(plain) == {}
    curve = validation_curve_of(curved)
    assert curve["split"] == "validation" and curve["every"] == 3
    assert curve["steps"] == [3, 6, 8]  # multiples of 3, then the end
    values = curve["metrics"]["accuracy"]
    assert len(values) == 3 and all(math.isfinite(v) and 0 <= v <= 1 for v in values)
    assert values[-1] == plain.validation["accuracy"]


def test_an_evaluate_that_draws_random_numbers_and_leaves_eval_mode_changes_nothing(prepared):
    def careless(model, split):
        torch.rand(3)  # e.g. sampling; and no return to train mode afterwards
        model.eval()
        return prepared.evaluate(model, split)

    task = dataclasses.replace(prepared, evaluate=careless)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=16, seed=2, lora_dropout=0.1)
    plain = train_and_evaluate("lora", task, cfg, evaluate_on=(), progress=False)
    curved = train_and_evaluate("lora", task, cfg, evaluate_on=(), progress=False, eval_every=1)
    assert curved.loss_curve == plain.loss_curve
    assert validation_curve_of(curved)["steps"] == list(range(1, 9))


def test_last_step_a_multiple_of_n_is_scored_once(prepared):
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=16, seed=0)
    run = train_and_evaluate("lora", prepared, cfg, evaluate_on=(), progress=False, eval_every=4)
    assert validation_curve_of(run)["steps"] == [4, 8]


def test_the_option_at_its_default_keeps_every_hash():
    """Runs stored without the option keep their hashes (and so are reused); asking for a curve
    gives new ones, since a stored run without a curve cannot stand in for one with it."""
    base = dict(task="trec", lr_grid=(1e-4,), train_size=1000, val_size=300, test_size=1000, epochs=2)
    without = _runtime_key(BenchConfig(**base), "cpu")
    assert without == _runtime_key(BenchConfig(**base, eval_every=0), "cpu") == {}
    assert run_hash({"x": 1, **without}) == run_hash({"x": 1})
    assert _runtime_key(BenchConfig(**base, eval_every=5), "cpu") == {"runtime": {"eval_every": 5}}
    with pytest.raises(BenchConfigError, match="--eval-every"):
        BenchConfig(**base, eval_every=-1).validate()


def test_benchmark_records_the_curve_and_draws_it(tmp_path):
    cfg = BenchConfig(
        task="tiny", methods=("lora",), seeds=1, lr_grid=(1e-2,), extend_grid=0, out=str(tmp_path),
        eval_every=2,
    )  # fmt: skip
    result = run_benchmark(cfg, task=TinyTask(), progress=False, log=lambda _: None)
    stored = json.loads(next((tmp_path / "runs" / "lora").glob("*.json")).read_text())
    assert stored["key"]["runtime"] == {"eval_every": 2}
    assert stored["result"]["extra"][VALIDATION_CURVE_KEY]["steps"] == [2, 4, 6, 8]
    assert validation_curve_of(result.outcomes[0].runs[0])["steps"] == [2, 4, 6, 8]
    assert (tmp_path / "loss_curves.png").is_file()
