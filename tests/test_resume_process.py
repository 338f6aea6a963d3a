"""Exact resume across processes: train K steps, torch.save model + optimizer (+ LR scheduler, GradScaler),
load in a NEW Python process on a model built from another seed, train K more steps; the result is bit for
bit the uninterrupted run, for every mode and x_mode, in float32 and bfloat16 (fp32 moments survive the
round trip), with Linear, Conv and Embedding pairs. The processes are tests/resume_worker.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import lorapro
import resume_worker
from resume_worker import CONFIGS, Config

WORKER = Path(__file__).with_name("resume_worker.py")


pytestmark = pytest.mark.usefixtures("single_thread")


def run_worker(phase: str, directory: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), phase, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{phase} worker failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> Path:
    """One process saves every config's checkpoint, a second one resumes them all."""
    directory = tmp_path_factory.mktemp("resume")
    run_worker("save", directory)
    run_worker("resume", directory)
    return directory


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_resume_in_a_new_process_is_bitwise_the_uninterrupted_run(resumed_runs, config: Config):
    resumed = torch.load(resumed_runs / f"{config.name}.final.pt", weights_only=True)
    expected = resume_worker.uninterrupted(config)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert resumed[name].dtype == value.dtype, name
        assert torch.equal(resumed[name], value), name
    # the comparison is not vacuous: training moved the LoRA factors (and, in full mode, decayed W0)
    initial = resume_worker.build_model(config).state_dict()
    moved = any(not torch.equal(initial[n], v) for n, v in expected.items() if "lora_" in n)
    assert moved
    if config.mode == "full" and config.dtype == "float32":  # bf16 full mode runs without decay (refused)
        assert not torch.equal(initial[BASE_CONV], expected[BASE_CONV])


BASE_CONV = "base_model.model.conv.base_layer.weight"


def test_checkpoint_keeps_float32_moments_and_every_state_tensor():
    """What the new process receives: the optimizer state of a bf16 model holds fp32 moments, and every
    pair's state (Embedding, Conv, Linear factors; full-mode equivalent-gradient moments) is present."""
    for config in (
        Config("adamw", "efficient", "sylvester", "bfloat16"),
        Config("adamw", "full", "zero", "bfloat16"),
    ):
        model = resume_worker.build_model(config)
        opt, sched, scaler = resume_worker.build_optimizer(config, model)
        resume_worker.train(model, opt, sched, scaler, 0, 2)
        state = opt.state_dict()["state"]
        pairs = lorapro.find_lora_pairs(model)
        assert {p.kind for p in pairs} == {"embedding", "conv", "linear"}
        keys = {k for entry in state.values() for k in entry}
        expected = {"exp_avg", "exp_avg_sq"} | (
            {"equiv_exp_avg", "equiv_exp_avg_sq"} if config.mode == "full" else set()
        )
        assert expected <= keys
        for entry in state.values():
            for key, value in entry.items():
                if key != "step":
                    assert value.dtype == torch.float32, key


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_full_mode_adapter_only_checkpoint(weight_decay):
    """Full mode with weight decay scales the frozen base weights in place (Eq. 57-58). A checkpoint of the
    trainable parameters only (what PEFT's save_pretrained writes) therefore resumes exactly only when
    weight_decay == 0; with decay, the base weights must be saved too (model.state_dict())."""
    config = Config("adamw", "full", "sylvester", "float32")
    model = resume_worker.build_model(config)
    opt = lorapro.LoRAProAdamW(model, lr=1e-2, weight_decay=weight_decay, mode="full")
    for step in range(3):
        ids, y = resume_worker.batch(step)
        F.cross_entropy(model(ids), y).backward()
        opt.step()
        opt.zero_grad()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    restored = resume_worker.build_model(config)
    restored.load_state_dict(trainable, strict=False)
    same = all(
        torch.equal(p, q)
        for p, q in zip(model.state_dict().values(), restored.state_dict().values(), strict=True)
    )
    assert same == (weight_decay == 0.0)
