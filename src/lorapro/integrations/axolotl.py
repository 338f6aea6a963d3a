"""LoRA-Pro in axolotl: one line in the YAML.

.. code-block:: yaml

    plugins:
      - lorapro.integrations.axolotl.LoRAProPlugin
    lorapro_x_mode: sylvester        # optional: sylvester (default), zero or symmetric

The plugin adds :class:`~lorapro.integrations.trainer.LoRAProCallback` to axolotl's trainer,
so axolotl's own optimizer (any ``optimizer:``) applies LoRA-Pro's gradients (efficient mode).
When training begins it logs ``[axolotl.integrations.lorapro] LoRA-Pro is on (axolotl): ...``
with the number of LoRA layers: axolotl only *logs* a plugin it cannot import and then trains
without it, so that line is how to see LoRA-Pro is on. Failures inside this module are raised as
:class:`~lorapro.LoRAProConfigError`, which axolotl does not swallow (it catches only
``ImportError``).

Refused with :class:`~lorapro.LoRAProConfigError` when the configuration is registered, before
anything loads: no ``adapter`` (full fine-tuning) or one other than ``lora``/``qlora``, DoRA
(``peft_use_dora``), LoRA+ (``loraplus_lr_ratio``), optimizers that project the gradients or
precondition the factors themselves (GaLore, Q-GaLore, APOLLO, LOMO, PoLoRA), LISA, ReLoRA and
the RL trainers (``rl:``), which this integration does not cover. Learning-rate groups that give
A and B of one layer different rates are refused when training begins.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from ..errors import LoRAProConfigError

try:
    from axolotl.integrations.base import BasePlugin
    from pydantic import BaseModel

    from ._frameworks import AnnouncingLoRAProCallback, announce, check_optim, refuse
except ImportError as exc:  # axolotl would only log an ImportError and train without LoRA-Pro
    raise LoRAProConfigError(
        f"lorapro's axolotl plugin cannot load ({exc}); axolotl would train plain LoRA without it. "
        "Install lorapro[trainer] next to axolotl, or remove the plugin from the config."
    ) from exc

__all__ = ["LoRAProArgs", "LoRAProPlugin", "check_config"]

FRAMEWORK = "axolotl"
# axolotl shows INFO lines of loggers under its own name only (the others need WARNING).
LOG = logging.getLogger("axolotl.integrations.lorapro")
ADAPTERS = ("lora", "qlora")
#: axolotl ``optimizer:`` values that precondition or project the factors' gradients themselves.
_OWN_OPTIMIZERS = {
    "polora": "PoLoRA preconditions the LoRA factors with curvature matrices of its own",
    "q_galore_adamw8bit": "Q-GaLore projects the gradients onto a subspace of its own",
}


class LoRAProArgs(BaseModel):
    """The keys the plugin adds to axolotl's configuration."""

    lorapro_x_mode: Literal["sylvester", "zero", "symmetric"] = "sylvester"


def check_config(cfg: Any) -> None:
    """Raise :class:`~lorapro.LoRAProConfigError` for an axolotl configuration (the YAML's dict,
    validated or not) that would not train LoRA-Pro."""
    get = cfg.get
    adapter = get("adapter")
    if adapter not in ADAPTERS:
        what = "no adapter (full fine-tuning)" if not adapter else f"adapter: {adapter}"
        raise refuse(FRAMEWORK, f"{what} trains no LoRA pairs", "LoRA-Pro needs adapter: lora or qlora")
    if get("peft_use_dora"):
        raise refuse(
            FRAMEWORK,
            "peft_use_dora: DoRA adds a magnitude vector, and LoRA-Pro's closed form holds only for "
            "W0 + s B A",
            "Remove peft_use_dora (peft_use_rslora is supported)",
        )
    if get("loraplus_lr_ratio") is not None:
        raise refuse(
            FRAMEWORK,
            "loraplus_lr_ratio (LoRA+) steps B with a larger learning rate than A, so the update is no "
            "longer the one LoRA-Pro's gradients define",
            "Remove loraplus_lr_ratio",
        )
    optimizer = str(get("optimizer") or "")
    if optimizer in _OWN_OPTIMIZERS:
        raise refuse(
            FRAMEWORK, f"optimizer: {optimizer}: {_OWN_OPTIMIZERS[optimizer]}", "Use another optimizer"
        )
    check_optim(optimizer, FRAMEWORK)
    unsupported = {
        "lisa_n_layers": "LISA trains sampled layers in full",
        "relora": "ReLoRA merges and restarts the adapters on a schedule of its own",
        "rl": "the RL trainers (rl:) are not covered by this integration",
    }
    for key, why in unsupported.items():
        if get(key):
            raise refuse(FRAMEWORK, f"{key}: {why}", f"Remove {key}")


class LoRAProPlugin(BasePlugin):
    """``plugins: [lorapro.integrations.axolotl.LoRAProPlugin]``."""

    def get_input_args(self) -> str:
        return f"{__name__}.LoRAProArgs"

    def register(self, cfg: dict) -> None:
        # The raw YAML, before axolotl validates it: refuse here, before anything loads.
        check_config(cfg)
        announce(
            "lorapro's plugin is registered: LoRA-Pro will adjust the LoRA gradients when training begins",
            LOG,
        )

    def pre_model_load(self, cfg: Any) -> None:
        check_config(cfg)  # again on the validated configuration (defaults and CLI overrides applied)

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        return [
            AnnouncingLoRAProCallback(FRAMEWORK, x_mode=cfg.get("lorapro_x_mode") or "sylvester", logger=LOG)
        ]
