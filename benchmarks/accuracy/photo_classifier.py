"""Shared by the ImageNet-classifier accuracy scripts (MobileNetV2, EfficientNet-Lite2): the same
disjoint photo crops, the rows of harness.py, INT8 and the peers in one run, and the goals of
the FP8-fidelity issue checked and printed.

Calibration and evaluation crops come from disjoint photos (benchmarks/photos.py). No ImageNet
labels exist offline: top-1 agreement with FP32, KL(FP32 || quantized) in nats, logit SQNR (dB).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from results_doc import add_update_flag  # noqa: E402
from harness import DEFAULT, C, logits_of, run, standard_rows, write_outputs  # noqa: E402
from photos import photo_crops  # noqa: E402

import hfp8  # noqa: E402
from hfp8.ptq.evaluation import fidelity  # noqa: E402


def _float_share(model, calibration) -> float:
    """Share of the Conv/Linear weights the default keeps in float (first/last and budget)."""
    qmodel = hfp8.quantize_model(model, calibration, C(), quiet=True)
    manifest = hfp8.manifest(qmodel)
    weights = {n: m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    floating = sum(weights[layer["name"]] for layer in manifest["layers"] if layer["status"] == "float")
    budget = sum(weights[entry["name"]] for entry in manifest["sensitivity"] if entry["float"])
    print(f"default keeps {100 * floating / sum(weights.values()):.1f}% of the weights float "
          f"({100 * budget / sum(weights.values()):.2f}% by the sensitivity budget, the rest "
          f"first/last layers): {[e['name'] for e in manifest['sensitivity'] if e['float']]}")
    return budget / sum(weights.values())


def main(name: str, title: str, model: torch.nn.Module, size: int, extra=()) -> None:
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--evaluation", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-peers", action="store_true", help="skip Brevitas and ModelOpt")
    add_update_flag(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    calibration = list(photo_crops("calibration", args.calibration, seed=0, size=size).split(args.batch_size))
    evaluation = list(photo_crops("evaluation", args.evaluation, seed=1, size=size).split(args.batch_size))
    reference = logits_of(model, evaluation)

    def evaluate(built) -> dict:
        measured = fidelity(reference, logits_of(built, evaluation))
        return {"agreement": measured["top1_agreement"], "kl": measured["kl"],
                "sqnr_db": measured["sqnr_db"]}

    peers = {}
    if not args.no_peers:
        from peers import PEERS, hfp8_float_layers

        exclude = hfp8_float_layers(model, calibration[0])
        peers = {peer: (lambda m, c, f=function: f(m, c, exclude=exclude))
                 for peer, function in PEERS.items()}
    print(f"{title}, {args.calibration} calibration crops, {args.evaluation} evaluation crops "
          f"(disjoint photos), {size}x{size}, {torch.get_num_threads()} threads")
    results = run(standard_rows(tuple(extra)), model, calibration, evaluate, peers)
    by_label = {r["label"]: r for r in results}
    best = by_label[DEFAULT]
    for other in ["INT8 per-channel (max)", "INT8 per-tensor (max)", "E4M3 + mse + BN re-est. shift",
                  *[f"peer: {peer}" for peer in peers]]:
        if "agreement" not in by_label.get(other, {}):
            print(f"goal vs {other}: not measured")
            continue
        row = by_label[other]
        met = best["agreement"] >= row["agreement"] and best["kl"] <= row["kl"]
        print(f"goal: default at least {other} (agreement {best['agreement']:.3f} vs "
              f"{row['agreement']:.3f}, KL {best['kl']:.3f} vs {row['kl']:.3f}) -> "
              f"{'met' if met else 'missed'}")
    share = _float_share(model, calibration)
    print(f"goal: at most 5% of the weights kept float by the default budget: {100 * share:.2f}% -> "
          f"{'met' if share <= 0.05 else 'missed'}")
    ratio = best["time_vs_float_pass"]
    print(f"goal: PTQ time at most 4x one float pass over the calibration set: {ratio:.2f}x -> "
          f"{'met' if ratio <= 4 else 'missed'}")
    write_outputs(results, name, f"{title}: top-1 agreement with FP32 ({args.evaluation} crops)",
                  "agreement", os.path.join(HERE, "results"), args.update_docs)
