"""A picture of a manifest: per layer, along the network, what quantization does to it.

Three panels over the Conv/Linear layers in model order: the predicted output SQNR with only
that layer quantized (the sensitivity the float budget ranks by), the SQNR of its input and
weight rounding, and its input saturation and weight flushing. Layers kept in float are drawn in
a second colour and labelled with why (first/last, pattern, sensitive). Needs matplotlib (the
``plots`` extra: ``pip install hfp8-ptq[plots]``).
"""

from __future__ import annotations

import math
import os

from hfp8._files import atomic_write

__all__ = ["plot_manifest", "PlotError"]


class PlotError(ValueError):
    """The plot cannot be drawn (matplotlib missing, or nothing to draw)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'hfp8-ptq[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


PLOT_CEILING_DB = 80.0  # exact values (+inf dB) are drawn here, at the top of the scale


def _value(entry: dict | None, key: str, ceiling: float = math.inf):
    value = (entry or {}).get(key)
    return float("nan") if value is None else min(float(value), ceiling)


def plot_manifest(data: dict, path: str | os.PathLike, title: str | None = None) -> None:
    """Write the PNG of manifest ``data`` (see :func:`hfp8.manifest`) to ``path``."""
    plt = _pyplot()
    layers = data["layers"]
    if not layers:
        raise PlotError("the manifest lists no layer")
    predicted = {entry["name"]: entry.get("sqnr_db") for entry in data.get("sensitivity") or []}
    names = [layer["name"] for layer in layers]
    floating = [layer["status"] == "float" for layer in layers]
    positions = range(len(layers))
    colours = ["#d62728" if f else "#1f77b4" for f in floating]
    figure, axes = plt.subplots(3, 1, figsize=(max(8, 0.18 * len(layers) + 3), 9), sharex=True)
    sensitivity = [float("nan") if predicted.get(n) is None else min(predicted[n], PLOT_CEILING_DB)
                   for n in names]
    axes[0].bar(positions, sensitivity, color=colours)
    axes[0].set_ylabel("output SQNR, this layer\nalone quantized (dB)")
    axes[0].set_title(title or "per-layer quantization (red: kept float)", fontsize=10)
    input_sqnr = [_value(layer.get("observer"), "sqnr_db", PLOT_CEILING_DB) for layer in layers]
    weight_sqnr = [_value(layer.get("weight"), "sqnr_db", PLOT_CEILING_DB) for layer in layers]
    axes[1].plot(positions, input_sqnr, "o-", markersize=3, label="input rounding")
    axes[1].plot(positions, weight_sqnr, "s-", markersize=3, label="weight rounding")
    axes[1].set_ylabel("SQNR (dB)")
    axes[1].legend(fontsize=8)
    saturated = [100 * _value(layer.get("observer"), "saturated_fraction") for layer in layers]
    flushed = [100 * _value(layer.get("weight"), "flushed_fraction") for layer in layers]
    axes[2].plot(positions, saturated, "o-", markersize=3, label="input saturated")
    axes[2].plot(positions, flushed, "s-", markersize=3, label="weights flushed to 0")
    axes[2].set_ylabel("% of values")
    axes[2].legend(fontsize=8)
    for axis in axes:
        for position, is_float in zip(positions, floating):
            if is_float:
                axis.axvspan(position - 0.5, position + 0.5, color="#d62728", alpha=0.08, lw=0)
    axes[2].set_xticks(list(positions), names, rotation=90, fontsize=6)
    figure.tight_layout()

    def write(temporary: str) -> None:
        figure.savefig(temporary, dpi=110, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(figure)
