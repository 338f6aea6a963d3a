"""The ``lorapro`` command line.

Each subcommand is a ``(add_arguments, run)`` pair registered in :func:`build_parser`, so
``bench`` and ``diagnose`` slot in next to ``demo`` without touching the others. Heavy
imports happen inside ``run`` functions: ``lorapro --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from ._extras import BENCH_MODULES, MissingExtraError, require
from .bench.options import DefaultsHelpFormatter, removed_if_left_empty, require_writable_folder
from .bench.options import positive_int as _positive_int


def _lrs_or_exit(values: Sequence[str] | None, methods: Sequence[str]) -> dict[str, float]:
    from .bench.options import parse_lrs

    try:
        return parse_lrs(values, methods)
    except ValueError as exc:
        raise SystemExit(f"lorapro demo: {exc}") from None


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .bench.demo import DEFAULT_METHODS, DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE

    p = sub.add_parser(
        "demo",
        help="compare full fine-tuning, LoRA and LoRA-Pro on movie-review polarity (offline, CPU)",
        description=(
            "Fine-tune all-MiniLM-L6-v2 on movie-review sentence polarity with each method, "
            "with identical seed, data and step budget, and compare final training loss and "
            "held-out accuracy. Any method of `lorapro bench` can be given. Default learning rates: "
            "the ones `lorapro bench --task mr` chose (full 5e-4, lora 2e-3, lorapro 2e-3); other "
            "methods use their registered default."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to run")
    p.add_argument(
        "--lr",
        action="append",
        metavar="[METHOD=]RATE",
        help="learning-rate override: RATE for every method or METHOD=RATE (repeatable)",
    )
    p.add_argument("--train-size", type=_positive_int, default=DEFAULT_TRAIN_SIZE, help="training sentences")
    p.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE, help="validation sentences")
    p.add_argument("--test-size", type=_positive_int, default=DEFAULT_TEST_SIZE, help="test sentences")
    p.add_argument("--epochs", type=_positive_int, default=1, help="epochs over the training sentences")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    p.add_argument("--out", default="demo-output", help="folder for results.json and loss_curves.png")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    with removed_if_left_empty(args.out):  # a failed demo leaves no empty --out behind
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from .bench.demo import run_demo

    require_writable_folder(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(
        methods=methods,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        epochs=args.epochs,
        seed=args.seed,
        out=args.out,
        lrs=_lrs_or_exit(args.lr, methods),
        progress=not args.no_progress,
    )
    return 0


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    from .bench import diagnose

    p = sub.add_parser(
        "diagnose",
        help="measure how far LoRA's and LoRA-Pro's equivalent gradients are from the full gradient",
        description=(
            "Train with each method and, on the chosen steps, record per layer the relative distance "
            "and cosine of LoRA's and LoRA-Pro's equivalent gradients to the full gradient, and the "
            "ranks and singular values of A and B; writes JSONL/CSV records and PNG figures."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    diagnose.add_arguments(p)
    p.set_defaults(run=diagnose.run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import bench_cli

    p = sub.add_parser(
        "bench",
        help="tune, run and compare methods on a task (tables, JSON and plots)",
        description=(
            "For every method, try each learning rate of one grid on seed 0 and choose by the validation "
            "split; run the chosen rate on N seeds; report test mean +- std, the share of the LoRA-to-full "
            "gap closed, loss curves and a bar chart. Finished runs are stored by config hash and reused."
        ),
    )
    bench_cli.add_arguments(p)
    p.set_defaults(run=bench_cli.run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one table across benchmark folders: methods x tasks, test mean +- std",
        description="Read summary.json from each `lorapro bench` output folder and print (or write) "
        "one Markdown table in the paper's layout: a row per method, a column per task.",
    )
    p.add_argument("folders", nargs="+", help="output folders of `lorapro bench`")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench.report import combined_table, load_summary

    try:
        summaries = [load_summary(folder) for folder in args.folders]
    except FileNotFoundError as exc:
        print(f"lorapro report: error: {exc}", file=sys.stderr)
        return 2
    table = combined_table(summaries)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapro", description="LoRA-Pro for PEFT models: demo and tools.")
    parser.add_argument("--version", action="version", version=f"lorapro {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_diagnose(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # answered without the bench's packages
        print(f"lorapro {__version__}")
        return 0
    try:
        # Every command is part of the bench and imports its packages while building the parser.
        require(BENCH_MODULES, "the lorapro command", extra="bench")
    except MissingExtraError as exc:
        print(f"lorapro: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the command's own arguments: the bench names them in its resume hint
    from .bench.errors import run_command

    # The one mapping from errors to exit statuses (shared with the bench's own entry points):
    # set-up problems and bad option values print one line and exit 2, Ctrl-C exits 130, and
    # anything else keeps its traceback, which is what a bug report needs.
    return run_command(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
