"""The image tasks' data: pools of labelled 28x28 images, the seeded stratified splits drawn from
them, and those splits resized once and served as normalised batches.

Images are kept as one grayscale channel; the three-channel ImageNet normalisation happens per
batch by broadcasting, which costs nothing measurable and keeps the stored tensors a third of
the size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import split_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePools",
    "ImageSplit",
    "LabelledImages",
    "draw_splits",
    "resize_grayscale",
]

#: The statistics the ImageNet weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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
