"""HFP8 fine-tuning after PTQ on ImageNet MobileNetV2: distilled on the calibration crops only,
judged on the disjoint evaluation crops (the photo sets of benchmarks/accuracy/mobilenet_v2.py).

    python benchmarks/training/finetune_mobilenet_v2.py [--epochs 3] [--lr 1e-5]

Rows, one run: INT8 per-channel (max), PTQ (the default E4M3 configuration), PTQ then HFP8
fine-tuning (1-4-3 forward, 1-5-2 backward, distillation from the float model, BatchNorm
frozen). Top-1 agreement with FP32, KL(FP32 || quantized), logit SQNR, and wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "accuracy")]

import hfp8  # noqa: E402
from hfp8.evaluation import compare_outputs  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402
from hfp8.training import finetune  # noqa: E402
from int8_baseline import int8_quantize_model  # noqa: E402
from photos import benchmark_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    calibration, evaluation = benchmark_batches(256, 256, 32)
    rows = []

    def measure(label, build):
        start = time.perf_counter()
        built = build()
        seconds = time.perf_counter() - start
        result = compare_outputs(model, built, evaluation)["outputs"]["output"]
        rows.append((label, result["top1_agreement"], result["kl"], result["sqnr_db"], seconds))
        print(f"{label:48s} agreement {result['top1_agreement']:.4f}  KL {result['kl']:.4f}  "
              f"SQNR {result['sqnr_db']:.2f} dB  {seconds:.1f} s", flush=True)
        return built

    measure("INT8 per-channel (max)", lambda: int8_quantize_model(model, calibration,
                                                                  hfp8.QuantConfig(), True))
    qmodel = measure("E4M3 PTQ (default)", lambda: hfp8.quantize_model(model, calibration, quiet=True))
    tuned = measure(f"E4M3 PTQ + HFP8 fine-tune ({args.epochs} epochs, lr {args.lr:g})",
                    lambda: finetune(qmodel, model, calibration, epochs=args.epochs, lr=args.lr,
                                     quiet=True))
    report = tuned.hfp8_report["training"]
    print(f"fine-tune: {report['steps']} steps ({report['skipped_steps']} skipped), distillation "
          f"loss {report['loss_before']:.4f} -> {report['loss_after']:.4f} on the calibration crops")
    agreement = rows[-1][1]
    print(f"goal: agreement >= 0.90 after fine-tuning: {agreement:.3f} -> "
          f"{'met' if agreement >= 0.90 else 'missed'}")


if __name__ == "__main__":
    main()
