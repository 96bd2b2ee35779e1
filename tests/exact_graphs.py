"""Random small models whose quantized forward is exact in float32, for differential tests.

Weights are multiples of 1/2 in [-1, 1] (mostly zero), biases multiples of 1/2, inputs small
integers: every product and partial sum is then a dyadic number that float32 holds exactly,
and FP8 rounding keeps values dyadic, so PyTorch float32, PyTorch float64 and onnxruntime in
any session compute *the same bits* whatever their summation order or kernels. Any difference
between them is a defect, not float noise (the tests check the float32 = float64 premise on
every model they build).

A model is a chain of blocks ``conv -> activation -> between``, where ``between`` is one of
the ops that may stand between an activation and the next layer's QuantizeLinear (pooling,
resizing, padding, slicing, concatenation, splitting, transposes, reshapes, gathers,
expands); the last block feeds a Linear head. Some models also return an intermediate feature
map that later layers read too (an output that is consumed).
"""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn
from torch.nn import functional as F

import hfp8

ACTIVATIONS = ("relu", "relu6", "none")
# op -> (how it changes (channels, size), when it applies)
BETWEEN = {
    "maxpool": (lambda c, h: (c, h // 2), lambda c, h: h >= 4 and h % 2 == 0),
    "avgpool": (lambda c, h: (c, h // 2), lambda c, h: h >= 4 and h % 2 == 0),
    "resize_nearest": (lambda c, h: (c, 2 * h), lambda c, h: h <= 6),
    "resize_linear": (lambda c, h: (c, 2 * h), lambda c, h: h <= 6),
    "pad_zero": (lambda c, h: (c, h + 2), lambda c, h: h <= 8),
    "pad_reflect": (lambda c, h: (c, h + 2), lambda c, h: 2 <= h <= 8),
    "crop": (lambda c, h: (c, h - 2), lambda c, h: h >= 4),
    "channel_slice": (lambda c, h: ((c + 1) // 2, h), lambda c, h: c >= 2),
    "concat_self": (lambda c, h: (2 * c, h), lambda c, h: c <= 6),
    "concat_branch": (lambda c, h: (2 * c, h), lambda c, h: c <= 6),
    "split_swap": (lambda c, h: (c, h), lambda c, h: c >= 2),
    "transpose": (lambda c, h: (c, h), lambda c, h: True),
    "reshape": (lambda c, h: (c, h), lambda c, h: True),
    "squeeze": (lambda c, h: (c, h), lambda c, h: True),
    "gather": (lambda c, h: (c, h), lambda c, h: True),
    "expand": (lambda c, h: (2, h), lambda c, h: True),
    "identity": (lambda c, h: (c, h), lambda c, h: True),
}


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return {"relu": F.relu, "relu6": F.relu6, "none": lambda t: t}[name](x)


def _between(name: str, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``name`` applied to ``x`` (N, C, H, H); the shape changes as ``BETWEEN`` says."""
    n, c, h, w = x.shape
    if name in ("maxpool", "avgpool"):
        return (F.max_pool2d if name == "maxpool" else F.avg_pool2d)(x, 2)
    if name.startswith("resize"):
        mode = "nearest" if name == "resize_nearest" else "bilinear"
        extra = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(x, scale_factor=2.0, mode=mode, **extra)
    if name.startswith("pad"):
        return F.pad(x, (1, 1, 1, 1), mode="constant" if name == "pad_zero" else "reflect")
    if name == "crop":
        return x[:, :, 1:-1, 1:-1]
    if name == "channel_slice":
        return x[:, : (c + 1) // 2]
    if name == "concat_self":
        return torch.cat([x, x], dim=1)
    if name == "concat_branch":
        return torch.cat([x, branch], dim=1)
    if name == "split_swap":
        first, second = torch.split(x, [c // 2, c - c // 2], dim=1)
        return torch.cat([second, first], dim=1)
    if name == "transpose":
        return x.transpose(2, 3)
    if name == "reshape":
        return x.reshape(n, c * h, w).reshape(n, c, h, w)
    if name == "squeeze":
        return x.unsqueeze(2).squeeze(2)
    if name == "gather":
        return x.index_select(1, torch.arange(c - 1, -1, -1))
    if name == "expand":
        return x[:, :1].expand(n, 2, h, w)
    return x


class RandomChain(nn.Module):
    """A seeded chain of ``conv -> activation -> between`` blocks and a Linear head."""

    def __init__(self, seed: int, blocks: int | None = None) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.size = size = rng.choice((4, 6, 8))
        count = blocks if blocks is not None else rng.randint(2, 4)
        channels = self.in_channels = rng.choice((2, 3, 4))
        self.plan: list[tuple[str, str]] = []
        self.convs = nn.ModuleList()
        for _ in range(count):
            out = rng.choice((2, 4, 6))
            kernel = rng.choice((1, 3)) if size >= 3 else 1
            groups = channels if (rng.random() < 0.25 and out % channels == 0) else 1
            self.convs.append(nn.Conv2d(channels, out, kernel, padding=kernel // 2, groups=groups))
            between = rng.choice(sorted(op for op, (_, fits) in BETWEEN.items() if fits(out, size)))
            self.plan.append((rng.choice(ACTIVATIONS), between))
            channels, size = BETWEEN[between][0](out, size)
        self.head = nn.Linear(channels * size * size, rng.choice((3, 5)))
        self.return_feature = rng.random() < 0.3
        _dyadic_parameters(self, rng)

    def forward(self, x):
        feature = None
        for conv, (activation, between) in zip(self.convs, self.plan):
            x = _activation(activation, conv(x))
            feature = x if feature is None else feature
            x = _between(between, x, torch.relu(x))
        logits = self.head(x.flatten(1))
        return (logits, feature) if self.return_feature else logits

    def batches(self, count: int = 2, batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(-3, 4, (batch, self.in_channels, self.size, self.size),
                              generator=generator).float() for _ in range(count)]


def _dyadic_parameters(model: nn.Module, rng: random.Random) -> None:
    """Weights in {-1, -1/2, 0, 1/2, 1} (mostly 0), biases in {-1, -1/2, 0, 1/2, 1}."""
    choices = (-1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            values = [rng.choice(choices) for _ in range(parameter.numel())]
            parameter.copy_(torch.tensor(values).reshape(parameter.shape))


FAST = hfp8.QuantConfig(keep_first_and_last=False, weight_rounding="nearest", float_budget=0.0,
                        bn_recalibration="none")

CONFIGS = (  # the fuzz draws one per model: every layer quantized, the weight side varied
    FAST,
    dataclasses.replace(FAST, weight_granularity="per_channel"),
    dataclasses.replace(FAST, weight_format=None),  # float weights behind FP8 inputs
    dataclasses.replace(FAST, activation_format=hfp8.FloatFormat(4, 3, 7, "ieee")),
)


def config_for(seed: int) -> hfp8.QuantConfig:
    return CONFIGS[random.Random(seed + 1_000_003).randrange(len(CONFIGS))]
