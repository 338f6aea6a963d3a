"""Where the benchmark keeps its finished runs: one JSON file per run under ``out/runs/<method>/``,
named by the run's hash, and a marker beside it for a run its method could not build.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from .records import RunResult

__all__ = ["RunStore", "stored_runs"]


class RunStore:
    """One JSON file per finished run under ``out/runs/<method>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, method: str, lr: float, seed: int, digest: str) -> Path:
        return self.root / method / f"lr{lr:g}-seed{seed}-{digest}.json"

    def load(self, path: Path, digest: str) -> RunResult | None:
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a torn file from a killed run: run it again
        if payload.get("hash") != digest:
            return None
        return RunResult.from_dict(payload["result"])

    @staticmethod
    def _refusal_path(path: Path) -> Path:
        return path.with_name(path.stem + ".unavailable.json")

    def refusal(self, path: Path, digest: str, env: dict) -> str | None:
        """Why this run could not be built, if an earlier invocation found out with the same PEFT."""
        marker = self._refusal_path(path)
        if not marker.is_file():
            return None
        try:
            payload = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if payload.get("hash") != digest or payload.get("peft") != env.get("peft"):
            return None  # another configuration or PEFT release: try again
        return str(payload["reason"])

    def save_refusal(self, path: Path, digest: str, reason: str, env: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"hash": digest, "reason": reason, "peft": env.get("peft")}
        self._refusal_path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    def save(self, path: Path, digest: str, key: dict[str, Any], result: RunResult, env: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "hash": digest,
            "key": key,
            "result": result.to_dict(),
            "environment": env,
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a killed run leaves no half-written result


def stored_runs(out: Path) -> int:
    """How many finished runs are stored under ``out/runs`` (refusal markers not counted)."""
    root = out / "runs"
    if not root.is_dir():
        return 0
    return sum(1 for p in root.glob("*/*.json") if not p.name.endswith(".unavailable.json"))
