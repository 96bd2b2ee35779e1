"""Reference models for PTQ experiments: a torchvision-compatible MobileNetV2."""

from hfp8.models.mobilenet_v2 import (
    InvertedResidual,
    MobileNetV2,
    imagenet_mobilenet_v2_weights_path,
    mobilenet_v2,
)

__all__ = [
    "InvertedResidual",
    "MobileNetV2",
    "imagenet_mobilenet_v2_weights_path",
    "mobilenet_v2",
]
