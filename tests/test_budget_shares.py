"""scripts/budget_shares.py: the share of full mode's gain per method and budget, on stored
bench folders written here (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "budget_shares.py"


@pytest.fixture(scope="module")
def shares():
    spec = importlib.util.spec_from_file_location("budget_shares", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, name: str, steps: int, means: dict[str, float], full_mode_verdict: str) -> Path:
    folder = root / name
    (folder / "runs" / "lora").mkdir(parents=True)
    (folder / "runs" / "lora" / "lr0.002-seed0-0.json").write_text(json.dumps({"result": {"steps": steps}}))
    rows = [
        {"method": m, "test_values": [v, v, v], "test_mean": v, "chosen_lr": 1e-3} for m, v in means.items()
    ]
    rows.append({"method": "riemannian", "test_values": [], "unavailable": "Linear LoRA layers only"})
    gain = means["lorapro-full"] - means["lora"]
    verdict = {
        "method": "lorapro-full",
        "reference": "lora",
        "difference": gain,
        "verdict": full_mode_verdict,
    }
    verdict.update(low=gain - 0.01, high=gain + 0.01, kind="bootstrap")
    summary = {
        "task": "toy",
        "report_metric": "accuracy",
        "report_metric_higher_is_better": True,
        "methods": rows,
        "verdict": {"comparisons": [verdict]},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_shares_are_the_fraction_of_full_modes_gain_over_lora(shares, tmp_path):
    means = {"lora": 0.80, "lorapro-full": 0.90, "lorapro": 0.85, "full": 0.92, "lorapro-factored": 0.78}
    b = shares.budget(
        _folder(tmp_path, "short", 64, means, "better"),
        ["full", "lorapro", "lorapro-factored", "x", "riemannian"],
    )
    assert b["steps"] == 64
    assert b["gain"] == pytest.approx(0.10)
    assert b["shares"]["lorapro"] == pytest.approx(0.5)
    assert b["shares"]["full"] == pytest.approx(1.2)
    assert b["shares"]["lorapro-factored"] == pytest.approx(-0.2)
    assert b["shares"]["x"] is None and b["means"]["x"] is None
    assert shares._state(b) == "resolved"
    table = shares.markdown([b], ["full", "lorapro", "lorapro-factored", "x"])
    assert "| toy | 64 | +10 points" in table
    assert "50% (0.850, n=3" in table and "-20% (0.780" in table and "not run" in table
    assert "unavailable" in shares.markdown([b], ["riemannian"])


def test_no_share_where_full_mode_does_not_beat_lora_and_a_noisy_gain_is_flagged(shares, tmp_path):
    worse = {"lora": 0.80, "lorapro-full": 0.79, "lorapro": 0.85}
    b = shares.budget(_folder(tmp_path, "worse", 64, worse, "within noise"), ["lorapro"])
    assert b["shares"]["lorapro"] is None  # a ratio over a negative gain would invert the ranking
    assert shares._state(b) == "undefined"
    assert "undefined (0.850)" in shares.markdown([b], ["lorapro"])
    noisy = {"lora": 0.80, "lorapro-full": 0.81, "lorapro": 0.805}
    b = shares.budget(_folder(tmp_path, "noisy", 256, noisy, "within noise"), ["lorapro"])
    assert b["shares"]["lorapro"] == pytest.approx(0.5)
    assert shares._state(b) == "within noise"


def test_the_figure_is_drawn_for_several_budgets(shares, tmp_path):
    short = _folder(tmp_path, "s", 64, {"lora": 0.8, "lorapro-full": 0.9, "lorapro": 0.85}, "better")
    long = _folder(tmp_path, "l", 256, {"lora": 0.8, "lorapro-full": 0.79}, "worse")
    out = tmp_path / "shares.png"
    shares.main([str(short), str(long), "--methods", "lorapro,riemannian", "--out", str(out)])
    assert out.stat().st_size > 10_000
