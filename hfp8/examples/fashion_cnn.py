"""A small BatchNorm CNN for Fashion-MNIST (28 x 28 greyscale, 10 classes), about 60k weights.

Trained by ``examples/train_fashion_cnn.py`` (Debian's ``dataset-fashion-mnist``); the weights,
128 calibration images from the training set and 500 labelled test images (50 per class) ship in
``fashion_cnn_data/``. Inputs are ``pixel / 255`` (the CLI's ``--channels 1 --mean 0 --std 1
--resize 0 --crop 0``), shape (1, 28, 28).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

__all__ = ["CLASS_NAMES", "fashion_cnn", "example_data_dir", "copy_example"]

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle-boot")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def fashion_cnn() -> nn.Module:
    """28x28 -> 28x28x16 -> 14x14x32 -> 7x7x64 -> 7x7x64 -> global average -> 10 logits."""
    return nn.Sequential(_conv_bn_relu(1, 16), _conv_bn_relu(16, 32, 2), _conv_bn_relu(32, 64, 2),
                         _conv_bn_relu(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def example_data_dir() -> Path:
    """The installed folder with ``model.pt``, ``calibration/`` and ``test/<class>/``."""
    return Path(__file__).with_name("fashion_cnn_data")


def copy_example(destination: str | Path) -> Path:
    """Copy the example (weights and sample folders) into ``destination`` (new or empty)."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists and is not an empty folder")
    source = example_data_dir()
    if not (source / "model.pt").is_file():
        raise FileNotFoundError(f"the example data is missing from {source}; reinstall hfp8-ptq")
    shutil.copytree(source, destination, dirs_exist_ok=True)
    return destination
