"""Every place lorapro's Trainer integration touches ``transformers.Trainer`` beyond its public API,
checked once against the installed version.

The Trainer saves and restores the optimizer in its private ``_save_optimizer_and_scheduler`` /
``_load_optimizer_and_scheduler``; :class:`CheckpointExtras` extends both, so that a checkpoint can
carry what full mode's weight decay changes (the frozen base weights). The Trainer's FSDP plugin,
DeepSpeed config and ``optim`` default are read through the functions below. If a release of
transformers renames any of it, importing this module says so instead of a checkpoint silently
missing its extras.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from transformers import Trainer, TrainingArguments

__all__ = ["CheckpointExtras", "deepspeed_config", "default_optim", "fsdp_version"]

#: The Trainer's private methods lorapro extends, with the parameter each must take.
_CHECKPOINT_METHODS = {
    "_save_optimizer_and_scheduler": "output_dir",
    "_load_optimizer_and_scheduler": "checkpoint",
}


def _check_trainer() -> None:
    for name, parameter in _CHECKPOINT_METHODS.items():
        method = getattr(Trainer, name, None)
        if not callable(method) or parameter not in inspect.signature(method).parameters:
            raise ImportError(
                f"transformers {transformers.__version__}: Trainer.{name}({parameter}, ...) is gone or "
                "changed; lorapro's LoRAProTrainer extends it to checkpoint full mode's decayed base "
                "weights. Install a transformers release that lorapro's [trainer] extra names "
                "(pyproject.toml), or use LoRAProCallback, which needs neither."
            )


_check_trainer()


class CheckpointExtras:
    """A Trainer mix-in: ``save_checkpoint_extras(output_dir)`` runs after the Trainer saved the
    optimizer and scheduler into a checkpoint, ``load_checkpoint_extras(checkpoint)`` after it
    restored them (both through the Trainer's private hooks, checked at import)."""

    def save_checkpoint_extras(self, output_dir: str) -> None:
        """Write what else the checkpoint needs into ``output_dir``."""

    def load_checkpoint_extras(self, checkpoint: str) -> None:
        """Restore it from the checkpoint folder."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        self.save_checkpoint_extras(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is not None:
            self.load_checkpoint_extras(checkpoint)


def fsdp_version(trainer: Trainer) -> int | None:
    """1 or 2 when the Trainer runs FSDP, else None."""
    if not trainer.is_fsdp_enabled:
        return None
    return getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)


def deepspeed_config(trainer: Trainer) -> dict[str, Any] | None:
    """The DeepSpeed config the Trainer runs with, or None."""
    return trainer.args.hf_deepspeed_config.config if trainer.is_deepspeed_enabled else None


def default_optim(args: TrainingArguments) -> Any:
    """``TrainingArguments.optim``'s default (to tell whether the user set one)."""
    return type(args).__dataclass_fields__["optim"].default
