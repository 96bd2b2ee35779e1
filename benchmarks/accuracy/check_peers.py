"""Sanity check of the peer FP8 PTQ helpers (peers.py) on the built-in Fashion-MNIST CNN.

Runs Brevitas and ModelOpt FP8 E4M3 PTQ (each with its own default layer set, and with hfp8's
default layer set: first and last Conv/Linear kept float) and hfp8.quantize_model on the 128
calibration images, then prints top-1 on the 500 labelled test images beside the float model,
agreement / logit SQNR against the float model, the PTQ wall time, and a check that each peer
model really quantizes: every enabled quantizer's output, captured during a real forward pass,
divided by its scale lies on the E4M3FN grid (|v/s| <= 448, distance to the nearest E4M3 value
< 1e-5 relative), and the output differs from the float model's.

Needs the peer environment (benchmarks/requirements-peers.txt):

    /work/bench-venv/bin/python benchmarks/accuracy/check_peers.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hfp8  # noqa: E402
from hfp8.ptq.evaluation import collect_logits, fidelity, top1_accuracy  # noqa: E402
from hfp8.examples import example_data_dir, fashion_cnn  # noqa: E402
from peers import PEERS, hfp8_float_layers, peer_versions, quantized_layers  # noqa: E402

E4M3_MAX = 448.0


def load_images(files: list[Path]) -> torch.Tensor:
    """(N, 1, 28, 28) float32, pixel / 255."""
    return torch.stack([torch.from_numpy(
        np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0)[None] for f in files])


def example_data(batch_size: int):
    root = example_data_dir()
    model = fashion_cnn()
    model.load_state_dict(torch.load(root / "model.pt", weights_only=True))
    model.eval()
    calibration = load_images(sorted((root / "calibration").glob("*.png")))
    classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    files, labels = [], []
    for index, cls in enumerate(classes):
        for f in sorted((root / "test" / cls).glob("*.png")):
            files.append(f)
            labels.append(index)
    test = load_images(files)
    return (model, list(calibration.split(batch_size)), list(test.split(batch_size)),
            torch.tensor(labels))


# ---- "really quantizes": capture every enabled quantizer's output in a real forward ---------

def _quantizers(qmodel):
    """(label, module, scale_fn) for each enabled quantizer of a Brevitas or ModelOpt model."""
    found = []
    for name, module in qmodel.named_modules():
        for role, attr in (("weight", "weight_quant"), ("input", "input_quant")):  # Brevitas
            proxy = getattr(module, attr, None)
            if proxy is not None and getattr(proxy, "is_quant_enabled", False):
                found.append((f"{name}.{role}", proxy, proxy.scale))
        for role, attr in (("weight", "weight_quantizer"), ("input", "input_quantizer")):
            quantizer = getattr(module, attr, None)                                # ModelOpt
            if quantizer is not None and getattr(quantizer, "is_enabled", False):
                found.append((f"{name}.{role}", quantizer,
                              lambda q=quantizer: q.amax.float() / E4M3_MAX))
    return found


def _plain(value):
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value.value if hasattr(value, "value") and not isinstance(value, torch.Tensor) \
        else value


def grid_check(qmodel, batch: torch.Tensor) -> dict:
    """Every enabled quantizer output / scale on the E4M3FN grid, during one real forward."""
    quantizers = _quantizers(qmodel)
    captured, handles = {}, []
    for label, module, _ in quantizers:
        def hook(mod, args, output, label=label):
            captured.setdefault(label, _plain(output).detach())
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        qmodel(batch)
    for handle in handles:
        handle.remove()
    worst, distinct, off = 0.0, 0, []
    for label, _, scale_fn in quantizers:
        if label not in captured:
            off.append(f"{label} (not called)")
            continue
        scale = scale_fn().detach().double()
        r = captured[label].double() / scale
        nearest = r.float().to(torch.float8_e4m3fn).double()
        error = ((r - nearest).abs() / nearest.abs().clamp_min(2.0 ** -9)).max().item()
        worst = max(worst, error)
        distinct = max(distinct, nearest.unique().numel())
        if error > 1e-5 or r.abs().max().item() > E4M3_MAX * (1 + 1e-6):
            off.append(label)
    return {"quantizers": len(quantizers), "off_grid": off, "max_rel_grid_error": worst,
            "max_distinct_codes": distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, calibration, test, labels = example_data(args.batch_size)
    reference = collect_logits(model, test)
    float_layers = hfp8_float_layers(model, calibration[0])
    n_layers = len([m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)])

    rows = [{"method": "float32", "layers": "-", "top1": top1_accuracy(reference, labels),
             **fidelity(reference, reference), "seconds": float("nan"), "grid": "-"}]
    caught: list[str] = []

    def add(method, qmodel, seconds, layers, grid="-"):
        logits = collect_logits(qmodel, test)
        rows.append({"method": method, "layers": layers, "top1": top1_accuracy(logits, labels),
                     **fidelity(reference, logits), "seconds": seconds, "grid": grid})

    for label, config in (("hfp8 default (first/last float)", hfp8.QuantConfig()),
                          ("hfp8 all layers", hfp8.QuantConfig(keep_first_and_last=False))):
        start = time.perf_counter()
        qmodel = hfp8.quantize_model(model, calibration, config, quiet=True)
        seconds = time.perf_counter() - start
        n = len(hfp8.ptq.pipeline.quantized_layers(qmodel))
        add(label, qmodel, seconds, f"{n}/{n_layers}")

    details = {}
    for peer, function in PEERS.items():
        for suffix, exclude in (("all layers (peer default)", []),
                                ("first/last float (hfp8's set)", float_layers)):
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                qmodel = function(model, calibration, exclude=exclude)
            caught += [f"{peer}: {w.category.__name__}: {str(w.message)[:160]}" for w in record]
            layers = quantized_layers(qmodel)
            check = grid_check(qmodel, test[0])
            grid = ("NO QUANTIZER ENABLED" if not check["quantizers"]
                    else f"OFF GRID: {check['off_grid']}" if check["off_grid"]
                    else f"{check['quantizers']} quantizers on grid")
            compute = sum(1 for v in layers.values() if "weight" in v)
            extra = sum(1 for v in layers.values() if "weight" not in v)
            add(f"{peer} {suffix}", qmodel, qmodel.peer_ptq_seconds,
                f"{compute}/{n_layers}" + (f" +{extra} pool" if extra else ""), grid)
            details[f"{peer} {suffix}"] = {"layers": layers, "grid_check": check}

    print("versions:", peer_versions())
    print(f"{len(calibration)} calibration batches ({sum(len(b) for b in calibration)} images), "
          f"{len(labels)} test images, torch threads {args.threads}\n")
    header = (f"{'method':42s} {'quantized':>13s} {'top-1':>6s} {'agree':>6s} {'SQNR dB':>8s} "
              f"{'PTQ s':>6s}  really quantized")
    print(header)
    print("-" * len(header))
    for r in rows:
        sqnr = "inf" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.1f}"
        seconds = "-" if math.isnan(r["seconds"]) else f"{r['seconds']:.2f}"
        print(f"{r['method']:42s} {r['layers']:>13s} {r['top1']:6.4f} {r['top1_agreement']:6.3f} "
              f"{sqnr:>8s} {seconds:>6s}  {r['grid']}")
    print("\nquantized layers (format, per-tensor scale = amax / 448):")
    for method, detail in details.items():
        print(f"  {method}:")
        for name, roles in detail["layers"].items():
            print(f"    {name:6s} " + "; ".join(f"{k}: {v}" for k, v in roles.items()))
        c = detail["grid_check"]
        print(f"    grid: max relative distance to E4M3 grid {c['max_rel_grid_error']:.2e}, "
              f"at most {c['max_distinct_codes']} distinct values per tensor")
    if caught:
        print("\nwarnings raised by the peers during PTQ:")
        for line in sorted(set(caught)):
            print("  " + line)
    failures = [r["method"] for r in rows[3:] if r["grid"].startswith(("OFF", "NO "))
                or r["sqnr_db"] == math.inf]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": peer_versions(), "rows": rows, "details": details}, f,
                      indent=1, default=str)
    if failures:
        sys.exit(f"peer models that do not quantize: {failures}")


if __name__ == "__main__":
    main()
