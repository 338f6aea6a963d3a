"""Memory and communication of a LoRA-Pro step at Llama-2-7B and Llama-2-70B scale.

Prints the tables of docs/scaling.md (markdown). Analytic by default; ``--measure`` also
measures what can be measured on a CPU machine and checks it against the formulas:

- optimizer state bytes of a real ``LoRAProAdamW`` after one step, on one decoder block of the
  real widths (base weights on the meta device, LoRA factors real), efficient and full mode;
- the peak extra resident memory of that step (Linux VmHWM, reset before the step);
- the numbers ``LoRAProAdamW`` sends into collectives per step, from a 2-process gloo run
  with FSDP2: (a) one block of Llama-2-7B's real widths, (b) a narrow stack with 7B's count of
  LoRA layers (224), where the Gram all-reduce is the only term and does not depend on widths.

    python benchmarks/scaling_table.py                 # formulas only, instant
    python benchmarks/scaling_table.py --measure       # + measurements (a few minutes, ~6 GB RAM)

Assumptions: LoRA on all seven projections (q, k, v, o, gate, up, down) of every block; LoRA
factors, their gradients and all optimizer state in fp32 (PEFT keeps adapters in fp32 under
autocast); base weights bf16; N = 8 data-parallel ranks for DDP and FSDP; the ring algorithm
for all-reduce (each rank sends 2 (N-1)/N of the payload) and all-gather / reduce-scatter
((N-1)/N). A "number" is an fp32 value (4 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Spec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every adapted matrix of one block."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        return {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }  # fmt: skip

    @property
    def total_params(self) -> int:
        block = sum(m * n for m, n in self.shapes.values()) + 2 * self.hidden
        return self.layers * block + 2 * self.vocab * self.hidden + self.hidden


MODELS = [
    Spec("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    Spec("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
]
RANKS = (8, 128)
WORLD = 8


def per_model(spec: Spec, r: int) -> dict[str, float]:
    shapes = list(spec.shapes.values())
    n_lora = spec.layers * len(shapes)
    lora = spec.layers * sum(r * (m + n) for m, n in shapes)
    adapted = spec.layers * sum(m * n for m, n in shapes)
    biggest = max(m * n for m, n in shapes)
    # full mode's extra per-layer traffic under FSDP: gather A and grad_A (r x n each), all-reduce
    # B^T D (r x n); per layer, summed over layers
    full_rn = spec.layers * sum(3 * r * n for _, n in shapes)
    return {
        "lora_layers": n_lora, "lora_params": lora, "adapted_params": adapted, "biggest": biggest,
        "gram_numbers": 4 * n_lora * r * r, "full_rn": full_rn,
        "reshard_numbers": spec.layers * sum(2 * r * n for _, n in shapes),
        # factored mode: X (r x n), Y (m x r), row and column means (m + n) per layer
        "factored_numbers": spec.layers * sum((m + n) * (r + 1) for m, n in shapes),
    }  # fmt: skip


def fmt_bytes(b: float) -> str:
    if b >= GB:
        return f"{b / GB:.1f} GB"
    if b >= MB:
        return f"{b / MB:.1f} MB"
    return f"{b / 1e3:.1f} kB"


def memory_table() -> str:
    rows = [
        "| model | r | LoRA params | mode | optimizer state, 1 GPU / DDP rank | per FSDP rank (N=8) "
        "| step transient (1 GPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in MODELS:
        for r in RANKS:
            q = per_model(spec, r)
            eff_state = 8 * q["lora_params"]
            full_state = 8 * q["adapted_params"]
            # efficient: the adjusted gradients of every layer exist at once (4 B per LoRA param);
            # full: the same plus two fp32 m x n buffers of the largest layer, shared by all layers
            # (the equivalent gradient, which becomes the Adam direction, and the denominator)
            eff_tmp = 4 * q["lora_params"]
            full_tmp = eff_tmp + 2 * 4 * q["biggest"]
            rows.append(
                f"| {spec.name} | {r} | {q['lora_params'] / 1e6:.1f} M | efficient | {fmt_bytes(eff_state)} "
                f"| {fmt_bytes(eff_state / WORLD)} | {fmt_bytes(eff_tmp)} |"
            )
            rows.append(
                f"| {spec.name} | {r} | {q['lora_params'] / 1e6:.1f} M | full | {fmt_bytes(full_state)} "
                f"| {fmt_bytes(full_state / WORLD)} | {fmt_bytes(full_tmp)} |"
            )
            # factored: the adjusted gradients, then per layer (one at a time) a few (m + n) x 2r
            # temporaries; FSDP2 shards are refused in this mode
            factored_state = 4 * q["factored_numbers"]
            rows.append(
                f"| {spec.name} | {r} | {q['lora_params'] / 1e6:.1f} M | factored | "
                f"{fmt_bytes(factored_state)} | not supported | {fmt_bytes(eff_tmp)} + O((m + n) r) |"
            )
    return "\n".join(rows)


def comm_table() -> str:
    rows = [
        "| model | r | DDP: gradient all-reduce (any optimizer) | FSDP: lorapro, efficient | "
        "FSDP: lorapro, full | FSDP default placement: + re-shard A "
        "| FSDP's own all-gathers (bf16, fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in MODELS:
        for r in RANKS:
            q = per_model(spec, r)
            ddp = 4 * q["lora_params"]
            gram = 4 * q["gram_numbers"]
            full = 2 * gram + 4 * q["full_rn"]
            reshard = 4 * q["reshard_numbers"]
            fsdp_own = 2 * 2 * spec.total_params
            rows.append(
                f"| {spec.name} | {r} | {fmt_bytes(ddp)} | {fmt_bytes(gram)} | {fmt_bytes(full)} "
                f"| {fmt_bytes(reshard)} | {fmt_bytes(fsdp_own)} |"
            )
    return "\n".join(rows)


# -- measurements -------------------------------------------------------------------------------


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_state(spec: Spec, r: int, mode: str) -> dict[str, float]:
    """One block of ``spec``'s widths: state bytes after two steps and the step's peak extra RSS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import lorapro

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for name, (m, n) in spec.shapes.items():
                setattr(self, name, nn.Linear(n, m, bias=False))

    with torch.device("meta"):
        model = get_peft_model(Block(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(spec.shapes)))
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if ("lora_A" in name or "lora_B" in name) and isinstance(module, nn.Linear):
            module.weight = nn.Parameter(torch.randn(module.weight.shape, generator=gen) * 0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = lorapro.LoRAProAdamW(model, lr=1e-4, mode=mode)

    def step(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()

    step(1)  # creates the state
    gc.collect()
    before = _vm_rss()
    ok = _reset_hwm()
    step(2)
    peak = _vm_hwm() - before if ok else float("nan")
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0)
    q = per_model(spec, r)
    numbers = {
        "efficient": 2 * q["lora_params"], "full": 2 * q["adapted_params"], "factored": q["factored_numbers"],
    }  # fmt: skip
    expected = 4 * numbers[mode] / spec.layers
    return {"state_bytes": state, "expected_bytes": expected, "peak_extra_bytes": peak}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_comm(kind: str, r: int, mode: str) -> dict[str, int]:
    """Launch 2 gloo ranks running one FSDP2 step; returns LoRAProAdamW.comm_numel."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(2):
            env = dict(
                os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
            )  # fmt: skip
            cmd = [sys.executable, __file__, "--comm-worker", kind, str(r), mode, out]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=1800) for p in procs]
        if any(codes):
            raise RuntimeError(f"comm worker failed: {codes}")
        return json.loads(Path(out, "rank0.json").read_text())


def comm_worker(kind: str, r: int, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import lorapro
    from lorapro.integrations.fsdp import lora_shard_placement_fn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = MODELS[0]
    if kind == "7b-block":  # one block, real widths
        shapes, blocks = spec.shapes, 1
    else:  # 7B's number of LoRA layers, narrow widths: the Gram term does not depend on widths
        shapes, blocks = {name: (256, 256) for name in spec.shapes}, spec.layers

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for name, (m, n) in shapes.items():
                setattr(self, name, nn.Linear(n, m, bias=False))

        def forward(self, x):  # a chain through every projection, so that each gets a gradient
            h = self.q_proj(x)[..., : x.shape[-1]]
            for name in ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                layer = getattr(self, name)
                padded = torch.nn.functional.pad(h, (0, max(0, layer.in_features - h.shape[-1])))
                h = layer(padded[..., : layer.in_features])
            return h[..., : x.shape[-1]]

    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(blocks)))
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(shapes), init_lora_weights=False)
    )
    place = lora_shard_placement_fn(model)
    for block in model.base_model.model:
        fully_shard(block, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    opt = lorapro.LoRAProAdamW(model, lr=1e-4, mode=mode)
    width = next(iter(shapes.values()))[1]
    x = torch.randn(2, 4, width)
    model(x).square().mean().backward()
    opt.step()
    if dist.get_rank() == 0:
        Path(out, "rank0.json").write_text(json.dumps(opt.comm_numel))
    dist.destroy_process_group()


def measurements() -> str:
    lines = ["### Measured on this machine (CPU)", ""]
    lines += [
        "Optimizer state of a real `LoRAProAdamW` on one decoder block (meta base weights, real LoRA "
        "factors), after two steps, against the formula (8 bytes per LoRA parameter in efficient mode, "
        "per adapted weight in full mode, 4 (m + n)(r + 1) per layer in factored mode); peak extra "
        "resident memory of the second step (VmHWM, beyond "
        "what the first step left resident: the allocator reuses freed memory, so small transients "
        "read as ~0).",
        "",
        "| block | r | mode | state measured | formula | match | peak extra RSS of the step |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = [(MODELS[0], r, mode) for r in RANKS for mode in ("efficient", "full", "factored")]
    cases += [(MODELS[1], r, "efficient") for r in RANKS]
    for spec, r, mode in cases:
        m = measure_state(spec, r, mode)
        match = "yes" if m["state_bytes"] == m["expected_bytes"] else "NO"
        lines.append(
            f"| {spec.name} | {r} | {mode} | {fmt_bytes(m['state_bytes'])} "
            f"| {fmt_bytes(m['expected_bytes'])} | {match} | {fmt_bytes(m['peak_extra_bytes'])} |"
        )
    lines += [
        "",
        "Numbers `LoRAProAdamW` sent into collectives in one step (`optimizer.comm_numel`, rank 0, "
        "2 gloo ranks, FSDP2 with `lora_shard_placement_fn`), against the formula:",
        "",
        "| model | r | mode | measured | formula |",
        "|---|---|---|---|---|",
    ]
    spec = MODELS[0]
    cases = [("7b-block", 8, "efficient"), ("7b-block", 8, "full"), ("7b-block", 128, "efficient"),
             ("224-layers", 8, "efficient"), ("224-layers", 128, "efficient")]  # fmt: skip
    for kind, r, mode in cases:
        got = measure_comm(kind, r, mode)
        if kind == "7b-block":
            layers = len(spec.shapes)
            gram = 4 * layers * r * r * (2 if mode == "full" else 1)
            expected = {"gram_allreduce": gram}
            if mode == "full":
                n_sum = sum(n for _, n in spec.shapes.values())
                # per rank: half of A and of grad_A gathered, r x n all-reduced
                expected.update(full_mode_gather=2 * r * n_sum // 2, full_mode_allreduce=r * n_sum)
            label = "Llama-2-7B, 1 block (7 LoRA layers)"
        else:
            expected = {"gram_allreduce": 4 * spec.layers * 7 * r * r}
            label = "224 LoRA layers (7B's count), narrow"
        lines.append(f"| {label} | {r} | {mode} | {got} | {expected} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true")
    p.add_argument("--comm-worker", nargs=4, metavar=("KIND", "R", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.comm_worker:
        kind, r, mode, out = args.comm_worker
        comm_worker(kind, int(r), mode, out)
        return
    print("### Per-step optimizer memory (fp32 state)\n")
    print(memory_table())
    print("\n### Per-step communication payload (what one all-reduce / all-gather carries)\n")
    print(comm_table())
    for spec in MODELS:
        print(f"\n{spec.name}: {spec.total_params / 1e9:.2f} B parameters; LoRA layers "
              f"{per_model(spec, 8)['lora_layers']}")  # fmt: skip
    if args.measure:
        print()
        print(measurements())


if __name__ == "__main__":
    main()
