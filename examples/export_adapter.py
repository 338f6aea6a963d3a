"""After LoRA-Pro: a normal PEFT adapter. Save it, load it onto a fresh base model, merge it.

    python examples/export_adapter.py
    python examples/export_adapter.py --gradient-checkpointing --modules-to-save lm_head

Nothing about the adapter is lorapro-specific: ``save_pretrained`` writes adapter_config.json
and adapter_model.safetensors, ``PeftModel.from_pretrained`` loads them, ``merge_and_unload``
folds ``s * B @ A`` into the base weights. (Full mode with weight decay is the exception: it
also decays the frozen base weights, which an adapter cannot hold; export the merged model.)
"""

from __future__ import annotations

import tempfile

import torch
from common import CountingDataset, base_model, default_lr, lora_model, parser
from peft import PeftModel

import lorapro


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--modules-to-save", nargs="*", default=None, help="e.g. lm_head: trained in full")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="lorapro-adapter-")

    model = lora_model(args, modules_to_save=args.modules_to_save)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # needed by older PEFT/Transformers with reentrant checkpointing
    optimizer = lorapro.LoRAProAdamW(model, lr=default_lr(args), mode=args.mode)
    loader = torch.utils.data.DataLoader(CountingDataset(), batch_size=16, shuffle=True)
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.steps:
                break

    model.eval()
    probe = CountingDataset(4, seed=1).tokens
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    model.save_pretrained(out)

    fresh = base_model(args)  # same seed: the same base weights, no LoRA
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        gap_loaded = (loaded(input_ids=probe).logits - trained).abs().max().item()
        gap_merged = (merged(input_ids=probe).logits - trained).abs().max().item()
    print(f"adapter in {out}; max |logit difference| loaded {gap_loaded:.2e}, merged {gap_merged:.2e}")
    return {"output_dir": out, "gap_loaded": gap_loaded, "gap_merged": gap_merged}


if __name__ == "__main__":
    main()
