"""Small models trained inside the test suite on sklearn's digits (seeded, seconds on CPU)."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): 1,297 / 500 images of 1x8x8, scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1297], y[:1297], x[1297:], y[1297:]


def conv_bn(cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class InvertedResidual(nn.Module):
    def __init__(self, channels, expand=4):
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(conv_bn(channels, hidden, 1, act=nn.ReLU6),
                                  conv_bn(hidden, hidden, 3, groups=hidden, act=nn.ReLU6),
                                  nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x)


def make_cnn() -> nn.Module:
    return nn.Sequential(conv_bn(1, 16), conv_bn(16, 32, stride=2), conv_bn(32, 32, groups=32),
                         conv_bn(32, 48, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def make_resnet() -> nn.Module:
    return nn.Sequential(conv_bn(1, 16), BasicBlock(16), nn.Sequential(conv_bn(16, 32, stride=2)),
                         BasicBlock(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_mobilenet_like() -> nn.Module:
    return nn.Sequential(conv_bn(1, 16, act=nn.ReLU6), InvertedResidual(16),
                         conv_bn(16, 24, stride=2, act=nn.ReLU6), InvertedResidual(24),
                         InvertedResidual(24), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(24, 10))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.ReLU(), nn.Linear(64, 10))


FACTORIES = {"cnn": make_cnn, "resnet": make_resnet, "mobilenet_like": make_mobilenet_like,
             "mlp": make_mlp}


@functools.lru_cache(maxsize=None)
def _trained_state(name: str, epochs: int = 8):
    torch.manual_seed(0)
    model = FACTORIES[name]()
    train_x, train_y, _, _ = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(name: str) -> nn.Module:
    """A fresh copy of the trained model ``name`` in eval mode."""
    model = FACTORIES[name]()
    model.load_state_dict(_trained_state(name))
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def calibration_batches(count: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
    """Unlabelled batches from the training split."""
    train_x = digits()[0]
    return [train_x[i * batch_size:(i + 1) * batch_size] for i in range(count)]
