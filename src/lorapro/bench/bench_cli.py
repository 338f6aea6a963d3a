"""``lorapro bench``: arguments and entry point (the CLI module only registers it)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .config import DEFAULT_LR_GRID, DEVICES, DTYPES, BenchConfig, BenchConfigError
from .errors import run_command
from .harness import run_benchmark
from .opening import opening_checks
from .options import positive_int as _positive_int
from .options import removed_if_left_empty
from .outcomes import BenchResult

__all__ = ["add_arguments", "diagnose_benchmark", "diagnose_steps", "run"]

DEFAULT_METHODS = "full,lora,lorapro"
#: Tasks written NAME:PATH.
_TAKES_PATH = ("text-csv", "jsonl")
#: Options the retraining of --diagnose (on the CPU) does not carry over yet, with the value
#: it assumes.
_NOT_DIAGNOSABLE = {
    "model": None, "target_modules": None, "eval_file": None, "answer_regex": None,
    "dtype": "float32", "grad_accum": 1, "max_steps": None,
}  # fmt: skip


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names such as q_proj,v_proj")
    return names


def _grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1e-4,1e-3, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("the learning-rate grid is empty")
    return tuple(sorted(values))


#: Other spellings of --dtype's values (Hugging Face's and torch's short names).
DTYPE_ALIASES = {
    "bf16": "bfloat16", "fp32": "float32", "torch.bfloat16": "bfloat16", "torch.float32": "float32",
}  # fmt: skip


def _max_length_defaults() -> str:
    """Each text task's default --max-length, read from the task classes."""
    from .tasks import gsm, jsonl, mr, text_csv, trec

    classes = (mr.MovieReviews, trec.TrecQuestions, text_csv.TextCsv, gsm.GSMSymbolicTask, jsonl.JsonlTask)
    return ", ".join(f"{c.name} {c.default_max_length}" for c in classes)


def _dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected float32 or bfloat16 (also written fp32, bf16), got {text!r}"
        )
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``lorapro bench``, in the order its help lists them."""
    _task_arguments(p)
    _grid_arguments(p)
    _size_arguments(p)
    _run_arguments(p)


def _task_arguments(p: argparse.ArgumentParser) -> None:
    """The task, and what replaces its model, LoRA targets and evaluation data."""
    from .tasks import task_names

    p.add_argument(
        "--task",
        default="mr",
        help=f"task: {', '.join(n + (':PATH' if n in _TAKES_PATH else '') for n in task_names())}",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a Hugging Face model folder (config, weights, tokenizer; read offline) in place of the "
        "task's model: a causal LM for jsonl, a new sequence-classification head for mr, trec, text-csv",
    )
    p.add_argument(
        "--target-modules",
        type=_names,
        metavar="NAMES",
        help="comma-separated modules that get LoRA, by name or name suffix as PEFT's target_modules "
        "(e.g. q_proj,v_proj); default: every linear layer of the body",
    )
    p.add_argument(
        "--eval-file",
        metavar="PATH",
        help="jsonl: a second JSONL file that validation and test are drawn from (half each by default); "
        "the --task file is then all training data",
    )
    p.add_argument(
        "--answer-regex",
        metavar="REGEX",
        help="jsonl: also score test exact match of the final answer: the regex's first group (or whole "
        "match) in the greedy generation against the one in the reference response",
    )


def _grid_arguments(p: argparse.ArgumentParser) -> None:
    """The methods, the seeds and the learning-rate grid they are tuned on."""
    from .methods import method_names

    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated methods from: {', '.join(method_names())}",
    )
    p.add_argument(
        "--seeds", type=_positive_int, default=3, help="seeds per method at the chosen lr (default 3)"
    )
    p.add_argument(
        "--lr-grid",
        type=_grid,
        default=DEFAULT_LR_GRID,
        help="learning rates tried for every method (seed 0, chosen on validation); "
        f"default {','.join(f'{x:g}' for x in DEFAULT_LR_GRID)}",
    )
    p.add_argument(
        "--extend-grid",
        type=int,
        default=2,
        metavar="N",
        help="when a method's best rate is at an end of the grid, try up to N more points beyond it, "
        "continuing the grid's spacing (default 2; 0 keeps the grid fixed)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=1,
        metavar="N",
        help="after the grid and its extension, N rounds of refinement: try the geometric midpoints "
        "between each method's best rate and its tried neighbours (half the spacing in log space, "
        "2 more runs per method and round; default 1, 0 keeps the grid's resolution)",
    )


def _size_arguments(p: argparse.ArgumentParser) -> None:
    """The data sizes, the training length and LoRA's hyper-parameters."""
    p.add_argument("--train-size", type=_positive_int, help="training examples (default: the task's)")
    p.add_argument("--val-size", type=_positive_int, help="validation examples (default: the task's)")
    p.add_argument("--test-size", type=_positive_int, help="test examples (default: the task's)")
    p.add_argument(
        "--max-length",
        type=_positive_int,
        help=f"maximum tokens per example (default: the task's: {_max_length_defaults()})",
    )
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default: the task's)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    p.add_argument(
        "--alpha",
        type=float,
        default=16.0,
        help="LoRA alpha (default 16; scaling alpha/r, alpha/sqrt(r) for rs*)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW weight decay, the same for every method (default 0; in LoRA-Pro's full mode it also "
        "decays the frozen base weights, as the paper's Eq. 57-58 do)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the train/validation/test split; it stays fixed while --seeds vary the training "
        "(default 0)",
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how runs train, where results go, and what else the command does."""
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where runs train: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda (default auto)",
    )
    p.add_argument(
        "--dtype",
        type=_dtype,
        default="float32",
        metavar="{float32,bfloat16}",
        help="float32, or bfloat16 (also bf16): frozen weights stored and the forward computed in bfloat16 "
        "(autocast), trained parameters and optimizer state kept in float32 (default float32)",
    )
    p.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="N",
        help="micro-batches of --batch-size accumulated into one optimizer step (default 1)",
    )
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        metavar="N",
        help="optimizer steps per run, in place of --epochs (the schedule spans them)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="score the validation split every N optimizer steps (and at the end), drawn beside the "
        "training loss in loss_curves.png (default 0: only after training; N > 0 changes the run hashes)",
    )
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default: bench-output/TASK)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the tables and plots from the runs stored in OUT so far "
        "(unfinished methods are marked pending)",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="afterwards, retrain seed 0 of each LoRA-family method at its chosen lr with the gradient "
        "monitor on ~13 steps, and write records and figures (as `lorapro diagnose`) to OUT/diagnose",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lorapro bench``; returns the exit status."""
    return run_command("bench", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    out = args.out or f"bench-output/{args.task.split(':', 1)[0]}"
    with removed_if_left_empty(out):  # a failed benchmark leaves no empty --out behind
        return _bench(args, out)


def _bench(args: argparse.Namespace, out: str) -> int:
    import torch

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    # Before anything is loaded or trained; the task is checked with its options by the harness.
    opening_checks(out=out, methods=methods, error=BenchConfigError)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.diagnose:
        given = [f"--{k.replace('_', '-')}" for k, v in _NOT_DIAGNOSABLE.items() if getattr(args, k) != v]
        given += ["--device cuda"] if args.device == "cuda" else []
        if given:
            raise BenchConfigError(
                f"--diagnose does not take {', '.join(given)} yet; run the benchmark without --diagnose"
            )
    cfg = BenchConfig(
        task=args.task,
        methods=methods,
        seeds=args.seeds,
        lr_grid=tuple(args.lr_grid),
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        max_length=args.max_length,
        epochs=args.epochs,
        batch_size=args.batch_size,
        rank=args.rank,
        alpha=args.alpha,
        weight_decay=args.weight_decay,
        data_seed=args.data_seed,
        extend_grid=args.extend_grid,
        refine=args.refine,
        out=out,
        model=args.model,
        target_modules=args.target_modules,
        eval_file=args.eval_file,
        answer_regex=args.answer_regex,
        device=args.device,
        dtype=args.dtype,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        eval_every=args.eval_every,
    )
    argv = getattr(args, "argv", None)
    result = run_benchmark(
        cfg,
        progress=not args.no_progress and not args.report_only,
        report_only=args.report_only,
        resume_command=shlex.join(["lorapro", "bench", *argv]) if argv is not None else None,
    )
    if args.diagnose:
        diagnose_benchmark(result, progress=not args.no_progress)
    return 0


def diagnose_steps(total_steps: int) -> list[int]:
    """The first steps (where B leaves zero) and ten more spread to the last one."""
    stride = max(1, total_steps // 10)
    candidates = {0, 1, 2, *range(stride, total_steps, stride), total_steps - 1}
    return sorted(s for s in candidates if 0 <= s < total_steps)


def diagnose_benchmark(result: BenchResult, *, progress: bool = True, log=print) -> None:
    """Retrain seed 0 at each diagnosable method's chosen lr with the gradient monitor."""
    import math

    from .diagnose import diagnose
    from .methods import get_method

    cfg = result.config
    done = [o for o in result.outcomes if o.runs]
    chosen = {o.method: o.chosen_lr for o in done if get_method(o.method).diagnosable}
    skipped = [o.method for o in done if not get_method(o.method).diagnosable]
    if skipped:
        log(f"diagnose: skipping {', '.join(skipped)} (no plain LoRA pairs to measure)")
    if not chosen:
        log("diagnose: no LoRA-family method to measure")
        return
    sizes = result.task_info["sizes"]
    batch = cfg.batch_size or result.task.default_batch_size
    total = math.ceil(sizes["train"] / batch) * (cfg.epochs or result.task.default_epochs)
    diagnose(
        task=cfg.task,
        methods=list(chosen),
        steps=diagnose_steps(total),
        max_steps=total,
        train_size=sizes["train"],
        val_size=sizes["validation"],
        test_size=sizes["test"],
        batch_size=batch,
        max_length=cfg.max_length,
        lrs=chosen,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        seed=0,
        out=Path(cfg.out) / "diagnose",
        progress=progress,
        log=log,
    )
