"""What export and verification cost beside torch's own exporter, side by side in one process.

    python benchmarks/export_time.py [--model mobilenet_v2|decoder-10M|...] [--repeats 3]
        [--verify-batches 2] [--update-docs]

Per model: ``torch.onnx.export(dynamo=True)`` of the float model (the unit), then
``hfp8.export_onnx`` of the quantized model, then ``hfp8.verify_onnx`` on ``--verify-batches``
calibration batches (pairs, layer replay, whole model), interleaved, median of ``--repeats``;
each as a ratio to the unit. Also ``hfp8.export_onnx`` of the float model: the same export
with a dynamic batch (torch's exporter then reasons with symbolic shapes), as a second unit.
Also the peak resident memory of the process. 2 threads.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402


def load(name: str):
    """(float model, calibration batches, example input) of ``name``."""
    if name == "mobilenet_v2":
        from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
        from photos import photo_crops

        model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
        batches = list(photo_crops("calibration", 64, seed=0).split(16))
        return model, batches, batches[0][:1]
    from decoder import decoder, token_batches

    model = decoder(name.removeprefix("decoder-"))
    batches = token_batches(4, 4)
    return model, batches, batches[0][:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "decoder-10M"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify-batches", type=int, default=2)
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        model, batches, example = load(name)
        qmodel = hfp8.quantize_model(model, batches, quiet=True)
        times: dict = {"torch": [], "export": [], "verify": [], "float_dynamic": []}
        with tempfile.TemporaryDirectory() as folder:
            plain, ours = os.path.join(folder, "plain.onnx"), os.path.join(folder, "q.onnx")
            for _ in range(args.repeats):
                start = time.perf_counter()
                torch.onnx.export(model, (example,), plain, dynamo=True, verbose=False)
                times["torch"].append(time.perf_counter() - start)
                start = time.perf_counter()
                hfp8.export_onnx(qmodel, ours, example)
                times["export"].append(time.perf_counter() - start)
                start = time.perf_counter()
                report = hfp8.verify_onnx(qmodel, ours, batches[:args.verify_batches],
                                          reference=model, quiet=True)
                times["verify"].append(time.perf_counter() - start)
                # the same job for the float model: export_onnx keeps the batch dimension
                # (and an integer input's every dimension) dynamic, which costs torch's
                # exporter symbolic shapes that the static export above does not pay
                start = time.perf_counter()
                hfp8.export_onnx(model, plain, example)
                times["float_dynamic"].append(time.perf_counter() - start)
        median = {key: statistics.median(values) for key, values in times.items()}
        unit = median["torch"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        from hfp8.export.verify import passed

        print(f"{name}: torch.onnx.export {unit:.1f} s; export_onnx {median['export']:.1f} s "
              f"({median['export'] / unit:.2f}x); verify_onnx {median['verify']:.1f} s "
              f"({median['verify'] / unit:.2f}x, {'passed' if passed(report) else 'FAILED'}); "
              f"together {(median['export'] + median['verify']) / unit:.2f}x; export_onnx of "
              f"the float model {median['float_dynamic']:.1f} s; process peak {peak:.2f} GiB",
              flush=True)
        dynamic = median["float_dynamic"]
        rows.append([name, f"{unit:.1f} s", f"{median['export'] / unit:.2f}x",
                     f"{median['verify'] / unit:.2f}x",
                     f"**{(median['export'] + median['verify']) / unit:.2f}x**",
                     f"{dynamic:.1f} s", f"{median['export'] / dynamic:.2f}x",
                     f"{(median['export'] + median['verify']) / dynamic:.2f}x",
                     "passed" if passed(report) else "FAILED"])
    table = markdown_table(["model", "torch.onnx.export (float)", "export_onnx / it",
                            f"verify_onnx ({args.verify_batches} batches) / it",
                            "export + verify / it", "export_onnx of the float model (dynamic batch)",
                            "export_onnx / that", "export + verify / that", "verification"], rows)
    print(table)
    if args.update_docs:
        write_section("export-time", table, command_line())


if __name__ == "__main__":
    main()
