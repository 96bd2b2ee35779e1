"""The per-layer picture of the default E4M3 MobileNetV2 (what ``hfp8-ptq inspect --plot`` draws).

    python benchmarks/accuracy/layer_plot.py

Quantizes torchvision's MobileNetV2 weights on the 256 calibration crops of the fidelity table
with the default configuration, prints the layers kept in float and why, and writes
benchmarks/accuracy/results/mobilenet_v2_layers.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import hfp8  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402
from hfp8.ptq.plot import plot_manifest  # noqa: E402
from photos import photo_crops  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    calibration = list(photo_crops("calibration", 256, seed=0).split(32))  # as benchmark_batches
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    data = hfp8.manifest(qmodel)
    layers = data["layers"]
    total = sum(model.get_submodule(layer["name"]).weight.numel() for layer in layers)
    floating = [layer for layer in layers if layer["status"] == "float"]
    kept = sum(model.get_submodule(layer["name"]).weight.numel() for layer in floating)
    print(f"{len(layers) - len(floating)} of {len(layers)} layers quantized; "
          f"{kept / total:.1%} of the weights float")
    for layer in floating:
        print(f"  float: {layer['name']:24s} {model.get_submodule(layer['name']).weight.numel():9,d} "
              f"weights  {layer['reason']}")
    out = HERE / "results" / "mobilenet_v2_layers.png"
    out.parent.mkdir(exist_ok=True)
    plot_manifest(data, out, title="MobileNetV2, E4M3 default (256 calibration crops)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
