"""The paper's central comparison, in small: the same model trained from scratch four ways.

    python benchmarks/training/compare.py [--task resnet|mobilenet|transformer|all] [--epochs N]

Rows, same seed, same data order, same steps and schedule:

* FP32;
* HFP8: 1-4-3 forward (weights, layer inputs, attention operands), 1-5-2 backward (gradients
  into and out of every quantized layer), first and last layers in higher precision;
* 1-5-2 everywhere (forward too);
* 1-4-3 everywhere (backward too).

Tasks: (a) the Fashion-MNIST BN ResNet of benchmarks/accuracy/fashion_resnet.py, (b) a
MobileNet-style depthwise CNN on Fashion-MNIST, (c) a character-level Transformer language model
on the text of the Python standard library's docstrings (held-out 10% for perplexity). Writes
benchmarks/training/results/<task>.json and a curve PNG per task, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "accuracy"), str(HERE.parent / "gallery")]

import hfp8  # noqa: E402
from hfp8.training import TrainingConfig, finish_training, prepare_training  # noqa: E402
from plotting import plot_loss_curves  # noqa: E402
from results_doc import add_update_flag, render_compare, write_section  # noqa: E402
from tasks import TASKS  # noqa: E402

VARIANTS = {
    "FP32": None,
    "HFP8 (1-4-3 fwd, 1-5-2 bwd)": TrainingConfig(),
    "1-5-2 everywhere": TrainingConfig(forward_format=hfp8.E5M2, backward_format=hfp8.E5M2),
    "1-4-3 everywhere": TrainingConfig(forward_format=hfp8.E4M3, backward_format=hfp8.E4M3),
}


def train_one(task, config, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = task.build()
    data = task.train_batches(seed)
    example = data[0][0]
    if config is None:
        trained, training = model, None
    else:
        trained, training = prepare_training(model, example, config)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    steps = epochs * len(data)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=task.lr, total_steps=steps)
    curve, start = [], time.perf_counter()
    trained.train()
    for epoch in range(epochs):
        for index, (inputs, targets) in enumerate(task.train_batches(seed + epoch)):
            loss = task.loss(trained(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            applied = training.step(optimizer) if training is not None else (optimizer.step() or True)
            schedule.step()
            if index % task.log_every == 0:
                curve.append({"step": epoch * len(data) + index, "loss": loss.item(),
                              "applied": bool(applied)})
        curve[-1]["eval"] = task.evaluate(trained)
        print(f"    epoch {epoch + 1}: {task.metric} {curve[-1]['eval']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    if training is not None:  # the deployable model: weights on their grids, biases fixed
        skipped = training.skipped
        trained = finish_training(training, [inputs for inputs, _ in data[:8]])
    result = {"metric": task.metric, "final": task.evaluate(trained), "curve": curve,
              "seconds": seconds}
    if training is not None:
        result["skipped_steps"] = skipped
    return result


def plot(task_name: str, results: dict, folder: Path) -> None:
    series = {f"{label}: {result['metric']} {result['final']:.4g}": result["curve"]
              for label, result in results.items()}
    plot_loss_curves(series, folder / f"{task_name}.png",
                     f"{task_name}: same seed, data order and schedule",
                     ylabel="training loss (moving average)", window=5, log_scale=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"])
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = HERE / "results"
    folder.mkdir(exist_ok=True)
    for name in (TASKS if args.task == "all" else [args.task]):
        task = TASKS[name]()
        epochs = args.epochs or task.epochs
        print(f"{name}: {task.description}, {epochs} epochs of {len(task.train_batches(0))} steps")
        results = {}
        for label, config in VARIANTS.items():
            print(f"  {label}", flush=True)
            results[label] = train_one(task, config, epochs)
        (folder / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(name, results, folder)
        fp32 = results["FP32"]["final"]
        print(f"| {name} | " + " | ".join(
            f"{r['final']:.4f}" + (f" ({r['skipped_steps']} skipped)" if r.get("skipped_steps") else "")
            for r in results.values()) + " |")
        delta = results["HFP8 (1-4-3 fwd, 1-5-2 bwd)"]["final"] - fp32
        if task.metric == "perplexity":
            print(f"goal: HFP8 within 2% of FP32 perplexity: {100 * delta / fp32:+.2f}% -> "
                  f"{'met' if delta <= 0.02 * fp32 else 'missed'}")
        else:
            print(f"goal: HFP8 within 0.5 points of FP32 accuracy: {100 * delta:+.2f} points -> "
                  f"{'met' if delta >= -0.005 else 'missed'}")
    if args.update_docs:  # the table holds every task: those not run here keep their stored JSON
        write_section("training-compare", render_compare())


if __name__ == "__main__":
    main()
