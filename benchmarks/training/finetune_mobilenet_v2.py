"""HFP8 fine-tuning after PTQ on ImageNet MobileNetV2: distilled on the calibration crops only,
judged on the disjoint evaluation crops (the photo sets of benchmarks/accuracy/mobilenet_v2.py).

    python benchmarks/training/finetune_mobilenet_v2.py [--epochs 3] [--lr 1e-5] [--seeds 3]
        [--augment] [--schedule cosine|constant]

Rows, one run: INT8 per-channel (max), PTQ (the default E4M3 configuration), then PTQ + HFP8
fine-tuning (1-4-3 forward, 1-5-2 backward, distillation from the float model, BatchNorm
frozen, every 4th calibration batch held out to pick the epoch) once per seed (the seed drives
the augmentation's views; without --augment the runs are identical). Top-1 agreement with FP32, KL(FP32 || quantized), logit SQNR, wall
time; then the mean and spread (min..max) over seeds, and KL as a multiple of PTQ's.
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
from hfp8.ptq.evaluation import compare_outputs  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402
from hfp8.training import TrainingConfig, finetune  # noqa: E402
from int8_baseline import int8_quantize_model  # noqa: E402
from photos import benchmark_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
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
    tuned_rows = []
    for seed in range(args.seeds):
        label = (f"E4M3 PTQ + HFP8 fine-tune (seed {seed}, {args.epochs} ep, lr {args.lr:g}, "
                 f"{args.schedule}{', augmented' if args.augment else ''})")
        tuned = measure(label, lambda seed=seed: finetune(
            qmodel, model, calibration, epochs=args.epochs, lr=args.lr, quiet=True,
            augment=args.augment, schedule=args.schedule,
            config=TrainingConfig(seed=seed)))
        tuned_rows.append(rows[-1])
        report = tuned.hfp8_report.training
        held = report["held_out"]
        print(f"  held-out distillation loss {held['loss_before']:.4f} -> "
              + ", ".join(f"{e['loss']:.4f}" for e in held["epochs"])
              + f"; kept {held['kept']} (epoch {held['epoch']}); {report['steps']} steps "
              f"({report['skipped_steps']} skipped)", flush=True)
    ptq_kl = rows[1][2]
    for column, name in ((1, "agreement"), (2, "KL"), (3, "SQNR dB")):
        values = [row[column] for row in tuned_rows]
        print(f"over {len(values)} seeds: {name} mean {sum(values) / len(values):.4f} "
              f"(min {min(values):.4f}, max {max(values):.4f})")
    ratios = [row[2] / ptq_kl for row in tuned_rows]
    agreement = sum(row[1] for row in tuned_rows) / len(tuned_rows)
    print("KL / PTQ KL: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"goal: agreement >= 0.90 and KL <= 0.8x PTQ's: mean agreement {agreement:.3f}, "
          f"KL ratio {sum(ratios) / len(ratios):.3f} -> "
          f"{'met' if agreement >= 0.90 and max(ratios) <= 0.8 else 'missed'}")


if __name__ == "__main__":
    main()
