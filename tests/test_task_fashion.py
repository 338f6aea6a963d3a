"""Tests of the image tasks ``fashion`` and ``mnist5k``: idx/CSV reading, splits, the
EfficientNet-Lite0 model and its LoRA targets, and tiny end-to-end runs.

The model packages and mlxtend are installed wherever the tests run. The Debian
Fashion-MNIST files are too, but a machine without the Debian package skips (only) the
tests that read them, saying why.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import lorapro.bench.tasks.fashion as fashion
import lorapro.bench.tasks.mnist5k as mnist5k
from lorapro.bench.data import MissingAssetError
from lorapro.bench.methods import BuildContext, get_method
from lorapro.bench.tasks.base import PreparedTask, TaskOptions
from lorapro.bench.tasks.efficientnet import (
    EFFICIENTNET_HEAD,
    efficientnet_lite0_weights,
    load_efficientnet_lite0,
    pointwise_conv_names,
)
from lorapro.bench.tasks.image_files import read_idx
from lorapro.bench.tasks.image_splits import ImagePools, LabelledImages, draw_splits
from lorapro.bench.tasks.registry import get_task
from lorapro.bench.train import TrainConfig, train_and_evaluate

TINY = TaskOptions(train_size=64, val_size=32, test_size=32)


def _write_idx(path: Path, array: torch.Tensor, *, magic: int | None = None) -> Path:
    """An unsigned-byte idx file (gzip when the name ends in .gz) holding ``array``."""
    header = struct.pack(">I", magic if magic is not None else 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + bytes(array.to(torch.uint8).flatten().tolist())
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _fake_fashion_dir(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """The four Debian file names holding a few random images, labels cycling 0..9."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fashion.FASHION_FILES[split]
        _write_idx(root / images_name, torch.randint(0, 256, (n, 28, 28), generator=gen))
        _write_idx(root / labels_name, torch.arange(n) % 10)
    return root


def _require_debian_fashion() -> None:
    if not fashion.FASHION_MNIST_DIR.is_dir():
        reason = (
            f"{fashion.FASHION_MNIST_DIR} does not exist: the Debian package dataset-fashion-mnist is not "
            "installed here (apt-get install dataset-fashion-mnist)"
        )
        print(reason)
        pytest.skip(reason)


# --------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, name: str) -> None:
    images = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    assert torch.equal(read_idx(_write_idx(tmp_path / name, images), ndim=3), images)
    assert torch.equal(read_idx(_write_idx(tmp_path / f"labels-{name}", labels), ndim=1), labels)


def test_read_idx_rejects_a_wrong_magic_number(tmp_path: Path) -> None:
    labels = _write_idx(tmp_path / "labels.gz", torch.arange(4))
    # A label file (2049) where an image file (2051) is expected: the usual swap of arguments.
    with pytest.raises(ValueError, match=r"magic number is 2049.*expected 2051"):
        read_idx(labels, ndim=3)
    bad = _write_idx(tmp_path / "bad.gz", torch.arange(4), magic=0x0D0801)
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad, ndim=1)


def test_read_idx_rejects_truncated_and_non_gzip_files(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "images.idx", torch.zeros(2, 3, 3))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path, ndim=3)
    fake_gz = tmp_path / "plain.gz"
    fake_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read it as an idx file"):
        read_idx(fake_gz, ndim=1)


def test_fashion_loader_reads_the_four_files(tmp_path: Path) -> None:
    pools = fashion.load_fashion_mnist(_fake_fashion_dir(tmp_path))
    assert pools.test is not None
    assert (len(pools.train), len(pools.test)) == (40, 20)
    assert pools.train.images.shape == (40, 28, 28) and pools.train.images.dtype == torch.uint8
    assert pools.train.labels.dtype == torch.long
    assert pools.class_names == fashion.FASHION_CLASSES


def test_missing_debian_files_name_apt_get_and_mnist5k(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion, "FASHION_MNIST_DIR", tmp_path / "absent")
    task = get_task("fashion")
    for call in (task.check, lambda: task.prepare(TINY)):
        with pytest.raises(MissingAssetError) as info:
            call()
        message = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "--task mnist5k" in message
        assert str(tmp_path / "absent") in message


def test_fashion_size_errors_name_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion, "FASHION_MNIST_DIR", _fake_fashion_dir(tmp_path))
    task = get_task("fashion")
    with pytest.raises(ValueError, match="--train-size 2000 is more than the 30 training images"):
        task.prepare(TaskOptions(val_size=10, test_size=10))
    with pytest.raises(ValueError, match="--test-size 21 is more than the 20 images"):
        task.prepare(TaskOptions(train_size=10, val_size=10, test_size=21))
    with pytest.raises(ValueError, match="--max-length"):
        task.prepare(TaskOptions(train_size=10, val_size=10, test_size=10, max_length=64))


# --------------------------------------------------------------------------- splits


def _pool(n: int, ratio: float, offset: int = 0) -> LabelledImages:
    # Pixel (0, 0) holds the image's id, so disjointness can be checked on the images.
    ids = torch.arange(offset, offset + n)
    images = torch.zeros((n, 2, 2), dtype=torch.uint8)
    images[:, 0, 0] = ids % 256
    images[:, 0, 1] = ids // 256
    labels = (torch.arange(n) >= int(n * (1 - ratio))).long()  # imbalanced two classes
    return LabelledImages(images, labels, source="synthetic")


def _ids(pool: LabelledImages, idx: list[int]) -> set[int]:
    return {int(pool.images[i, 0, 0]) + 256 * int(pool.images[i, 0, 1]) for i in idx}


@pytest.mark.parametrize("separate_test", [True, False])
def test_draw_splits_sizes_disjoint_stratified_deterministic(separate_test: bool) -> None:
    pools = ImagePools(
        train=_pool(1000, 0.3),
        test=_pool(400, 0.3, offset=5000) if separate_test else None,
        class_names=("a", "b"),
        name="toy",
        source="toy",
    )
    drawn = draw_splits(pools, 200, 100, 100, seed=3)
    assert {k: len(idx) for k, (_, idx) in drawn.items()} == {"train": 200, "validation": 100, "test": 100}
    ids = {k: _ids(pool, idx) for k, (pool, idx) in drawn.items()}
    assert all(len(v) == len(drawn[k][1]) for k, v in ids.items())  # no repeats within a split
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert all(i >= 5000 for i in ids["test"]) == separate_test  # test comes from the official test pool
    for _, (pool, idx) in drawn.items():
        counts = Counter(pool.labels[idx].tolist())
        assert counts[1] == round(0.3 * len(idx))  # class ratio of the pool, exactly here
    again = draw_splits(pools, 200, 100, 100, seed=3)
    assert {k: v[1] for k, v in again.items()} == {k: v[1] for k, v in drawn.items()}
    other = draw_splits(pools, 200, 100, 100, seed=4)
    assert other["train"][1] != drawn["train"][1]
    # The evaluation sets do not move when only the training budget changes.
    bigger = draw_splits(pools, 500, 100, 100, seed=3)
    assert bigger["validation"][1] == drawn["validation"][1]
    assert bigger["test"][1] == drawn["test"][1]


def test_draw_splits_errors_name_the_option_to_lower() -> None:
    shared = ImagePools(_pool(100, 0.5), None, ("a", "b"), "toy", "toy")
    with pytest.raises(ValueError, match=r"--train-size 81 .*lower --train-size, --val-size or --test-size"):
        draw_splits(shared, 81, 10, 10)
    with pytest.raises(ValueError, match=r"--val-size 60 plus --test-size 50"):
        draw_splits(shared, 1, 60, 50)
    separate = ImagePools(_pool(100, 0.5), _pool(20, 0.5), ("a", "b"), "toy", "toy")
    with pytest.raises(ValueError, match=r"--test-size 21 .*lower --test-size"):
        draw_splits(separate, 10, 10, 21)
    with pytest.raises(ValueError, match=r"--train-size 91 .*lower --train-size or --val-size"):
        draw_splits(separate, 91, 10, 5)


# --------------------------------------------------------------------------- model and LoRA targets


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    return load_efficientnet_lite0(10, 64)


def test_lora_targets_are_exactly_the_1x1_ungrouped_body_convs(lite0: nn.Module) -> None:
    names = pointwise_conv_names(lite0)
    modules = dict(lite0.named_modules())
    assert len(names) == 31  # 16 blocks: a project conv each, an expand conv in all but the first
    assert all(n.startswith("_blocks.") and n.endswith(("_expand_conv", "_project_conv")) for n in names)
    for name, module in lite0.named_modules():
        if isinstance(module, nn.Conv2d):
            pointwise = tuple(module.kernel_size) == (1, 1) and module.groups == 1
            assert (name in names) == (pointwise and name.startswith("_blocks.")), name
    assert "_conv_head" not in names and "_conv_stem" not in names
    assert all(type(modules[n]) is nn.Conv2d for n in names)  # PEFT can rebuild plain convs
    assert isinstance(modules[EFFICIENTNET_HEAD], nn.Linear) and modules[EFFICIENTNET_HEAD].out_features == 10


def test_plain_convs_compute_what_the_package_model_computes(lite0: nn.Module, single_thread) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=64, num_classes=10)
    reference.load_state_dict(lite0.state_dict())
    x = torch.randn(2, 3, 64, 64)
    lite0.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(lite0(x), reference(x), atol=1e-5)


def test_head_depends_only_on_the_seed() -> None:
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    torch.manual_seed(5)
    a = load_efficientnet_lite0(10, 64, state)
    torch.manual_seed(5)
    b = load_efficientnet_lite0(10, 64, state)
    torch.manual_seed(5)
    head = nn.Linear(1280, 10)  # the first thing load_efficientnet_lite0 draws
    assert torch.equal(a._fc.weight, b._fc.weight) and torch.equal(a._fc.weight, head.weight)


def test_peft_wraps_the_targets_and_lorapro_accepts_the_model(single_thread) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Conv2d as LoraConv2d

    from lorapro import LoRAProAdamW

    torch.manual_seed(0)
    model = load_efficientnet_lite0(10, 64)
    names = pointwise_conv_names(model)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=names, modules_to_save=[EFFICIENTNET_HEAD])
    )
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()}
    assert all(isinstance(wrapped[n], LoraConv2d) for n in names)
    assert sum(isinstance(m, LoraConv2d) for m in wrapped.values()) == len(names)
    opt = LoRAProAdamW(peft_model, lr=1e-3)
    x = torch.randn(4, 3, 64, 64)
    nn.functional.cross_entropy(peft_model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()


# --------------------------------------------------------------------------- prepared tasks


@pytest.fixture(scope="module")
def tiny_fashion() -> PreparedTask:
    _require_debian_fashion()
    return get_task("fashion").prepare(TINY)


def test_fashion_prepare_sizes_batches_and_determinism(tiny_fashion: PreparedTask) -> None:
    assert tiny_fashion.info["sizes"] == {"train": 64, "validation": 32, "test": 32, "pool": 70000}
    assert tiny_fashion.info["resolution"] == 64
    assert tiny_fashion.modules_to_save == [EFFICIENTNET_HEAD] and tiny_fashion.peft_task_type is None
    batch = tiny_fashion.train.batch([0, 5, 7])
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and int(batch["labels"].max()) < 10
    # Stratified: 64 of 10 balanced classes -> 6 or 7 each.
    counts = Counter(tiny_fashion.train.batch(range(64))["labels"].tolist())
    assert set(counts.values()) <= {6, 7} and len(counts) == 10
    task = get_task("fashion")
    again = task.prepare(TINY)
    bigger = task.prepare(TaskOptions(train_size=128, val_size=32, test_size=32))
    for split in ("train", "validation", "test"):
        assert torch.equal(getattr(again, split).images, getattr(tiny_fashion, split).images)
    for split in ("validation", "test"):
        assert torch.equal(getattr(bigger, split).images, getattr(tiny_fashion, split).images)


def test_evaluate_uses_eval_mode_and_restores_train_mode(tiny_fashion: PreparedTask, single_thread) -> None:
    torch.manual_seed(0)
    model = tiny_fashion.load_model()
    model.train()
    running_mean = model._bn0.running_mean.clone()
    first = tiny_fashion.evaluate(model, "validation")
    assert model.training
    assert torch.equal(model._bn0.running_mean, running_mean)  # no batch-statistics updates
    assert tiny_fashion.evaluate(model, "validation") == first  # no dropout / drop-connect
    assert 0.0 <= first["accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["lora", "lorapro", "full"])
def test_tiny_fashion_end_to_end(tiny_fashion: PreparedTask, method: str, single_thread) -> None:
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=32)
    result = train_and_evaluate(method, tiny_fashion, cfg, progress=False)
    assert result.steps == 2 and not result.diverged
    assert all(math.isfinite(x) for x in result.loss_curve)
    for metrics in (result.validation, result.test):
        assert 0.0 <= metrics["accuracy"] <= 1.0
    if method == "full":
        assert result.trainable_params == sum(p.numel() for p in tiny_fashion.load_model().parameters())
        return
    # Only LoRA factors and the head train: check the names on the same build.
    torch.manual_seed(cfg.seed)
    built = get_method(method).build(tiny_fashion.load_model(), BuildContext(cfg, tiny_fashion, 2))
    trainable = {n: p.numel() for n, p in built.model.named_parameters() if p.requires_grad}
    assert all(
        ".lora_A." in n or ".lora_B." in n or f"{EFFICIENTNET_HEAD}.modules_to_save." in n for n in trainable
    )
    assert sum(f"{EFFICIENTNET_HEAD}.modules_to_save." in n for n in trainable) == 2  # weight and bias
    assert sum(".lora_A." in n for n in trainable) == 31
    assert result.trainable_params == sum(trainable.values())


def test_mnist5k_is_labelled_as_digits_and_splits_one_pool(single_thread) -> None:
    prepared = get_task("mnist5k").prepare(TaskOptions(train_size=40, val_size=20, test_size=20))
    info = prepared.info
    assert info["sizes"] == {"train": 40, "validation": 20, "test": 20, "pool": 5000}
    assert info["data_source"] == str(mnist5k.mnist5k_path())
    assert any("NOT Fashion-MNIST" in note for note in info["data_notes"])
    for split, n in (("train", 40), ("validation", 20), ("test", 20)):
        counts = Counter(getattr(prepared, split).batch(range(n))["labels"].tolist())
        assert len(counts) == 10 and set(counts.values()) == {n // 10}  # 500 per digit -> exact strata
    # Disjoint: no image appears in two splits.
    images = torch.cat([prepared.train.images, prepared.validation.images, prepared.test.images])
    assert len({img.numpy().tobytes() for img in images}) == 80
