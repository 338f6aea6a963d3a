"""lorapro as a DeepSpeed client optimizer: what works, and a clear error for what cannot.

What DeepSpeed does to a client optimizer (checked with DeepSpeed 0.19.8, CPU, gloo):

- **ZeRO stage 0, fp32 or ``torch_autocast``**: the engine all-reduces the gradients and calls
  the client optimizer as it is; lorapro sees its LoRA pairs and the result equals one process
  on the global batch. Supported.
- **ZeRO stage 1 and 2**: DeepSpeed's ZeRO optimizer flattens every parameter group into one
  fp32 vector, keeps this rank's slice of it, and replaces ``param_groups[i]["params"]`` of the
  client optimizer by that flat slice. The (m, r) and (r, n) matrices of a layer no longer exist
  in the optimizer, a slice boundary can cut through them, and their gradients arrive as pieces
  of a flat buffer. LoRA-Pro's per-layer closed form cannot run on that without patching
  DeepSpeed (which is what the official LoRA-Pro code does). Worse, nothing fails by itself:
  the flat slice looks like an ordinary parameter and gets plain AdamW (the Trainer and
  Accelerate even set ``zero_allow_untested_optimizer`` for you). Refused.
- **ZeRO stage 3**: parameters are partitioned and flattened as well. Refused.
- **``bf16``/``fp16`` sections (mixed precision with fp32 master weights)**: DeepSpeed swaps the
  client optimizer's parameters for fp32 master copies, so the pairs lorapro found on the model
  no longer receive gradients and the copies get plain AdamW. Refused; use DeepSpeed's
  ``torch_autocast`` section (fp32 weights, bf16 compute) or keep the model in bf16 yourself.
- **an ``optimizer`` section**: DeepSpeed builds its own optimizer instead. Refused.

What to use instead with ZeRO-1/2/3, Offload or the bf16/fp16 sections: :func:`lorapro.attach`
before ``deepspeed.initialize``, with DeepSpeed's own optimizer. The gradient hooks adjust every
gradient before DeepSpeed accumulates, reduces or partitions it, so its optimizer steps
LoRA-Pro's gradients (efficient mode). Full mode needs a lorapro optimizer: ZeRO stage 0, torchrun/DDP, or
FSDP2 (the optimizers work on its shards).
"""

from __future__ import annotations

from typing import Any

from .._extras import raise_missing_extra
from ..errors import LoRAProConfigError
from .guard import assert_owns_pairs, unwrap_lorapro

__all__ = ["assert_owns_pairs", "check_deepspeed_config", "initialize"]

_INSTEAD = (
    "For efficient mode call lorapro.attach(model) before deepspeed.initialize and keep DeepSpeed's own "
    "optimizer (tested with ZeRO stages 1-3, Offload and the bf16 section); for a lorapro optimizer (full "
    "mode) use ZeRO stage 0, torchrun/DDP, or FSDP2 (build the lorapro optimizer after fully_shard)."
)


def _enabled(section: Any) -> bool:
    if not isinstance(section, dict):
        return False
    value = section.get("enabled", False)
    return value is True or (isinstance(value, str) and value.lower() in ("true", "auto"))


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Raise :class:`~lorapro.LoRAProConfigError` unless DeepSpeed would hand lorapro the LoRA
    factors as they are (see the module docstring for each case)."""
    if not isinstance(config, dict):
        raise LoRAProConfigError(f"expected the DeepSpeed config as a dict, got {type(config).__name__}")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 0:
        raise LoRAProConfigError(
            f"DeepSpeed ZeRO stage {stage} cannot run lorapro: ZeRO stages 1-3 replace the optimizer's "
            "parameters by flat fp32 partitions that concatenate all parameters, so a layer's LoRA A and "
            "B matrices no longer exist in the optimizer and the closed form cannot be applied (the "
            "partitions would silently get plain AdamW). " + _INSTEAD
        )
    for key in ("bf16", "fp16"):
        if _enabled(config.get(key)):
            raise LoRAProConfigError(
                f"DeepSpeed's {key!r} section cannot run lorapro: it replaces the optimizer's parameters by "
                "fp32 master copies, which the LoRA pairs found on the model are not (they would silently "
                f'get plain AdamW). Use DeepSpeed\'s "torch_autocast": {{"enabled": true, "dtype": '
                f'"{"bfloat16" if key == "bf16" else "float16"}"}} section instead (fp32 weights, '
                "low-precision compute), with ZeRO stage 0."
            )
    if "optimizer" in config:
        raise LoRAProConfigError(
            "the DeepSpeed config has an 'optimizer' section, so DeepSpeed would build its own optimizer "
            "instead of lorapro's; remove the section and pass the lorapro optimizer as the client optimizer"
        )


def initialize(*, model, optimizer, config: dict[str, Any], **kwargs: Any):
    """``deepspeed.initialize`` with a lorapro client optimizer, refusing what cannot work.

    Checks the config first (:func:`check_deepspeed_config`), then, after DeepSpeed has set up
    its engine, that the optimizer still owns every LoRA factor it adjusts. Returns what
    ``deepspeed.initialize`` returns.
    """
    try:
        import deepspeed
    except ModuleNotFoundError as exc:
        raise_missing_extra(exc, "lorapro.integrations.deepspeed.initialize")
    if unwrap_lorapro(optimizer) is None:
        raise LoRAProConfigError(
            "optimizer must be a lorapro optimizer (LoRAProAdamW, LoRAProSGD, ...), got "
            f"{type(optimizer).__name__}"
        )
    check_deepspeed_config(config)
    result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    assert_owns_pairs(optimizer, "after deepspeed.initialize")
    return result
