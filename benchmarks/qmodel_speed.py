"""The quantized model's forward pass in PyTorch against the float model's, side by side.

    python benchmarks/qmodel_speed.py [--batches 1 16] [--runs 30] [--update-docs]

MobileNetV2 (ImageNet weights, 224x224) and the 10M-parameter decoder (4 x 128 tokens per
batch unit): the float model and its default quantization (``hfp8.quantize_model``) run on the
same input, interleaved, after warm-up; median of ``--runs``. 2 threads; glibc's allocator at
its defaults (this machine's page-fault behaviour moves a MobileNetV2 forward by 2-4x from
run to run, hence the interleaving and the medians).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402


def models():
    from decoder import decoder, token_batches
    from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
    from photos import photo_crops

    crops = photo_crops("calibration", 64, seed=0)
    yield ("MobileNetV2", mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval(),
           list(crops.split(16)), lambda batch: crops[:batch])
    tokens = token_batches(4, 4)
    yield "decoder 10M", decoder("10M"), tokens, lambda batch: torch.cat(tokens)[:batch]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--runs", type=int, default=30)
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, model, calibration, example in models():
        qmodel = hfp8.quantize_model(model, calibration, quiet=True)
        for batch in args.batches:
            x = example(batch)
            times = {"float": [], "quantized": []}
            for _ in range(3):
                model(x), qmodel(x)
            for _ in range(args.runs):
                for label, net in (("float", model), ("quantized", qmodel)):
                    start = time.perf_counter()
                    net(x)
                    times[label].append(time.perf_counter() - start)
            median = {label: statistics.median(values) * 1e3 for label, values in times.items()}
            ratio = median["quantized"] / median["float"]
            print(f"{name}, batch {batch}: float {median['float']:.1f} ms, quantized "
                  f"{median['quantized']:.1f} ms, {ratio:.2f}x", flush=True)
            rows.append([name, str(batch), f"{median['float']:.1f}", f"{median['quantized']:.1f}",
                         f"**{ratio:.2f}x**"])
    table = markdown_table(["model", "batch", "float ms", "quantized ms", "quantized / float"],
                           rows)
    print(table)
    if args.update_docs:
        write_section("qmodel-speed", table, command_line())


if __name__ == "__main__":
    main()
