"""What the bench tests build runs from: the arguments of a quick ``lorapro bench`` (one seed, no
grid extension or refinement, one thread), and a run record holding only a validation score,
for the learning-rate grid's rules."""

from __future__ import annotations

from lorapro.bench.records import RunResult


def quick_bench_argv(*args: str) -> list[str]:
    return [
        "bench", "--no-progress", "--seeds", "1", "--extend-grid", "0", "--refine", "0",
        "--threads", "1", *args,
    ]  # fmt: skip


def run_with_score(lr: float, score: float, diverged: bool = False) -> RunResult:
    return RunResult(
        method="m", lr=lr, seed=0, validation={"accuracy": score}, test={}, final_train_loss=0.0,
        loss_curve=[], steps=1, trainable_params=1, optimizer_state_bytes=0, train_seconds=0.0,
        seconds=0.0, diverged=diverged,
    )  # fmt: skip
