"""lorapro: LoRA-Pro's closed-form gradient adjustment as PyTorch optimizers for PEFT models.

Quick start::

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=...))
    lorapro.attach(model)                                   # LoRA-Pro's gradients out of backward
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)   # = efficient mode, any optimizer
    loss.backward(); optimizer.step(); optimizer.zero_grad()

or, with lorapro's own optimizers (full mode needs one)::

    optimizer = lorapro.LoRAProAdamW(model, lr=5e-4, mode="efficient")
"""

from .adamw import MODES, LoRAProAdamW
from .backward_hooks import LoRAProHandle, attach
from .closed_form import X_MODES, equivalent_gradient, optimal_gradients
from .diagnostics import GradientMonitor, LayerRecord, compare_gradients
from .errors import LoRAProConfigError, LoRAProWarning, NonFiniteGradientError
from .pairs import LoRAPair, find_lora_pairs
from .sgd import LoRAProSGD

__version__ = "0.2.0"

__all__ = [
    "MODES",
    "X_MODES",
    "GradientMonitor",
    "LayerRecord",
    "LoRAPair",
    "LoRAProAdamW",
    "LoRAProConfigError",
    "LoRAProHandle",
    "LoRAProSGD",
    "LoRAProWarning",
    "NonFiniteGradientError",
    "__version__",
    "attach",
    "compare_gradients",
    "equivalent_gradient",
    "find_lora_pairs",
    "optimal_gradients",
]
