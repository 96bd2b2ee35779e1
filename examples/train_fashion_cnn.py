"""Train the built-in example model and write its data folder (weights + sample folders).

    apt-get install dataset-fashion-mnist
    python examples/train_fashion_cnn.py [--epochs 4] [--out hfp8/examples/fashion_cnn_data]

Seeded and deterministic on one machine. Writes model.pt (state dict), calibration/*.png (128
training images) and test/<class>/*.png (50 test images per class), and prints test accuracy
on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from hfp8.examples.fashion_cnn import CLASS_NAMES, fashion_cnn
from hfp8.examples.fashion_mnist import load_fashion_mnist


def train(model, images, labels, epochs, seed):
    torch.manual_seed(seed)
    x = images.float().unsqueeze(1) / 255.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start, order = time.time(), torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            index = order[i:i + 128]
            loss = nn.functional.cross_entropy(model(x[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    x = images.float().unsqueeze(1) / 255.0
    predictions = torch.cat([model(b).argmax(1) for b in x.split(1000)])
    return (predictions == labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "hfp8" /
                                             "examples" / "fashion_cnn_data"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    model = train(fashion_cnn(), train_images, train_labels, args.epochs, args.seed)
    print(f"test accuracy (10,000 images): {accuracy(model, test_images, test_labels):.4f}")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "calibration").mkdir(parents=True)
    torch.save(model.state_dict(), out / "model.pt")
    picks = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:128]
    for i in picks.tolist():
        Image.fromarray(train_images[i].numpy()).save(out / "calibration" / f"train-{i:05d}.png")
    for label, name in enumerate(CLASS_NAMES):
        folder = out / "test" / f"{label}-{name}"
        folder.mkdir(parents=True)
        for i in (test_labels == label).nonzero().flatten()[:50].tolist():
            Image.fromarray(test_images[i].numpy()).save(folder / f"test-{i:05d}.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
