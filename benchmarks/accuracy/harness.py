"""Shared by the accuracy scripts: the rows to compare, timing, and the JSON + PNG outputs.

Every row quantizes the same FP32 model with the same calibration batches and is evaluated on
the same evaluation batches, in one process, so the numbers compare directly. Wall times of the
PTQ step are measured in the same run; "time / ours" divides by the time of our default PTQ, and
"time / float pass" by one FP32 forward pass over the calibration set (the median of passes
timed before every row).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime
import torch
from torch import nn

import hfp8
from hfp8.ptq.evaluation import collect_logits
from int8_baseline import int8_quantize_model
from plotting import pyplot_or_none
from results_doc import render_accuracy, write_section

C = hfp8.QuantConfig


@dataclass(frozen=True)
class Row:
    label: str
    build: Callable  # (model, calibration) -> model or callable(batch) -> logits


def ours(config: hfp8.QuantConfig) -> Callable:
    return lambda model, calibration: hfp8.quantize_model(model, calibration, config, quiet=True)


def onnx_of(config: hfp8.QuantConfig) -> Callable:
    """Quantize, export to FP8 QDQ ONNX, and run the file in onnxruntime (CPU)."""
    def build(model, calibration):
        qmodel = hfp8.quantize_model(model, calibration, config, quiet=True)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "model.onnx")
        hfp8.export_onnx(qmodel, path, calibration[0][:2])
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return build


def int8(per_channel: bool) -> Callable:
    return lambda model, calibration: int8_quantize_model(model, calibration, C(), per_channel)


DEFAULT = "E4M3 default: shift + compensated + 1% float (default)"
PLAIN = dict(weight_rounding="nearest", float_budget=0.0)  # the steps before issue 11


def standard_rows(extra: tuple[Row, ...] = ()) -> list[Row]:
    """FP32, INT8, E5M2, the E4M3 steps one at a time (ablation), the ONNX file; peers after.
    Rows before the default round weights to nearest and keep no layer float, as labelled."""
    return [
        Row("FP32", lambda model, calibration: model),
        Row("INT8 per-tensor (max)", int8(False)),
        Row("INT8 per-channel (max)", int8(True)),
        Row("E5M2 + bias selection + BN shift", ours(C(weight_format=hfp8.E5M2,
                                                       activation_format=hfp8.E5M2, **PLAIN))),
        Row("E4M3 bias 7 (fixed)", ours(C(weight_bias_method="fixed", activation_bias_method="fixed",
                                          bn_recalibration="none", **PLAIN))),
        Row("E4M3 + bias selection (max)", ours(C(weight_bias_method="max",
                                                  activation_bias_method="max",
                                                  bn_recalibration="none", **PLAIN))),
        Row("E4M3 + bias selection (mse)", ours(C(bn_recalibration="none", **PLAIN))),
        Row("E4M3 + mse + BN re-est. full", ours(C(bn_recalibration="full", **PLAIN))),
        Row("E4M3 + mse + BN re-est. shift", ours(C(**PLAIN))),
        Row("  + compensated rounding", ours(C(float_budget=0.0))),
        Row("  + 1% float budget (rounding to nearest)", ours(C(weight_rounding="nearest"))),
        Row(DEFAULT, ours(C())),
        Row("E4M3 weights only, rounding to nearest", ours(C(activation_format=None, **PLAIN))),
        Row("E4M3 weights only, compensated", ours(C(activation_format=None, float_budget=0.0))),
        *extra,
        Row("E4M3 default, exported, onnxruntime", onnx_of(C())),
    ]


def logits_of(model, batches) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    return collect_logits(model, batches)


@torch.no_grad()
def float_pass_seconds(model: nn.Module, calibration: list[torch.Tensor]) -> float:
    """One FP32 forward pass over the calibration set (eval mode), the unit of PTQ time."""
    start = time.perf_counter()
    for batch in calibration:
        model(batch)
    return time.perf_counter() - start


def run(rows: list[Row], model: nn.Module, calibration: list[torch.Tensor],
        evaluate: Callable[[torch.Tensor], dict], peers: dict[str, Callable] | None = None,
        default_label: str = DEFAULT) -> list[dict]:
    """Builds and evaluates every row (and every peer); prints one line per row as it goes.
    Each row's PTQ time is also given over one FP32 pass on the calibration set: a pass is timed
    right before every row, and the unit is the median of all of them (one pass on this shared
    machine varies by tens of percent; the line of each row shows the pass before it)."""
    results, passes = [], []
    jobs = [(row.label, row.build, "hfp8") for row in rows]
    jobs += [(f"peer: {name}", build, name) for name, build in (peers or {}).items()]
    for label, build, source in jobs:
        passes.append(float_pass_seconds(model, calibration))
        start = time.perf_counter()
        try:
            built = build(model, calibration)
        except Exception as error:  # noqa: BLE001 - a peer failing is a result, not a crash
            results.append({"label": label, "source": source,
                            "error": f"{type(error).__name__}: {error}"})
            print(f"{label:52s} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        seconds = getattr(built, "peer_ptq_seconds", None) or time.perf_counter() - start
        metrics = evaluate(built)
        results.append({"label": label, "source": source, "ptq_seconds": seconds, **metrics})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{label:52s} {shown}  PTQ {seconds:6.1f} s (float pass before it {passes[-1]:.1f} s)",
              flush=True)
    float_seconds = statistics.median(passes)
    print(f"one FP32 forward pass over the calibration set: {float_seconds:.1f} s (median of "
          f"{len(passes)}, from {min(passes):.1f} to {max(passes):.1f} s)")
    default = next((r for r in results if r["label"] == default_label), None)
    for result in results:
        if "ptq_seconds" in result:
            result["time_vs_float_pass"] = result["ptq_seconds"] / float_seconds
            print(f"  {result['label']:52s} PTQ {result['time_vs_float_pass']:5.2f}x float pass")
        if default and "ptq_seconds" in result:
            result["time_vs_ours"] = result["ptq_seconds"] / default["ptq_seconds"]
    return results


def write_outputs(results: list[dict], stem: str, title: str, metric: str, folder: str,
                  update_docs: bool = False) -> None:
    """``stem``.json and a ``stem``.png bar chart of ``metric`` (matplotlib, if installed);
    with ``update_docs``, the table in docs/results.md rendered from that JSON."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stem}.json"), "w") as stream:
        json.dump({"title": title, "rows": results}, stream, indent=2)
    if update_docs:
        write_section(f"accuracy-{stem}", render_accuracy(stem))
    plt = pyplot_or_none()
    if plt is None:
        print("matplotlib is not installed: no chart (pip install -r benchmarks/requirements.txt)")
        return
    shown = [r for r in results if metric in r]
    values = np.array([r[metric] for r in shown])
    colours = ["#888888" if r["source"] != "hfp8" else
               ("#1f77b4" if "E4M3" in r["label"] else "#aaaaaa") for r in shown]
    figure, axis = plt.subplots(figsize=(9, 0.42 * len(shown) + 1.2))
    axis.barh(range(len(shown)), values, color=colours)
    axis.set_yticks(range(len(shown)), [r["label"] for r in shown], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(metric)
    low = float(values.min())
    axis.set_xlim(max(0.0, low - (values.max() - low) * 0.5 - 1e-3), float(values.max()) * 1.002 + 1e-3)
    for i, value in enumerate(values):
        axis.text(value, i, f" {value:.4f}", va="center", fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, f"{stem}.png"), dpi=120)
    plt.close(figure)
