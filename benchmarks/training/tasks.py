"""The three training tasks of compare.py: model, data, loss, metric, schedule.

(a) ``resnet``: the 0.5M-weight BN ResNet of benchmarks/accuracy/fashion_resnet.py on
    Fashion-MNIST (a seeded 30,000 of the training images with left-right flips, one epoch: the
    comparison fits the CPU budget; top-1 on the 10,000 test images);
(b) ``mobilenet``: a MobileNet-style CNN (inverted residual blocks: 1x1 expansion, 3x3
    depthwise, 1x1 projection, BatchNorm, ReLU6) on the same data;
(c) ``transformer``: a 2-layer character-level Transformer language model (causal
    scaled-dot-product attention, GELU MLP, LayerNorm) on the standard library's docstrings
    (hfp8's benchmarks/gallery/texts.py; the last 10% held out; perplexity per character).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fashion_resnet import fashion_resnet, images_to_inputs
from hfp8.examples.char_transformer import CharTransformer
from hfp8.examples.fashion_mnist import load_fashion_mnist

__all__ = ["TASKS"]


class _FashionTask:
    metric = "top-1"
    lr, weight_decay, epochs, log_every, batch_size = 3e-3, 5e-4, 1, 10, 128
    train_images = 30000  # a seeded half of the training set: the comparison, not the record

    def __init__(self) -> None:
        images, labels = load_fashion_mnist("train")
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:self.train_images]
        self.inputs, self.labels = images_to_inputs(images[keep]), labels[keep]
        test_images, self.test_labels = load_fashion_mnist("test")
        self.test_inputs = images_to_inputs(test_images)

    def train_batches(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.inputs), generator=generator)
        batches = []
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = self.inputs[index]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batches.append((torch.where(flip[:, None, None, None], batch.flip(3), batch),
                            self.labels[index]))
        return batches

    def loss(self, output, targets):
        return F.cross_entropy(output, targets)

    @torch.no_grad()
    def evaluate(self, model) -> float:
        was_training = model.training
        model.eval()
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in
                      zip(self.test_inputs.split(1000), self.test_labels.split(1000)))
        model.train(was_training)
        return correct / len(self.test_labels)


class ResNetTask(_FashionTask):
    description = "Fashion-MNIST BN ResNet (0.5M weights)"

    def build(self) -> nn.Module:
        return fashion_resnet()


class _InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


class MobileNetTask(_FashionTask):
    description = "Fashion-MNIST MobileNet-style depthwise CNN"

    def build(self) -> nn.Module:
        def down(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())
        return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                             _InvertedResidual(16), down(16, 32), _InvertedResidual(32),
                             down(32, 64), _InvertedResidual(64), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(64, 10))


class TransformerTask:
    description = "character-level Transformer LM on the standard library's docstrings"
    metric = "perplexity"
    lr, weight_decay, epochs, log_every = 2e-3, 0.01, 1, 10
    context, batch_size, steps_per_epoch = 64, 32, 500

    def __init__(self) -> None:
        from texts import stdlib_text

        text = stdlib_text()
        self.characters = sorted(set(text))
        index = {c: i for i, c in enumerate(self.characters)}
        data = torch.tensor([index[c] for c in text], dtype=torch.int64)
        split = int(0.9 * len(data))
        self.train_data, self.test_data = data[:split], data[split:]

    def build(self) -> nn.Module:
        return CharTransformer(len(self.characters), context=self.context)

    def train_batches(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(self.train_data) - self.context - 1,
                               (self.steps_per_epoch, self.batch_size), generator=generator)
        windows = [torch.stack([self.train_data[s:s + self.context + 1] for s in row]) for row in starts]
        return [(w[:, :-1], w[:, 1:]) for w in windows]

    def loss(self, output, targets):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model) -> float:
        was_training = model.training
        model.eval()
        windows = self.test_data[:(len(self.test_data) - 1) // self.context * self.context + 1]
        inputs = windows[:-1].reshape(-1, self.context)[:256]
        targets = windows[1:].reshape(-1, self.context)[:256]
        total = sum(float(self.loss(model(x), y)) * len(x)
                    for x, y in zip(inputs.split(64), targets.split(64)))
        model.train(was_training)
        return math.exp(total / len(inputs))


TASKS = {"resnet": ResNetTask, "mobilenet": MobileNetTask, "transformer": TransformerTask}
