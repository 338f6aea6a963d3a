"""Run by scripts/wheel_smoke.py inside the fresh environment the wheel was installed into."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--site", type=Path, required=True, help="the fresh environment's site-packages")
parser.add_argument("--bin", type=Path, required=True, help="the fresh environment's bin folder")
args = parser.parse_args()

import lorapro  # noqa: E402

where = Path(lorapro.__file__).resolve()
assert where.is_relative_to(args.site.resolve()), f"lorapro was imported from {where}, not from the wheel"
assert lorapro.__version__ == metadata.version("lorapro"), (lorapro.__version__, metadata.version("lorapro"))
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
heavy = sorted(m for m in ("transformers", "accelerate", "deepspeed", "matplotlib") if m in sys.modules)
assert not heavy, f"import lorapro imported {heavy}"

import copy  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
model = get_peft_model(base, config)
plain = copy.deepcopy(model)
x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))

# attach + torch AdamW: the gradients out of backward are the closed form's adjusted ones.
handle = lorapro.attach(model)
torch.nn.functional.cross_entropy(plain(x), y).backward()
torch.nn.functional.cross_entropy(model(x), y).backward()
pairs, plain_pairs = lorapro.find_lora_pairs(model), lorapro.find_lora_pairs(plain)
for pair, ref in zip(pairs, plain_pairs, strict=True):
    gA, gB = lorapro.optimal_gradients(ref.A, ref.B, ref.A.grad, ref.B.grad, ref.scaling)
    torch.testing.assert_close(pair.A.grad, gA, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pair.B.grad, gB, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(pair.A.grad, ref.A.grad), "attach left LoRA's own gradient"
before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
optimizer.step()
after = [p.detach() for p in model.parameters() if p.requires_grad]
assert all(torch.isfinite(a).all() and not torch.equal(a, b) for a, b in zip(after, before, strict=True))
handle.remove()

# LoRAProAdamW, full mode: one step, finite and moving.
optimizer = lorapro.LoRAProAdamW(plain, lr=1e-2, mode="full")
plain.zero_grad()
torch.nn.functional.cross_entropy(plain(x), y).backward()
trainable = [p for p in plain.parameters() if p.requires_grad]
before = [p.detach().clone() for p in trainable]
optimizer.step()
moved = [not torch.equal(p.detach(), b) for p, b in zip(trainable, before, strict=True)]
assert all(moved), moved

# The console script of the wheel answers.
cli = subprocess.run([str(args.bin / "lorapro"), "--version"], capture_output=True, text=True, check=True)
assert cli.stdout.strip() == f"lorapro {lorapro.__version__}", cli.stdout

print(
    f"wheel smoke test: lorapro {lorapro.__version__} from {where.parent}: import light, attach + AdamW "
    "and LoRAProAdamW(full) stepped, console script answers"
)
