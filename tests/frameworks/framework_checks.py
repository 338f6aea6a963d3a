"""What every framework test checks, on files the runs leave behind.

The reference is tests/reference.py's ``theorem_grads``: Theorem 2.1 with Theorem 2.3's X, in
float64 with numpy/scipy, written without lorapro. It is applied to the plain-LoRA gradients of
the framework's own run without lorapro (same model, same first batch, same A and B), and
compared with what the optimizer received in the LoRA-Pro run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from reference import theorem_grads

#: Offline, quiet, deterministic enough: what every framework run gets in its environment.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "AXOLOTL_DO_NOT_TRACK": "1",  # else axolotl's exit waits on its telemetry server
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",  # the same reduction order in every run
}


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **RUN_ENV, **(extra or {})}
    here = str(Path(__file__).resolve().parent)  # capture.py and the test plugins
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    bin_dir = str(Path(sys.executable).parent)  # the venv's commands (axolotl starts `accelerate`)
    env["PATH"] = os.pathsep.join((bin_dir, env.get("PATH", "")))
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str] | None, timeout: int) -> tuple[int, str]:
    proc = subprocess.run(
        command, cwd=cwd, env=_environment(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run a framework command; fail with its output if it fails. Returns stdout + stderr."""
    returncode, output = _run(command, cwd, env, timeout)
    assert returncode == 0, f"{command} failed ({returncode}):\n{output[-6000:]}"
    return output


def run_failing(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run a command that must fail; returns its output."""
    returncode, output = _run(command, cwd, env, timeout)
    assert returncode != 0, f"{command} should have failed:\n{output[-4000:]}"
    return output


@dataclass
class FirstStep:
    error: float  # max over layers and factors of |LoRA-Pro run - reference| / |reference|
    plain_distance: float  # min over layers of the plain run's distance from the reference
    layers: int
    optimizer: list[str]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def first_step(plain_file: Path, lorapro_file: Path, x_mode: str = "sylvester") -> FirstStep:
    plain = torch.load(plain_file, weights_only=True)
    pro = torch.load(lorapro_file, weights_only=True)
    assert plain["layers"].keys() == pro["layers"].keys()
    errors, distances = [], []
    for name, p in plain["layers"].items():
        q = pro["layers"][name]
        # the same point: equal factors and scaling in both runs (same seed, same perturbation)
        assert torch.equal(p["A"], q["A"]) and torch.equal(p["B"], q["B"]) and p["s"] == q["s"], name
        assert p["B"].norm() > 0, f"{name}: B = 0, the test would not exercise A's adjustment"
        ref_a, ref_b = theorem_grads(
            p["A"].numpy(), p["B"].numpy(), p["gA"].numpy(), p["gB"].numpy(), p["s"], x_mode
        )
        ref_a, ref_b = torch.from_numpy(ref_a), torch.from_numpy(ref_b)
        errors.append(max(_rel(q["gA"], ref_a), _rel(q["gB"], ref_b)))
        distances.append(max(_rel(p["gA"], ref_a), _rel(p["gB"], ref_b)))
    return FirstStep(max(errors), min(distances), len(errors), pro["optimizer"])


def trainer_losses(checkpoint: Path) -> list[float]:
    """The training loss logged at each step, from a Transformers checkpoint's trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
