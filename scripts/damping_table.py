"""The table of docs/results.md's "Damping the pseudo-inverses" from the stored runs.

Usage: python scripts/damping_table.py results/trec results/fashion results/mr
Reads results/TASK/runs/METHOD/lr*-seed*.json (the bench's store) at each task's lorapro rate, and
compares methods with the bench's own statistics (lorapro.bench.stats.compare: a paired bootstrap
over test examples and seeds where both runs kept per-example outcomes, else a t-interval over
seeds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorapro.bench.records import examples_of
from lorapro.bench.stats import SeedOutcome, compare, spread

DAMPINGS = ("0.001", "0.01", "0.1")
#: Tried beyond the grid's top where the best of the grid sat there (the bench's edge rule).
EXTENSION = ("1",)
#: lorapro's stored tuned rate per task (results/TASK/results.md).
RATES = {"trec": 0.002, "mr": 0.002, "fashion": 0.008}


class _Run:
    def __init__(self, result: dict) -> None:
        self.__dict__.update(result)


def runs(folder: Path, method: str, lr: float) -> dict[int, dict]:
    out = {}
    for path in sorted((folder / "runs" / method).glob(f"lr{lr:g}-seed*-*.json")):
        result = json.loads(path.read_text())["result"]
        out[result["seed"]] = result
    return out


def outcomes(found: dict[int, dict]) -> list[SeedOutcome]:
    rows = []
    for seed, result in sorted(found.items()):
        examples = examples_of(_Run(result)).get("accuracy") or {}
        rows.append(
            SeedOutcome(seed, result["test"]["accuracy"], examples.get("values"), examples.get("weights"))
        )
    return rows


def main(folders: list[str]) -> None:
    for name in folders:
        folder = Path(name)
        task = folder.name
        lr = RATES[task]
        val = {d: runs(folder, f"lorapro-damped-{d}", lr).get(0, {}).get("validation", {}).get("accuracy")
               for d in DAMPINGS + EXTENSION}  # fmt: skip
        done = {d: v for d, v in val.items() if v is not None}
        complete = all(d in done for d in DAMPINGS)
        chosen = max(done, key=lambda d: (done[d], -float(d))) if complete else None
        print(f"\n## {task} (lr {lr:g}); seed-0 validation accuracy by damping: "
              + ", ".join(f"{d}: {v:.4f}" for d, v in val.items() if v is not None)
              + f"; chosen: {chosen}")  # fmt: skip
        methods = ["lora", "lorapro", "lorapro-damped-0"] + ([f"lorapro-damped-{chosen}"] if chosen else [])
        table = {m: runs(folder, m, lr) for m in methods}
        print("| method | validation (seed 0) | validation | test |")
        print("|---|---:|---:|---:|")
        for m, found in table.items():
            v0 = found.get(0, {}).get("validation", {}).get("accuracy")
            vals = [r["validation"]["accuracy"] for r in found.values()]
            tests = [r["test"]["accuracy"] for r in found.values()]
            shown = "not run" if v0 is None else f"{v0:.4f}"
            print(f"| {m} | {shown} | {spread(vals)} | {spread(tests)} |")
        if chosen:
            mine = outcomes(table[f"lorapro-damped-{chosen}"])
            for ref in ("lora", "lorapro", "lorapro-damped-0"):
                if not table[ref]:
                    continue
                c = compare(f"lorapro-damped-{chosen}", ref, "accuracy", True, mine, outcomes(table[ref]))
                interval = "no interval" if c.low is None else f"[{c.low:+.4f}, {c.high:+.4f}]"
                print(f"- against {ref}: {c.difference:+.4f} {interval} **{c.verdict}** ({c.basis})")


if __name__ == "__main__":
    main(sys.argv[1:])
