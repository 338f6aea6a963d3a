"""Which modules get LoRA: the default for any Hugging Face model, and ``--target-modules``.

The default is every linear layer of the body: the ``nn.Linear`` (and GPT-2's
``Conv1D``) modules inside the model's stack of blocks, i.e. under an ``nn.ModuleList``.
That is exactly what the bundled models use (MiniLM's encoder layers, SmolLM2's decoder
layers), and it leaves out what lies outside the blocks: the LM head, a classification
head, a pooler.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["adaptable", "body_linear_names", "select_modules"]


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of the bench
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap the module here: a linear layer, or a convolution (1x1 in the image tasks)."""
    return isinstance(module, (*_linear_types(), nn.Conv2d))


def body_linear_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the model's blocks (under any ``nn.ModuleList``)."""
    linear = _linear_types()
    in_blocks: list[str] = []
    stacks = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    for name, module in model.named_modules():
        if isinstance(module, linear) and any(name.startswith(f"{stack}.") for stack in stacks):
            in_blocks.append(name)
    if not in_blocks:
        raise ValueError(
            f"{type(model).__name__} has no linear layer inside a stack of blocks (nn.ModuleList); "
            "name the modules that get LoRA with --target-modules"
        )
    return in_blocks


def select_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Full names of the modules that ``--target-modules`` names.

    A pattern selects every module whose full name equals it or ends with ``.pattern``, as
    PEFT's ``target_modules`` does (``q_proj`` selects every layer's query projection,
    ``layers.0.self_attn.q_proj`` only the first). Every pattern must select at least one
    module LoRA can wrap; the error lists the names that would.
    """
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in patterns:
        pattern = pattern.strip()
        hits = [n for n in modules if n and (n == pattern or n.endswith(f".{pattern}"))]
        usable = [n for n in hits if adaptable(modules[n])]
        if not usable:
            if hits:
                kind = type(modules[hits[0]]).__name__
                raise ValueError(
                    f"--target-modules {pattern!r} names {hits[0]} ({kind}), not a linear layer; "
                    f"name linear layers such as {_examples(modules)}"
                )
            raise ValueError(
                f"--target-modules {pattern!r} matches no module of {type(model).__name__}; "
                f"its linear layers end in {_examples(modules)}"
            )
        chosen += [n for n in usable if n not in chosen]
    return chosen


def _examples(modules: dict[str, nn.Module], limit: int = 12) -> str:
    """The distinct last parts of the names of the modules LoRA can wrap, in model order."""
    seen: list[str] = []
    for name, module in modules.items():
        last = name.rsplit(".", 1)[-1]
        if name and adaptable(module) and last not in seen:
            seen.append(last)
    more = ", ..." if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more if seen else "(none)"
