"""A user's Hugging Face model folder (``--model PATH``), read offline.

The folder is what ``save_pretrained`` writes for a model and its tokenizer:
``config.json``, the weights (``*.safetensors`` or ``pytorch_model*.bin``, sharded or
not) and the tokenizer's files. Nothing is downloaded (``local_files_only``), and no code
from the folder runs (no ``trust_remote_code``): architectures transformers does not
know are refused with a message saying so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import _force_offline, _quiet_transformers

__all__ = ["ModelFolder", "ModelFolderError"]

#: File names (or suffixes) that hold weights; they are fingerprinted by size and time,
#: everything else in the folder by content.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
#: The model kinds the bench loads, and the transformers class that builds each.
_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ModelFolderError(ValueError):
    """``--model`` is not a usable model folder; the message says what is missing."""


class ModelFolder:
    """A model folder: checks, a fingerprint for the run hash, and its loaders."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def check(self) -> None:
        """Cheap checks (no loading): the folder, its config, weights and tokenizer files exist."""
        where = f"--model {self.path}"
        if not self.path.is_dir():
            what = "is a file" if self.path.exists() else "does not exist"
            raise ModelFolderError(
                f"{where} {what}; give a Hugging Face model folder (config.json, weights, tokenizer), "
                "as save_pretrained writes it"
            )
        if not (self.path / "config.json").is_file():
            raise ModelFolderError(f"{where} has no config.json; save the model with save_pretrained")
        if not any(p.suffix in (".safetensors", ".bin") for p in self.path.iterdir() if p.is_file()):
            raise ModelFolderError(
                f"{where} has no weights (*.safetensors or pytorch_model*.bin); save the model with "
                "save_pretrained"
            )
        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelFolderError(
                f"{where} has no tokenizer files (tokenizer.json or tokenizer_config.json); save the "
                "tokenizer into the same folder with tokenizer.save_pretrained"
            )

    def identity(self) -> dict[str, Any]:
        """What makes runs on this model comparable: its path and a fingerprint of its files.

        Small files (config, tokenizer, chat template) by content; weight files by name, size
        and modification time, since hashing gigabytes on every invocation would not pay.
        Saving new weights into the folder therefore never reuses runs of the old ones.
        """
        files: dict[str, Any] = {}
        if self.path.is_dir():
            for p in sorted(self.path.iterdir()):
                if not p.is_file():
                    continue
                stat = p.stat()
                if p.suffix in _WEIGHT_SUFFIXES:
                    files[p.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                else:
                    files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        return {"path": str(self.path.resolve()), "files": files}

    # ------------------------------------------------------------------ loading

    def config(self) -> Any:
        _force_offline()
        from transformers import AutoConfig

        try:
            with _quiet_transformers():
                return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFolderError(
                f"--model {self.path}: transformers cannot read its config: {exc}"
            ) from None

    def tokenizer(self) -> Any:
        _force_offline()
        from transformers import AutoTokenizer

        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFolderError(
                f"--model {self.path}: transformers cannot load its tokenizer: {exc}"
            ) from None
        return tokenizer

    @staticmethod
    def _auto(kind: str) -> Any:
        import transformers

        return getattr(transformers, _AUTO_CLASSES[kind])

    def skeleton(self, kind: str, **config_options: Any) -> nn.Module:
        """The model's structure without weights (meta device): checks that transformers can
        build it as ``kind`` and gives its module names, in a fraction of a second."""
        config = self.config()
        for key, value in config_options.items():
            setattr(config, key, value)
        what = "a causal language model" if kind == "causal-lm" else "a sequence classifier"
        try:
            with _quiet_transformers(), torch.device("meta"):
                return self._auto(kind).from_config(config)
        except (ValueError, KeyError, TypeError, ImportError) as exc:
            raise ModelFolderError(
                f"--model {self.path}: transformers cannot build this {config.model_type!r} model as "
                f"{what}: {exc}"
            ) from None

    def load(self, kind: str, dtype: torch.dtype = torch.float32, **config_options: Any) -> nn.Module:
        """A fresh model from the folder's weights, in ``dtype`` (a new head is random: the caller
        seeds it). ``config_options`` override config entries (``num_labels``, ``pad_token_id``)."""
        _force_offline()
        with _quiet_transformers():
            # A head whose shape differs from the stored one (another number of classes) is
            # created anew instead of refusing the checkpoint.
            extra = {"ignore_mismatched_sizes": True} if kind == "sequence-classification" else {}
            return self._auto(kind).from_pretrained(
                self.path, local_files_only=True, dtype=dtype, **config_options, **extra
            )
