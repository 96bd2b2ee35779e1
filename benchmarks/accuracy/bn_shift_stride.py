"""How many calibration batches the BatchNorm "shift" needs: the default (BN shift + compensated
rounding + 1% float budget) with the shift measured on every batch, every 2nd (the default) and
every 4th, on the photo sets of mobilenet_v2.py and efficientnet_lite2.py.

    python benchmarks/accuracy/bn_shift_stride.py [--model mobilenet_v2|efficientnet_lite2|both]
        [--update-docs]

Prints top-1 agreement with FP32, KL(FP32 || quantized) and logit SQNR on the 256 evaluation
crops, and each row's PTQ time over one FP32 pass on the 256 calibration crops (the pass timed
right before each row; benchmarks/ptq_time.py gives the interleaved medians).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from harness import float_pass_seconds, logits_of  # noqa: E402
from photos import photo_crops  # noqa: E402
from ptq_time import load  # noqa: E402  (the same two models at the same input sizes)
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402

import hfp8  # noqa: E402
from hfp8.ptq.evaluation import fidelity  # noqa: E402

STRIDES = (1, 2, 4)
TITLES = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite2": "EfficientNet-Lite2"}
ROW_LABELS = {1: "every batch (256 crops), `bn_shift_stride=1`",
              2: "**every 2nd batch (128 crops), default**", 4: "every 4th batch (64 crops)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=("mobilenet_v2", "efficientnet_lite2", "both"))
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cells: dict = {}
    for name in (("mobilenet_v2", "efficientnet_lite2") if args.model == "both" else (args.model,)):
        model, size = load(name)
        calibration = list(photo_crops("calibration", 256, seed=0, size=size).split(32))
        evaluation = list(photo_crops("evaluation", 256, seed=1, size=size).split(32))
        reference = logits_of(model, evaluation)
        print(f"{name}: default config, BN shift measured on every k-th of 8 calibration batches")
        for stride in STRIDES:
            unit = float_pass_seconds(model, calibration)
            start = time.perf_counter()
            qmodel = hfp8.quantize_model(model, calibration, hfp8.QuantConfig(bn_shift_stride=stride),
                                         quiet=True)
            seconds = time.perf_counter() - start
            measured = fidelity(reference, logits_of(qmodel, evaluation))
            report = hfp8.manifest(qmodel)["batchnorm"]
            print(f"  k={stride} (shift from {report['measured_samples']:3d} samples)  agreement "
                  f"{measured['top1_agreement']:.3f}  KL {measured['kl']:.4f}  SQNR "
                  f"{measured['sqnr_db']:.2f} dB  PTQ {seconds:5.1f} s ({seconds / unit:.2f}x)",
                  flush=True)
            cell = (f"{measured['top1_agreement']:.3f} / {measured['kl']:.4f} / "
                    f"{measured['sqnr_db']:.2f} dB")
            cells.setdefault(stride, []).append(f"**{cell}**" if stride == 2 else cell)
    if args.update_docs:
        models = ("mobilenet_v2", "efficientnet_lite2") if args.model == "both" else (args.model,)
        write_section("bn-shift-stride", markdown_table(
            ["shift measured on", *(TITLES[m] for m in models)],
            [[ROW_LABELS[stride], *cells[stride]] for stride in STRIDES]), command_line())


if __name__ == "__main__":
    main()
