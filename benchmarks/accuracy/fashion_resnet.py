"""A small BatchNorm ResNet for Fashion-MNIST, its training, and its cached weights.

    python benchmarks/accuracy/fashion_resnet.py [--epochs 4]     # trains, writes the weights

The architecture (about 0.5M weights): a 3x3 stem to 32 channels, then three basic residual
blocks (32 channels at 28x28, 64 at 14x14, 128 at 7x7; the two downsampling blocks carry a 1x1
projection shortcut), global average pooling and a linear classifier. Trained with AdamW and a
one-cycle schedule on the 60,000 training images (pixel / 255), seeded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from hfp8.examples.fashion_mnist import load_fashion_mnist

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_resnet.pt"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def fashion_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def images_to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return images.float().unsqueeze(1) / 255.0


def train(epochs: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    x = images_to_inputs(images)
    model = fashion_resnet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start, order = time.time(), torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            index = order[i:i + 128]
            batch = x[index]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # left-right flips
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.time() - start:.0f} s)",
              flush=True)
    return model.eval()


def trained_model(epochs: int = 4) -> nn.Module:
    """The cached trained model; trains and caches it first if needed."""
    model = fashion_resnet()
    if not WEIGHTS.is_file():
        trained = train(epochs)
        WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained.state_dict(), WEIGHTS)
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if WEIGHTS.exists():
        WEIGHTS.unlink()
    model = trained_model(args.epochs)
    images, labels = load_fashion_mnist("test")
    with torch.no_grad():
        predictions = torch.cat([model(b).argmax(1) for b in images_to_inputs(images).split(1000)])
    print(f"test accuracy: {(predictions == labels).double().mean().item():.4f}; wrote {WEIGHTS}")
