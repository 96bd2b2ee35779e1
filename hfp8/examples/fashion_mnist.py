"""Reading Fashion-MNIST's IDX files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_ROOT", "load_fashion_mnist"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``split`` "train" (60k) or "test" (10k)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(f"{images} not found: apt-get install dataset-fashion-mnist")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(_read_idx(images).copy()), torch.from_numpy(labels.astype(np.int64))
