"""What the benchmark tells the user before and while it runs: the data it uses, the runs it
plans, how long they should take at the first run's pace, and how to resume after Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path

from .config import BenchConfig
from .run_store import stored_runs

__all__ = ["describe_sizes", "interrupted_message", "pace_estimate", "plan_text", "run_plan"]


def describe_sizes(sizes: dict[str, int] | None) -> str:
    """``1000 train / 300 validation / 1000 test examples (of 5000)``; the sizes as a task gives them."""
    if not sizes:
        return "sizes not given"
    text = " / ".join(f"{sizes[k]} {k}" for k in ("train", "validation", "test") if k in sizes) + " examples"
    return text + (f" (of {sizes['pool']})" if "pool" in sizes else "")


def run_plan(cfg: BenchConfig) -> tuple[int, int]:
    """The runs the benchmark plans (every method: the grid on seed 0, then its chosen rate on the
    other seeds), and the most it can take when every method's grid extends and refines."""
    per_method = len(cfg.lr_grid) + cfg.seeds - 1
    extra = cfg.extend_grid + 2 * cfg.refine
    return len(cfg.methods) * per_method, len(cfg.methods) * (per_method + extra)


def plan_text(cfg: BenchConfig, n_rates: int, planned: int, at_most: int, out: Path) -> str:
    seeds = cfg.seeds - 1
    then = f", then each method's chosen rate on {seeds} more seed{'s' if seeds > 1 else ''}" if seeds else ""
    text = f"Plan: {len(cfg.methods)} methods x {n_rates} rates on seed 0{then}: {planned} runs"
    more = []
    if cfg.extend_grid:
        more.append(f"up to {cfg.extend_grid} per method where a best rate sits at the grid's edge")
    if cfg.refine:
        more.append(f"{2 * cfg.refine} per method for refinement")
    if at_most > planned:
        text += f", and up to {at_most - planned} more ({'; '.join(more)})"
    return text + f". Runs stored under {out / 'runs'} are reused, not repeated."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def pace_estimate(first: float, left: int, extra: int) -> str:
    """The time the remaining runs take at the first run's pace (methods differ in speed)."""
    text = f"First run: {_duration(first)}; at that pace the {left} remaining planned runs take about "
    text += _duration(first * left)
    if extra:
        text += f" ({_duration(first * (left + extra))} if every grid extends and refines)"
    return text + "."


def interrupted_message(out: Path, executed: int, resume_command: str | None) -> str:
    stored = stored_runs(out)
    again = f"rerun `{resume_command}`" if resume_command else "rerun the same command"
    return (
        f"\nInterrupted: {stored} finished run{'s' if stored != 1 else ''} stored under {out / 'runs'} "
        f"({executed} of them trained in this invocation; the run in progress is lost). To resume, {again}: "
        "stored runs are reused, not repeated."
    )
