"""Does the one-pass sensitivity estimate rank layers as quantizing each layer alone does?

    python benchmarks/sensitivity_ranking.py [--model mobilenet_v2|efficientnet_lite2]

For every layer the default configuration quantizes: the measured output noise-to-signal ratio
(NSR) with only that layer quantized (its FP8 weight and input rounding, all others float, the
float model's BatchNorm statistics), on the evaluation crops, beside the first-order estimate of
hfp8.ptq.sensitivity (one forward and one backward pass on one calibration batch). Prints the
Spearman rank correlation, how many of the measured top 5 / top 10 the estimate also puts in its
top 5 / top 10, and the time of each, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402
from hfp8.data.model_io import call_model, output_leaves  # noqa: E402
from hfp8.ptq.quantizers import quantized_layers  # noqa: E402
from hfp8.ptq.sensitivity import layer_sensitivity  # noqa: E402
from photos import photo_crops  # noqa: E402


def load(name):
    if name == "mobilenet_v2":
        from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
        model = mobilenet_v2()
        model.load_state_dict(torch.load(imagenet_mobilenet_v2_weights_path(), weights_only=True))
        return model.eval(), 224
    import real_models
    return real_models.load_efficientnet_lite2(), 260


@torch.no_grad()
def measured_nsr(model, qmodel, names, batches) -> dict[str, float]:
    reference = [[t.double() for _, t in output_leaves(call_model(model, b))] for b in batches]
    result = {}
    for name in names:
        alone = copy.deepcopy(model)
        layer = qmodel.get_submodule(name)
        alone.get_submodule(name).register_forward_hook(lambda m, args, out, layer=layer: layer(*args))
        noise = signal = 0.0
        for batch, wanted in zip(batches, reference):
            for got, want in zip(output_leaves(call_model(alone, batch)), wanted):
                noise += float((got[1].double() - want).square().sum() / want.square().mean())
                signal += want.numel()
        result[name] = noise / signal
    return result


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda values: {i: r for r, i in enumerate(sorted(range(len(values)), key=values.__getitem__))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=("mobilenet_v2", "efficientnet_lite2"))
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--evaluation", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, size = load(args.model)
    calibration = list(photo_crops("calibration", args.calibration, seed=0, size=size).split(32))
    evaluation = list(photo_crops("evaluation", args.evaluation, seed=1, size=size).split(32))
    config = hfp8.QuantConfig(bn_recalibration="none", float_budget=0.0)
    qmodel = hfp8.quantize_model(model, calibration, config, quiet=True)
    names = list(quantized_layers(qmodel))
    start = time.perf_counter()
    estimate = layer_sensitivity(model, qmodel, names, calibration, num_batches=1)
    estimate_seconds = time.perf_counter() - start
    start = time.perf_counter()
    measured = measured_nsr(model, qmodel, names, evaluation)
    measured_seconds = time.perf_counter() - start
    rho = spearman([estimate[n] for n in names], [measured[n] for n in names])
    top = lambda values, k: set(sorted(values, key=values.get, reverse=True)[:k])  # noqa: E731
    print(f"{args.model}: {len(names)} layers; Spearman rank correlation {rho:.3f}; top-5 "
          f"overlap {len(top(estimate, 5) & top(measured, 5))}/5, top-10 overlap "
          f"{len(top(estimate, 10) & top(measured, 10))}/10; estimate {estimate_seconds:.1f} s "
          f"(1 batch of 32), measured {measured_seconds:.1f} s ({args.evaluation} crops, one "
          f"pass per layer)")
    print("| layer | measured SQNR dB (alone) | estimated SQNR dB |")
    print("|---|---|---|")
    for name in sorted(names, key=measured.get, reverse=True)[:12]:
        print(f"| {name} | {-10 * math.log10(measured[name]):.1f} | "
              f"{-10 * math.log10(max(estimate[name], 1e-30)):.1f} |")


if __name__ == "__main__":
    main()
