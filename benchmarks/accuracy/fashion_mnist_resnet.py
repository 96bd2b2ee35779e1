"""Fashion-MNIST BN ResNet: top-1 on all 10,000 test images for FP32, INT8, E5M2, the E4M3
variants, the exported ONNX file and the peer toolkits, side by side in one run. Beside top-1:
agreement with FP32, KL(FP32 || quantized) and logit SQNR (dB; 999 means identical).

    apt-get install dataset-fashion-mnist
    python benchmarks/accuracy/fashion_mnist_resnet.py [--calibration 512] [--no-peers]

Trains the model first if benchmarks/accuracy/weights/fashion_resnet.pt is missing (about 5
minutes on 2 cores). Calibration: a seeded random subset of the training images. Writes
results/fashion_mnist_resnet.json and .png beside this file.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from fashion_resnet import images_to_inputs, trained_model  # noqa: E402
from results_doc import add_update_flag  # noqa: E402
from harness import DEFAULT, logits_of, run, standard_rows, write_outputs  # noqa: E402

from hfp8.ptq.evaluation import fidelity  # noqa: E402
from hfp8.examples.fashion_mnist import load_fashion_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-peers", action="store_true", help="skip Brevitas and ModelOpt")
    add_update_flag(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = trained_model()
    train_images, _ = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    calibration = list(images_to_inputs(train_images[pick[:args.calibration]]).split(args.batch_size))
    evaluation = list(images_to_inputs(test_images).split(500))

    reference = logits_of(model, evaluation)

    def evaluate(built) -> dict:
        logits = logits_of(built, evaluation)
        measured = fidelity(reference, logits)
        return {"top1": (logits.argmax(1) == test_labels).double().mean().item(),
                "agreement": measured["top1_agreement"], "kl": measured["kl"],
                "sqnr_db": measured["sqnr_db"] if measured["sqnr_db"] != float("inf") else 999.0}

    peers = {}
    if not args.no_peers:
        from peers import PEERS, hfp8_float_layers

        exclude = hfp8_float_layers(model, calibration[0])  # the same layer set as hfp8's default
        peers = {name: (lambda m, c, f=function: f(m, c, exclude=exclude))
                 for name, function in PEERS.items()}
    print(f"Fashion-MNIST BN ResNet, {args.calibration} calibration images, 10,000 test images, "
          f"{torch.get_num_threads()} threads")
    results = run(standard_rows(), model, calibration, evaluate, peers)
    by_label = {r["label"]: r for r in results}
    fp32 = by_label["FP32"]["top1"]
    best = by_label[DEFAULT]["top1"]
    int8 = by_label["INT8 per-tensor (max)"]["top1"]
    print(f"goal: E4M3 + BN within 0.2 points of FP32: {100 * (best - fp32):+.2f} points -> "
          f"{'met' if best >= fp32 - 0.002 else 'missed'}; at least INT8 per-tensor "
          f"({100 * (best - int8):+.2f} points) -> {'met' if best >= int8 else 'missed'}")
    write_outputs(results, "fashion_mnist_resnet", "Fashion-MNIST BN ResNet: top-1 (10,000 "
                  "test images)", "top1", os.path.join(HERE, "results"), args.update_docs)


if __name__ == "__main__":
    main()
