"""A test instrument that goes into a framework's run the way a user's callback would: it saves
what the optimizer receives at the first step, so a test can check that LoRA-Pro ran.

Set by environment variables, because each framework builds its callbacks itself
(ms-swift calls ``cls(args, trainer)``, axolotl instantiates plugins without arguments):

- ``CAPTURE_FIRST_STEP=PATH``: at the first ``optimizer.step()``, ``torch.save`` to PATH, per
  LoRA layer, A, B, the scaling s and the gradients of A and B as the optimizer sees them
  (a step pre-hook on the innermost optimizer, so after clipping and after any engine's
  reduction), plus the names of the optimizer's classes.
- ``CAPTURE_SET_FACTORS=SEED``: when training begins, set every lora_A and lora_B to seeded
  random values. PEFT initialises B = 0, where LoRA's gradient of A is 0 and half of Theorem
  2.1 has nothing to act on; a B away from 0 makes the first step exercise all of it. And the
  plain and the LoRA-Pro run then start from the same point even where the framework does not
  seed the LoRA initialisation (axolotl seeds only when its Trainer is built, after it).
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(module name, PEFT LoRA layer, adapter) of every active Linear LoRA adapter."""
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for adapter in module.active_adapters:
            if adapter in lora_a:
                layers.append((name, module, adapter))
    return layers


def _innermost(optimizer):
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


class CaptureFirstStep(TrainerCallback):
    def __init__(self, *_args, **_kwargs) -> None:  # ms-swift passes (args, trainer)
        self.path = os.environ.get("CAPTURE_FIRST_STEP")
        seed = os.environ.get("CAPTURE_SET_FACTORS")
        self.perturb_seed = None if seed is None else int(seed)
        self.layers: list[tuple[str, torch.nn.Module, str]] = []
        self.done = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.layers = lora_layers(model)
        assert self.layers, "no LoRA layers in the model"
        if self.perturb_seed is not None:
            generator = torch.Generator().manual_seed(self.perturb_seed)
            with torch.no_grad():
                for _, module, adapter in self.layers:
                    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                    a = torch.randn(A.shape, generator=generator, dtype=torch.float64) * A.shape[1] ** -0.5
                    # B with singular values 0.3 .. 0.1: away from 0, and conditioned well enough that
                    # float32 rounding stays far below the tolerance (it grows like cond(B)^2)
                    q, _ = torch.linalg.qr(torch.randn(B.shape, generator=generator, dtype=torch.float64))
                    b = q * torch.linspace(0.3, 0.1, B.shape[1], dtype=torch.float64)
                    A.copy_(a.to(A.dtype))
                    B.copy_(b.to(B.dtype))
        if self.path is not None and optimizer is not None:
            inner = _innermost(optimizer)
            self.optimizer_classes = [type(optimizer).__name__, type(inner).__name__]
            inner.register_step_pre_hook(self._save)

    def _save(self, optimizer, *_):
        if self.done:
            return
        self.done = True
        record = {"optimizer": self.optimizer_classes, "layers": {}}
        for name, module, adapter in self.layers:
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            record["layers"][name] = {
                "A": A.detach().double().clone(),
                "B": B.detach().double().clone(),
                "gA": None if A.grad is None else A.grad.detach().double().clone(),
                "gB": None if B.grad is None else B.grad.detach().double().clone(),
                "s": float(module.scaling[adapter]),
            }
        torch.save(record, self.path)
