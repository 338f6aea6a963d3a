"""Time the optimizer step alone on LoRA factors shaped like Llama-2-7B, side by side in one run.

Per block: q, k, v, o (4096 x 4096), gate and up (11008 x 4096), down (4096 x 11008). The base
weights live on the meta device (they are never read by the step), so only the LoRA factors
and their gradients take memory. Timed in one process, interleaved, median of repeats:

- torch.optim.AdamW(foreach=True) on the LoRA factors (the baseline), and
  torch.optim.AdamW(fused=True), the fastest AdamW torch has on the CPU;
- lorapro.LoRAProAdamW efficient mode (default: torch's fused kernel for the moments, and
  with fused=False: the foreach path), full mode, factored mode, and lorapro.LoRAProSGD;
- a per-layer reference written from the description of the official code: two pinv, two
  general (complex) eig, one inv and the explicit m x m projector, then AdamW.

Steps are interleaved round-robin among the optimizers compared (each on its own identical
model), so that machine noise hits all alike. Also printed: optimizer-state bytes and the
step's transient peak, the most memory torch allocated at once during one step beyond what it
held before (from the profiler's allocation events; the CPU allocator keeps no peak).

``--baseline SRC`` adds lorapro's optimizers from another checkout (its ``src`` folder, e.g.
``git archive COMMIT src | tar -x -C /tmp/base``) to the same interleaved run: a change's cost,
before and after, side by side.

Example: python benchmarks/step_overhead.py --blocks 4 --rank 8
(--trials 8 --skip-full --skip-reference: eight fresh processes, and the spread of the ratio)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lorapro

SHAPES = {  # name: (out, in)
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


#: Divides every shape (``--shrink``): with tiny layers the arithmetic is negligible and a
#: step costs what running its torch calls from Python costs.
SHRINK = 1


def load_baseline(src: str, index: int = 0) -> ModuleType:
    """The lorapro package under ``src`` (a checkout's src folder), imported as
    ``lorapro_baseline_<index>`` beside this checkout's ``lorapro``."""
    init = Path(src) / "lorapro" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {src}: no lorapro/__init__.py there (give a checkout's src folder)")
    name = f"lorapro_baseline_{index}"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def baseline_label(src: str) -> str:
    """How a baseline is named in the tables: its checkout folder's name."""
    path = Path(src).resolve()
    return (path.parent if path.name == "src" else path).name


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (out_f, in_f) in SHAPES.items():
            setattr(self, name, nn.Linear(in_f // SHRINK, out_f // SHRINK, bias=False))


def build_model(blocks: int, rank: int, seed: int = 0) -> nn.Module:
    """A stack of Llama-2-7B-shaped blocks; base weights on meta, LoRA factors real (B != 0)."""
    with torch.device("meta"):
        model = nn.Sequential(*(Block() for _ in range(blocks)))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(SHAPES)))
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if ("lora_A" in name or "lora_B" in name) and isinstance(module, nn.Linear):
            w = torch.randn(module.weight.shape, generator=gen) / module.weight.shape[1] ** 0.5
            module.weight = nn.Parameter(w)
    return model


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def set_grads(params: list[nn.Parameter], seed: int) -> None:
    # Offset from build_model's seeds: the same seed would make every gradient a multiple of
    # its factor (same generator, same shapes), a degenerate case for the closed form.
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


class ReferenceStep:
    """The official code's per-layer algorithm: pinv x2, complex eig x2, inv, m x m projector."""

    def __init__(self, model: nn.Module, lr: float):
        self.pairs = lorapro.find_lora_pairs(model)
        self.adam = torch.optim.AdamW(lora_params(model), lr=lr, foreach=True)

    @torch.no_grad()
    def step(self) -> None:
        for pair in self.pairs:
            A, B, gA, gB, s = pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scaling
            m = B.shape[0]
            btb_inv = torch.linalg.pinv(B.T @ B)
            aat_inv = torch.linalg.pinv(A @ A.T)
            lb, U = torch.linalg.eig(B.T @ B)
            la, V = torch.linalg.eig(A @ A.T)
            C = (-(1 / s**2) * btb_inv @ gA @ A.T).to(U.dtype)
            X = U @ ((torch.linalg.inv(U) @ C @ V) / (lb[:, None] + la[None, :])) @ torch.linalg.inv(V)
            X = X.real
            projector = torch.eye(m) - B @ btb_inv @ B.T
            new_gA = (1 / s**2) * btb_inv @ gA + X @ A
            new_gB = (1 / s**2) * projector @ gB @ aat_inv - B @ X
            gA.copy_(new_gA)
            gB.copy_(new_gB)
        self.adam.step()


def state_bytes(opt) -> int:
    opt = opt.adam if isinstance(opt, ReferenceStep) else opt
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0)


def minor_faults() -> int:
    """Minor page faults of this process so far: a step that allocates fresh buffers the
    allocator got from the kernel pays one per page touched (and its time varies with it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def transient_peak_bytes(step) -> int:
    """The most memory torch held at once during one step beyond what it held before.

    Read from the profiler's memory events: each carries the allocator's running total
    ("Total Allocated", counted from the start of profiling), in time order. Exact on the
    CPU, whose allocator keeps no peak of its own.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def compare(rows: list, blocks: int, rank: int, repeats: int, makers: dict) -> None:
    """Time the optimizers of ``makers`` on identical models, steps interleaved (round-robin),
    so that machine noise hits all of them alike; append one row per optimizer."""
    group = len({row[0] for row in rows})  # rows of one call share their baselines
    runs = {}
    for name, make in makers.items():
        model = build_model(blocks, rank)
        params = lora_params(model)
        opt = make(model, params)
        set_grads(params, seed=1000)
        opt.step()  # warm-up: state creation
        runs[name] = (params, opt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    faults: dict[str, list[int]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, (params, opt) in runs.items():
            set_grads(params, seed=i)
            before, start = minor_faults(), time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - before)
    for name, (params, opt) in runs.items():
        set_grads(params, seed=repeats)
        peak = transient_peak_bytes(opt.step)
        median_ms, median_faults = statistics.median(times[name]), statistics.median(faults[name])
        rows.append((group, name, blocks, median_ms, state_bytes(opt), peak, median_faults))
    del runs
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per optimizer (after a warm-up)")
    parser.add_argument("--full-blocks", type=int, default=1, help="blocks for full mode (m x n moments)")
    parser.add_argument("--reference-blocks", type=int, default=1, help="blocks for the per-layer reference")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--shrink", type=int, default=1,
        help="divide every layer shape by this (e.g. 64: the same 7 layers per block, with negligible "
        "arithmetic, to measure the fixed per-call cost of a step)",
    )  # fmt: skip
    parser.add_argument(
        "--trials", type=int, default=1,
        help="run the comparison in this many fresh processes, one after another, and summarise the "
        "efficient-mode ratios (on a shared machine they vary from process to process)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", action="append", default=[],
        help="src folder of another lorapro checkout, run side by side (repeat for several)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.trials > 1:
        run_trials(args.trials)
        return
    global SHRINK
    SHRINK = args.shrink
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape_note = f", shapes divided by {SHRINK}" if SHRINK > 1 else ""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rank {args.rank}{shape_note}")
    lr = 1e-4
    foreach = "torch AdamW (foreach)"

    def adamw(**kwargs):
        return lambda m, p: torch.optim.AdamW(p, lr=lr, **kwargs)

    bases = {baseline_label(src): load_baseline(src, i) for i, src in enumerate(args.baseline)}
    rows: list = []
    makers = {
        foreach: adamw(foreach=True),
        "torch AdamW (fused)": adamw(fused=True),
        "LoRAProAdamW efficient": lambda m, p: lorapro.LoRAProAdamW(m, lr=lr),
        "LoRAProAdamW efficient, foreach Adam": lambda m, p: lorapro.LoRAProAdamW(m, lr=lr, fused=False),
        "LoRAProSGD": lambda m, p: lorapro.LoRAProSGD(m, lr=lr),
        "LoRAProAdamW factored": lambda m, p: lorapro.LoRAProAdamW(m, lr=lr, mode="factored"),
    }
    for label, base in bases.items():
        makers[f"LoRAProAdamW efficient ({label})"] = lambda m, p, base=base: base.LoRAProAdamW(m, lr=lr)
        makers[f"LoRAProSGD ({label})"] = lambda m, p, base=base: base.LoRAProSGD(m, lr=lr)
    compare(rows, args.blocks, args.rank, args.repeats, makers)
    if not args.skip_full:
        full = lambda m, p: lorapro.LoRAProAdamW(m, lr=lr, mode="full")  # noqa: E731
        full_makers = {foreach: adamw(foreach=True), "LoRAProAdamW full": full}
        for label, base in bases.items():
            full_makers[f"LoRAProAdamW full ({label})"] = lambda m, p, base=base: base.LoRAProAdamW(
                m, lr=lr, mode="full"
            )
        compare(rows, args.full_blocks, args.rank, max(3, args.repeats // 4), full_makers)
    if not args.skip_reference:
        compare(rows, args.reference_blocks, args.rank, max(3, args.repeats // 4), {
            foreach: adamw(foreach=True), "per-layer reference": lambda m, p: ReferenceStep(m, lr),
        })  # fmt: skip

    print(
        "\n| step | blocks | median ms | per block ms | x torch AdamW foreach | x torch AdamW fused "
        "| optimizer state MB | step transient peak MB | minor page faults per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    foreach_ms = {row[0]: row[3] for row in rows if row[1] == foreach}
    fused_ms = {row[0]: row[3] for row in rows if row[1] == "torch AdamW (fused)"}
    for group, name, blocks, med, nbytes, peak, median_faults in rows:
        cells = [name, blocks, f"{med * 1e3:.1f}", f"{med / blocks * 1e3:.1f}"]
        cells.append(f"{med / foreach_ms[group]:.2f}")
        cells.append(f"{med / fused_ms[group]:.2f}" if group in fused_ms else "")
        cells += [f"{nbytes / 2**20:.1f}", f"{peak / 2**20:.1f}", f"{median_faults:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    for group, name, _, med, *_ in rows:
        if name == "LoRAProAdamW efficient":  # read by run_trials
            print(f"RATIO foreach {med / foreach_ms[group]:.4f} fused {med / fused_ms[group]:.4f}")
    eff = next(row[3] / row[2] for row in rows if row[1] == "LoRAProAdamW efficient")
    for _, name, b, med, *_ in rows:
        if name == "per-layer reference":
            print(f"\nper-layer reference / efficient mode, per block: {med / b / eff:.0f}x")


def run_trials(trials: int) -> None:
    """Run this script ``trials`` times in fresh processes (same arguments), print each run's
    table and the efficient-mode ratios of all runs."""
    argv = [*sys.argv[1:], "--trials", "1"]  # argparse keeps the last value given
    ratios: list[tuple[float, float]] = []
    for trial in range(trials):
        print(f"\n## trial {trial + 1} of {trials}", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            if line.startswith("RATIO "):
                _, _, foreach, _, fused = line.split()
                ratios.append((float(foreach), float(fused)))
            elif line.startswith(("|", "per-layer", "torch ")):
                print(line)
    foreach = sorted(r for r, _ in ratios)
    fused = sorted(f for _, f in ratios)
    print(
        f"\nLoRAProAdamW efficient over {len(ratios)} processes: x torch AdamW foreach "
        f"median {statistics.median(foreach):.2f} (min {foreach[0]:.2f}, max {foreach[-1]:.2f}; "
        f"runs {', '.join(f'{r:.2f}' for r in foreach)}); "
        f"x torch AdamW fused median {statistics.median(fused):.2f}"
    )


if __name__ == "__main__":
    main()
