"""The benchmark's options: :class:`BenchConfig`, its checks, and the device and dtype choices.

Which of these options enter a stored run's hash is decided in :mod:`lorapro.bench.harness`
(``base_key`` and ``_runtime_key``), not here: a new option here changes no hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SetupError
from .methods import get_method

__all__ = [
    "DEFAULT_LR_GRID",
    "DEVICES",
    "DTYPES",
    "BenchConfig",
    "BenchConfigError",
    "resolve_device",
]

#: Spans full fine-tuning's natural scale (~5e-5 on MiniLM) to LoRA's (2e-3 and more on
#: TREC): a grid stopping at 5e-4 makes LoRA look worse than it is (field notes). About
#: 4x apart, so the chosen rate is within 2x of the grid's best possible.
DEFAULT_LR_GRID: tuple[float, ...] = (5e-5, 2e-4, 1e-3, 5e-3)

#: ``--device`` choices; ``auto`` is CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: ``--dtype`` choices: the dtype frozen weights are stored and the forward computed in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BenchConfigError(SetupError):
    """The benchmark's options are inconsistent; the message names the option to change."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    if device not in DEVICES:
        raise BenchConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no CUDA device here"
        )
        raise BenchConfigError(f"--device cuda: {why}; use --device cpu (or auto)")
    return device


@dataclass(frozen=True)
class BenchConfig:
    task: str = "mr"
    methods: tuple[str, ...] = ("full", "lora", "lorapro")
    seeds: int = 3
    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    max_length: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    weight_decay: float = 0.0
    data_seed: int = 0
    #: Extra grid points a method may get beyond an end of the grid where its best rate lies.
    extend_grid: int = 2
    #: Rounds of refinement after the grid and its extension: each tries the geometric
    #: midpoints between a method's best rate and its tried neighbours (half the log-spacing).
    #: 0 here (the library default); the ``lorapro bench`` command refines once by default.
    refine: int = 0
    out: str = "bench-output"
    #: A Hugging Face model folder in place of the task's bundled model (text tasks, jsonl).
    model: str | None = None
    #: Names (or name suffixes, as PEFT's target_modules) of the modules that get LoRA;
    #: None: the task's default, every linear layer of the body.
    target_modules: tuple[str, ...] | None = None
    #: jsonl: the file validation and test come from (else they are split out of the data).
    eval_file: str | None = None
    #: jsonl: the final answer of a response (its first group, else the whole match) for
    #: the test split's exact match.
    answer_regex: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    #: Micro-batches of batch_size accumulated into one optimizer step.
    grad_accum: int = 1
    #: Optimizer steps per run; when set it replaces the epochs (the schedule spans it).
    max_steps: int | None = None
    #: Score the validation split every N optimizer steps (and at the end) for the loss-curve
    #: figure's validation curve; 0: only after training.
    eval_every: int = 0

    def validate(self) -> None:
        if not self.methods:
            raise BenchConfigError("no methods given; pass --methods full,lora,lorapro")
        if len(set(self.methods)) != len(self.methods):
            raise BenchConfigError(f"a method is listed twice in --methods {','.join(self.methods)}")
        for m in self.methods:
            try:
                get_method(m)
            except ValueError as exc:
                raise BenchConfigError(str(exc)) from None
        if self.seeds < 1:
            raise BenchConfigError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.lr_grid or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lr_grid):
            raise BenchConfigError(f"--lr-grid needs positive learning rates, got {self.lr_grid}")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise BenchConfigError(f"--lr-grid lists a rate twice: {self.lr_grid}")
        for name in ("train_size", "val_size", "test_size", "max_length", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BenchConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.extend_grid < 0:
            raise BenchConfigError(f"--extend-grid must be >= 0, got {self.extend_grid}")
        if self.refine < 0:
            raise BenchConfigError(f"--refine must be >= 0, got {self.refine}")
        if self.rank < 1:
            raise BenchConfigError(f"--rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise BenchConfigError(f"--alpha must be > 0, got {self.alpha}")
        if self.dtype not in DTYPES:
            raise BenchConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.grad_accum < 1:
            raise BenchConfigError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.max_steps is not None and self.max_steps < 1:
            raise BenchConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.eval_every < 0:
            raise BenchConfigError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.target_modules is not None and not [t for t in self.target_modules if t.strip()]:
            raise BenchConfigError("--target-modules is empty; name modules such as q_proj,v_proj")
        resolve_device(self.device)
