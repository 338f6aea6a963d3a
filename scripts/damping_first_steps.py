"""How large efficient mode's adjusted gradients are over the first steps of the trec run, by damping.

Usage: python scripts/damping_first_steps.py [STEPS]   (docs/results.md, "Damping the pseudo-inverses")

Trains the bench's trec run (MiniLM, 1,000 examples, lr 2e-3, seed 0, the bench's schedule) with
``lorapro-damped-D`` for each damping D (0 is lorapro), stops after STEPS steps, and prints at every
step, over all LoRA layers, ||adjusted grad|| / ||LoRA's grad|| for A and for B (the adjustment
includes 1/s^2 = 1/4) and the median over layers of max eig(B^T B) / mean eig(A A^T).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from lorapro import find_lora_pairs
from lorapro.bench.harness import _get_task
from lorapro.bench.tasks import TaskOptions
from lorapro.bench.train import TrainConfig, train_and_evaluate
from lorapro.closed_form import optimal_gradients


class _Stop(Exception):
    pass


class _Probe:
    """A monitor for train_and_evaluate: its ``measure(step)`` runs after each backward."""

    def __init__(self, model: torch.nn.Module, damping: float, steps: int) -> None:
        self.pairs, self.damping, self.steps = find_lora_pairs(model), damping, steps
        self.rows: list[tuple[int, float, float, float]] = []

    @contextlib.contextmanager
    def measure(self, step: int):
        yield
        if step >= self.steps:
            raise _Stop  # the rest of the run is not needed
        sums = torch.zeros(4, dtype=torch.float64)
        ratios = []
        for p in self.pairs:
            A, B = p.matrix_A().detach(), p.matrix_B().detach()
            gA, gB = p.matrix_A(p.A.grad), p.matrix_B(p.B.grad)
            a, b = optimal_gradients(A, B, gA, gB, p.scaling, damping=self.damping)
            sums += torch.tensor([float(t.double().norm() ** 2) for t in (a, gA, b, gB)], dtype=torch.float64)
            btb, aat = B.double().T @ B.double(), A.double() @ A.double().T
            ratios.append(float(torch.linalg.eigvalsh(btb)[-1] / torch.linalg.eigvalsh(aat).mean()))
        ratio_a = float((sums[0] / sums[1]).sqrt()) if sums[1] > 0 else 0.0
        self.rows.append((step, ratio_a, float((sums[2] / sums[3]).sqrt()), sorted(ratios)[len(ratios) // 2]))


def main(steps: int) -> None:
    torch.set_num_threads(1)
    prepared = _get_task("trec").prepare(TaskOptions(train_size=1000, val_size=300, test_size=1000))
    for damping in (0.0, 1e-3, 1e-2, 1e-1):
        name = "lorapro" if damping == 0 else f"lorapro-damped-{damping:g}"
        probes: list[_Probe] = []

        def make(model: torch.nn.Module, damping: float = damping, probes: list = probes) -> _Probe:
            probes.append(_Probe(model, damping, steps))
            return probes[-1]

        with contextlib.suppress(_Stop):
            cfg = TrainConfig(lr=2e-3, epochs=2, batch_size=32, seed=0)
            train_and_evaluate(name, prepared, cfg, evaluate_on=(), make_monitor=make, progress=False)
        for step, ratio_a, ratio_b, eig in probes[0].rows:
            print(
                f"damping {damping:g} step {step}: |adj A|/|grad A| {ratio_a:.3g}  "
                f"|adj B|/|grad B| {ratio_b:.3g}  median max eig(BtB)/mean eig(AAt) {eig:.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
