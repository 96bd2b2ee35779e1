"""Small models trained inside the test suite on sklearn's digits (seeded, seconds on CPU)."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from hfp8.examples.char_transformer import CharTransformer


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


class RowReader(nn.Module):
    """Reads a digit row by row (8 steps of 8 pixels): a Linear front, a two-layer
    bidirectional recurrent layer, a head on the last step's output."""

    def __init__(self, recurrent=nn.LSTM, width: int = 32) -> None:
        super().__init__()
        self.front = nn.Linear(8, width)
        self.rnn = recurrent(width, width, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        sequence, _ = self.rnn(torch.relu(self.front(x[:, 0])))
        return self.head(sequence[:, -1])


FACTORIES = {"cnn": make_cnn, "resnet": make_resnet, "mobilenet_like": make_mobilenet_like,
             "mlp": make_mlp, "lstm": lambda: RowReader(nn.LSTM), "gru": lambda: RowReader(nn.GRU),
             "rnn": lambda: RowReader(nn.RNN)}


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


# -- a small causal language model ------------------------------------------------------------
CHAR_MODULES = ("argparse", "collections", "dataclasses", "datetime", "functools", "inspect",
                "json", "logging", "pathlib", "random", "shutil", "subprocess", "textwrap",
                "threading", "typing", "unittest")


@functools.lru_cache(maxsize=1)
def char_text() -> tuple[torch.Tensor, list[str]]:
    """(character ids, alphabet) of the docstrings of some standard-library modules: real
    English text that installs with Python (deterministic for one Python version)."""
    import importlib
    import inspect

    documents = []
    for name in CHAR_MODULES:
        module = importlib.import_module(name)
        documents.append(inspect.getdoc(module) or "")
        for attribute in sorted(vars(module)):
            value = getattr(module, attribute)
            if not attribute.startswith("_") and inspect.isclass(value) and \
                    getattr(value, "__module__", None) == module.__name__:
                documents.append(inspect.getdoc(value) or "")
    text = "\n\n".join(d for d in documents if d)
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), alphabet


def CharLM(vocabulary: int) -> nn.Module:  # noqa: N802 - a model factory, named like one
    """The suite's small causal LM: hfp8's example character Transformer, width 64."""
    return CharTransformer(vocabulary, width=64)


def char_windows(split: str, count: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """``count`` random windows of ``length`` characters from the first 90% ("train") or the
    last 10% ("test") of :func:`char_text`."""
    data, _ = char_text()
    cut = int(0.9 * len(data))
    data = data[:cut] if split == "train" else data[cut:]
    starts = torch.randint(len(data) - length, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([data[s:s + length] for s in starts])


@functools.lru_cache(maxsize=1)
def _trained_char_lm_state(steps: int = 400):
    torch.manual_seed(0)
    model = CharLM(len(char_text()[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    windows = char_windows("train", steps * 32, length=33, seed=1)
    model.train()
    for batch in windows.split(32):
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_char_lm() -> nn.Module:
    """A fresh copy of the trained :class:`CharLM` (seeded; seconds on CPU), in eval mode."""
    model = CharLM(len(char_text()[1]))
    model.load_state_dict(_trained_char_lm_state())
    return model.eval()
