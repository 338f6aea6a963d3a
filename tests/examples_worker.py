"""Run examples under ``examples/`` in this process, as torchrun would start them.

    python tests/examples_worker.py OUT NAME[:ARG,ARG...] ...

Each example's ``main(argv)`` runs in turn (a distributed example initialises and destroys its
own process group, so launch one of those per process); what it returns is written to
``OUT/<name>_rank<k>.json`` (or the traceback to ``.err``). Launched by
tests/test_integration_examples.py.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(EXAMPLES))
    out, rank = Path(sys.argv[1]), os.environ.get("RANK", "0")
    for spec in sys.argv[2:]:
        name, _, argv = spec.partition(":")
        module = importlib.import_module(name)
        try:
            result = module.main(argv.split(",") if argv else [])
            keep = {k: v for k, v in result.items() if isinstance(v, list | str | float | int | dict)}
            (out / f"{name}_rank{rank}.json").write_text(json.dumps(keep, default=float))
        except BaseException:
            (out / f"{name}_rank{rank}.err").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
