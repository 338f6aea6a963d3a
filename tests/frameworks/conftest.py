"""Tests of the framework integrations. Each framework pins its own transformers/peft/trl, so
each test file runs inside that framework's virtual environment (``make test-frameworks``);
a file whose framework is not installed is not collected, so the main suite skips this folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # capture, tiny_model, framework_checks; tests/reference.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

FRAMEWORK_OF_FILE = {
    "test_llamafactory.py": "llamafactory",
    "test_swift.py": "swift",
    "test_axolotl.py": "axolotl",
}
collect_ignore = [f for f, module in FRAMEWORK_OF_FILE.items() if importlib.util.find_spec(module) is None]
