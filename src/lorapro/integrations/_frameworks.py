"""What the integrations with fine-tuning frameworks (LLaMA-Factory, ms-swift, axolotl) share.

All three train with the Transformers ``Trainer``, so each of them runs LoRA-Pro the same way:
:class:`~lorapro.integrations.trainer.LoRAProCallback` attaches :func:`lorapro.attach` when
training begins and the framework's own optimizer applies the adjusted gradients. What differs
is how the callback gets in (a command, a plugin file, a plugin class) and which settings of
each framework would replace what LoRA-Pro computes; the latter are refused before anything
loads, with the checks below where the settings have the same meaning in every framework.
"""

from __future__ import annotations

import logging
from typing import Any

from ..closed_form import X_MODES
from ..errors import LoRAProConfigError
from .trainer import LoRAProCallback

__all__ = [
    "X_MODE_KEY",
    "AnnouncingLoRAProCallback",
    "announce",
    "check_optim",
    "check_x_mode",
    "refuse",
]

#: The configuration key (YAML, or ``--lorapro_x_mode`` on a command line) that picks X.
X_MODE_KEY = "lorapro_x_mode"

# Transformers `optim=` names whose optimizer does not apply the gradients it is given: GaLore
# and APOLLO project them onto a subspace of their own, LOMO and AdaLomo update each parameter
# inside backward. With any of them the update is no longer LoRA-Pro's.
_REPLACING_OPTIM_PREFIXES = ("galore", "apollo", "lomo", "adalomo")


def _announcer() -> logging.Logger:
    """A logger whose lines show whatever logging set-up the framework made (each configures its
    own loggers differently, and a line nobody sees cannot tell a user that LoRA-Pro is on)."""
    log = logging.getLogger("lorapro.integrations.frameworks")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lorapro] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def announce(message: str, logger: logging.Logger | None = None) -> None:
    """Log one line at INFO level: to ``logger`` where the framework shows only its own loggers'
    lines (axolotl), else to standard error as ``[lorapro] ...``."""
    (logger or _announcer()).info(message)


def refuse(framework: str, what: str, instead: str) -> LoRAProConfigError:
    """The error for a setting that cannot run LoRA-Pro: what it is, and what to do instead."""
    return LoRAProConfigError(f"LoRA-Pro in {framework}: {what}. {instead}")


def check_x_mode(value: Any, framework: str) -> str:
    if value not in X_MODES:
        raise refuse(
            framework, f"{X_MODE_KEY}={value!r} is not a choice of X", f"Use one of {', '.join(X_MODES)}"
        )
    return str(value)


def check_optim(optim: Any, framework: str) -> None:
    """Refuse a Transformers ``optim`` name whose optimizer replaces the gradients it receives."""
    name = str(getattr(optim, "value", optim) or "").lower()
    if name.startswith(_REPLACING_OPTIM_PREFIXES):
        raise refuse(
            framework,
            f"optim={name!r} projects or applies the gradients itself, so LoRA-Pro's gradients would not "
            "be what updates the factors",
            "Use an optimizer that steps the gradients it is given (adamw_torch, adamw_torch_fused, "
            "adamw_8bit, adafactor, sgd, ...)",
        )


def _check_pairs_share_learning_rate(optimizer: Any, pairs: list, framework: str) -> None:
    """LoRA-Pro's update moves A and B with one learning rate (its equivalent gradient is
    s (B gA + gB A)); an optimizer that gives them different rates (LoRA+, per-module learning
    rate groups) makes another update. Compared on the rates before any schedule scaled them."""
    rate_of = {}
    for group in getattr(optimizer, "param_groups", []):
        rate = group.get("initial_lr", group.get("lr"))
        for p in group["params"]:
            rate_of[id(p)] = rate
    for pair in pairs:
        rate_a, rate_b = rate_of.get(id(pair.A)), rate_of.get(id(pair.B))
        if rate_a is not None and rate_b is not None and rate_a != rate_b:
            raise refuse(
                framework,
                f"the optimizer gives {pair.name}'s lora_A learning rate {rate_a} and its lora_B {rate_b} "
                "(LoRA+ or per-module learning rates): LoRA-Pro's update moves both with one rate",
                "Remove the setting that splits them (loraplus_lr_ratio, learning-rate groups)",
            )


class AnnouncingLoRAProCallback(LoRAProCallback):
    """:class:`LoRAProCallback` that says, once training begins, that LoRA-Pro is on and where.

    The line is how a user of a framework sees that the integration is active (axolotl, for one,
    only logs a plugin that fails to import); it names the number of LoRA layers whose gradients
    are adjusted and the optimizer that applies them.
    """

    def __init__(
        self, framework: str, x_mode: str = "sylvester", logger: logging.Logger | None = None
    ) -> None:
        super().__init__(x_mode=x_mode)
        self.framework = framework
        self.logger = logger

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        inner = optimizer
        while getattr(inner, "optimizer", None) is not None:  # Accelerate's and DeepSpeed's wrappers
            inner = inner.optimizer
        if inner is not None and self.handle is not None:
            try:
                _check_pairs_share_learning_rate(inner, self.handle.pairs, self.framework)
            except LoRAProConfigError:
                self.on_train_end(args, state, control)  # leave the model as it was
                raise
        if state.is_world_process_zero and self.handle is not None:
            announce(
                f"LoRA-Pro is on ({self.framework}): lorapro.attach adjusts the gradients of "
                f"{len(self.handle.pairs)} LoRA layers (x_mode={self.x_mode}); "
                f"{type(inner).__name__} applies them",
                self.logger,
            )
