"""The examples under examples/ run and do what they say, with a few steps each.

Single-process examples run in one subprocess, the torchrun ones in one 2-rank launch (gloo on
127.0.0.1), each example's ``main`` in turn; see tests/examples_worker.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from test_integration_distributed import launch

WORKER = Path(__file__).with_name("examples_worker.py")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# The 2-rank examples train in a function and call common.tear_down_distributed after it
# returns: objects that hold the process group, freed after destroy_process_group, can hang a
# rank at exit.

SINGLE = [  # {out}: the test's temporary folder
    "trainer:--steps,8,--resume,--bf16,--output-dir,{out}/trainer",
    "accelerate_loop:--steps,8,--mixed-precision,bf16",
    "export_adapter:--steps,6,--gradient-checkpointing,--modules-to-save,lm_head,--output-dir,{out}/adapter",
    "attach_any_optimizer:--steps,8",
]
# One 2-rank launch per example: each example creates and destroys its own process group, and a
# second gloo group in the same processes was seen to hang (destroy/re-init), so none is reused.
TORCHRUN = ["ddp_torchrun:--steps,6", "fsdp2:--steps,6,--mode,full"]
if HAS_DEEPSPEED:
    TORCHRUN += [
        "deepspeed_zero0:--steps,4,--autocast,bfloat16",
        "deepspeed_attach:--steps,4,--config,{examples}/deepspeed/zero3_bf16.json",
        "attach_any_optimizer:--trainer,--steps,4,--deepspeed,{examples}/deepspeed/trainer_zero2.json",
    ]


def run_single(out: Path) -> None:
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    specs = [s.format(out=out) for s in SINGLE]
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *specs], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples_single")
    run_single(out)
    return out


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("examples_torchrun")
    for spec in TORCHRUN:  # the env protocol torchrun uses
        launch(out, [spec.format(out=out, examples=EXAMPLES)], timeout=300, worker=WORKER)
    return out


def results(out: Path, name: str, rank: int = 0) -> list[dict]:
    err = out / f"{name}_rank{rank}.err"
    if err.exists():
        pytest.fail(err.read_text())
    return json.loads((out / f"{name}_rank{rank}.json").read_text())


def test_single_process_examples(single):
    trainer = results(single, "trainer")
    assert trainer["losses"][-1] < trainer["losses"][0]
    assert (Path(trainer["output_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    accelerate = results(single, "accelerate_loop")
    assert accelerate["losses"][-1] < accelerate["losses"][0]
    export = results(single, "export_adapter")
    assert export["gap_loaded"] < 1e-5 and export["gap_merged"] < 1e-5
    attached = results(single, "attach_any_optimizer")["losses"]
    assert attached[-1] < attached[0], attached


@pytest.mark.distributed
def test_torchrun_examples(torchrun):
    for name in ("ddp_torchrun", "fsdp2"):
        for rank in (0, 1):
            losses = results(torchrun, name, rank)["losses"]
            assert losses[-1] < losses[0], (name, losses)
    traffic = results(torchrun, "fsdp2")["traffic"]
    assert traffic["gram_allreduce"] > 0 and "reshard_A" not in traffic


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (optional: pip install deepspeed)")
def test_deepspeed_example(torchrun):
    for rank in (0, 1):
        losses = results(torchrun, "deepspeed_zero0", rank)["losses"]
        assert losses[-1] < losses[0], losses
        attached = results(torchrun, "deepspeed_attach", rank)
        assert attached["losses"][-1] < attached["losses"][0], attached
        assert attached["basis_computations"] == 4  # once per optimizer step
        trainer = results(torchrun, "attach_any_optimizer", rank)["losses"]
        assert trainer[-1] < trainer[0], trainer
