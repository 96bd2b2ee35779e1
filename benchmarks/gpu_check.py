"""The GPU path, end to end, in one short run for a lent GPU machine (see the `device` tool).

    python benchmarks/gpu_check.py [--device cuda] [--sizes 150M] [--skip-onnx]

1. PTQ on the device: MobileNetV2 (256 photo crops) and the decoders of ``--sizes`` (8 batches
   of 4 x 128 tokens), each as a ratio to one FP16 forward pass over the same batches on the
   same device (and to FP32); peak device memory.
2. The exported MobileNetV2 file in onnxruntime's CUDA provider (and TensorRT's, if it
   loads), against the float model exported the same way and run in FP16 by PyTorch: latency
   at batch 1 and 32, and whether verification passes there.

It prints one line per measurement and a JSON summary. ``--device cpu`` runs the same code on
the CPU (a smoke test of the script, not a measurement of anything GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _pass_seconds(model, batches, device, dtype=None) -> float:
    """Median of 3 passes over ``batches`` (after one warm-up)."""
    def one() -> float:
        _synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(batch)
        _synchronize(device)
        return time.perf_counter() - start
    one()
    return statistics.median(one() for _ in range(3))


def ptq(name, model, batches, device) -> dict:
    model = model.to(device)
    batches = [b.to(device) for b in batches]
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    fp16, fp32 = _pass_seconds(model, batches, device, half), _pass_seconds(model, batches, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    qmodel = hfp8.quantize_model(model, batches, quiet=True)
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {"model": name, "ptq_seconds": seconds, "vs_fp16_pass": seconds / fp16,
              "vs_fp32_pass": seconds / fp32, "peak_device_bytes": peak}
    print(f"{name}: PTQ {seconds:.1f} s = {seconds / fp16:.1f}x an FP16 pass, "
          f"{seconds / fp32:.1f}x an FP32 pass" + (f"; peak {peak / 2**30:.2f} GiB" if peak else ""),
          flush=True)
    return result | {"qmodel": qmodel.cpu(), "float": model.cpu()}


def onnx_check(qmodel, model, batches) -> list[dict]:
    import onnxruntime

    from hfp8.export.verify import passed

    results = []
    providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                 if p in onnxruntime.get_available_providers()] or ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as folder:
        qpath, fpath = f"{folder}/q.onnx", f"{folder}/float.onnx"
        hfp8.export_onnx(qmodel, qpath, batches[0][:1])
        hfp8.export_onnx(model, fpath, batches[0][:1])
        report = hfp8.verify_onnx(qmodel, qpath, batches[:2], reference=model, quiet=True)
        print(f"verification (CPU session): {'passed' if passed(report) else 'FAILED'}")
        for provider in providers:
            for batch in (1, 32):
                x = {"input": torch.cat(batches)[:batch].numpy()}
                row = {"provider": provider, "batch": batch}
                for label, path in (("qdq", qpath), ("float", fpath)):
                    try:
                        session = onnxruntime.InferenceSession(path, providers=[provider])
                        name = session.get_inputs()[0].name
                        for _ in range(5):
                            session.run(None, {name: x["input"]})
                        times = []
                        for _ in range(30):
                            start = time.perf_counter()
                            session.run(None, {name: x["input"]})
                            times.append(time.perf_counter() - start)
                        row[f"{label}_ms"] = statistics.median(times) * 1e3
                    except Exception as error:  # noqa: BLE001 - a provider may refuse FP8
                        row[f"{label}_error"] = f"{type(error).__name__}: {error}"[:200]
                print(json.dumps(row), flush=True)
                results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", default=["150M"])
    parser.add_argument("--skip-onnx", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (run it on a lent GPU machine, "
                         "or pass --device cpu for a smoke test)")
    from decoder import decoder, token_batches
    from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
    from photos import photo_crops

    crops = list(photo_crops("calibration", 256, seed=0).split(32))
    summary = [ptq("MobileNetV2", mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval(),
                   crops, device)]
    for size in args.sizes:
        summary.append(ptq(f"decoder {size}", decoder(size), token_batches(), device))
    onnx_rows = [] if args.skip_onnx else onnx_check(summary[0]["qmodel"], summary[0]["float"],
                                                      crops)
    print(json.dumps({"device": str(device), "ptq": [
        {k: v for k, v in row.items() if k not in ("qmodel", "float")} for row in summary],
        "onnx": onnx_rows}, indent=1))


if __name__ == "__main__":
    main()
