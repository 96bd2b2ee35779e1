"""The manifest of a quantized model: per layer what was done, plus how; and its text table.
(:func:`hfp8.manifest`, in report.py, builds it from a model's report.)"""

from __future__ import annotations

import torch
from torch import nn

from hfp8.ptq.config import format_to_dict
from hfp8.ptq.operand_sites import operand_sites, site_kind
from hfp8.ptq.quantizers import (
    is_quantizable,
    layer_state,
    quantized_layers,
    weight_bias_buffer,
)

__all__ = ["build_manifest", "format_manifest", "MANIFEST_VERSION"]

MANIFEST_VERSION = 2


def _bias_value(buffer: torch.Tensor):
    return buffer.tolist() if buffer.dim() else int(buffer)


def _layer_entries(qmodel: nn.Module, report: dict) -> list[dict]:
    quantized = quantized_layers(qmodel)
    entries = []
    for name, module in qmodel.named_modules():
        if name in quantized:
            state = layer_state(module)
            wf, inf = state.weight_format, state.input_format
            # one bias (or list per row) for Conv/Linear; a recurrent layer's, per weight matrix
            biases = {weight: _bias_value(getattr(module, weight_bias_buffer(weight)))
                      for weight in state.weights}
            entries.append({
                "name": name, "type": type(module).__name__, "status": "quantized", "reason": None,
                "weight_format": None if wf is None else format_to_dict(wf),
                "weight_exponent_bias": None if wf is None else
                biases["weight"] if state.weights == ("weight",) else biases,
                "weight": (report.weights or {}).get(name),
                "input_format": None if inf is None else format_to_dict(inf),
                "input_exponent_bias": None if inf is None else int(module.input_exponent_bias),
                "observer": report.observers.get(name),
            })
        elif is_quantizable(module) and name in report.kept_float:
            entries.append({"name": name, "type": type(module).__name__, "status": "float",
                            "reason": report.kept_float[name]})
    return entries


def _site_entries(qmodel: nn.Module, report: dict) -> list[dict]:
    entries = []
    for name, (owner, site) in operand_sites(qmodel).items():
        entries.append({
            "name": name, "kind": site.kind, "status": "quantized", "reason": None,
            "format": format_to_dict(site.fmt),
            "operands": {operand: {
                "exponent_bias": int(getattr(owner, site.bias_buffer(operand))),
                "observer": report.observers.get(f"{name}.{operand}")}
                for operand in site.operands},
        })
    for name, reason in (report.sites_kept_float or {}).items():
        entries.append({"name": name, "kind": site_kind(name),
                        "status": "float", "reason": reason})
    return entries


def build_manifest(qmodel: nn.Module, report) -> dict:
    """:func:`manifest` from ``qmodel``'s layers and ``report`` (a
    :class:`hfp8.QuantReport`)."""
    from hfp8._version import __version__

    return {
        "hfp8_ptq_version": __version__,
        "manifest_version": MANIFEST_VERSION,
        "config": report.config,
        "calibration_samples": report.calibration_samples,
        "batchnorm": report.batchnorm,
        "graph": report.graph,
        "metadata": report.metadata,
        "layers": _layer_entries(qmodel, report),
        "attention": _site_entries(qmodel, report),
        "sensitivity": [{"name": name, **entry} for name, entry
                        in (report.sensitivity or {}).items()],
        "training": report.training,
    }


def _format_name(fmt: dict | None, bias) -> str:
    if fmt is None:
        return "float"
    name = f"E{fmt['exponent_bits']}M{fmt['mantissa_bits']}"
    if isinstance(bias, dict):  # a recurrent layer's weight matrices
        bias = [b for value in bias.values()
                for b in (value if isinstance(value, list) else [value])]
    if isinstance(bias, list):
        low, high = min(bias), max(bias)
        return f"{name} b={low}..{high}" if low != high else f"{name} b={low}"
    return f"{name} b={bias}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def _db(value) -> str:
    return "-" if value is None else "inf" if value == float("inf") else f"{value:.1f}"


def _rows(data: dict) -> list[tuple]:
    rows = []
    predicted = {entry["name"]: entry.get("sqnr_db") for entry in data.get("sensitivity") or []}
    for layer in data["layers"]:
        if layer["status"] == "float":
            rows.append((layer["name"], layer["type"], "float", "float", "-", "-", "-", "-",
                         _db(predicted.get(layer["name"])), layer["reason"]))
            continue
        observer = layer.get("observer") or {}
        rows.append((
            layer["name"], layer["type"],
            _format_name(layer["weight_format"], layer["weight_exponent_bias"]),
            _format_name(layer["input_format"], layer["input_exponent_bias"]),
            _percent((layer.get("weight") or {}).get("flushed_fraction")),
            _percent(observer.get("saturated_fraction")), _percent(observer.get("flushed_fraction")),
            _db(observer.get("sqnr_db")), _db(predicted.get(layer["name"])),
            observer.get("warning", ""),
        ))
    for site in data.get("attention") or []:
        if site["status"] == "float":
            rows.append((site["name"], site["kind"], "-", "float", "-", "-", "-", "-", "-",
                         site["reason"]))
            continue
        for operand, entry in site["operands"].items():
            observer = entry.get("observer") or {}
            rows.append((f"{site['name']}.{operand}",
                         "hidden state" if site["kind"] == "recurrent"
                         else f"{site['kind']} operand", "-",
                         _format_name(site["format"], entry["exponent_bias"]), "-",
                         _percent(observer.get("saturated_fraction")),
                         _percent(observer.get("flushed_fraction")),
                         _db(observer.get("sqnr_db")), "-", observer.get("warning", "")))
    return rows


def format_manifest(data: dict) -> str:
    """A human-readable table of a manifest (as returned by :func:`manifest`)."""
    config, bn = data["config"], data.get("batchnorm")
    lines = [
        f"hfp8-ptq {data['hfp8_ptq_version']}  weights: {config['weight_granularity']}, "
        f"{config['weight_bias_method']} bias; inputs: {config['activation_bias_method']} bias; "
        f"BN re-estimation: {bn['method'] if bn else 'none'}; "
        f"calibration samples: {data['calibration_samples']}",
    ]
    if bn:
        lines.append(f"BatchNorm: {bn['batchnorm_layers']} layers re-estimated ({bn['method']}) "
                     f"from {bn['samples']} samples"
                     + (f" (the shift measured on {bn['measured_samples']} of them, beside the "
                        "float model)" if bn.get("measured_samples", bn["samples"]) != bn["samples"]
                        else "")
                     + (f"; never reached: {', '.join(bn['not_reached'])}" if bn["not_reached"] else ""))
    header = ("layer", "type", "weight", "input", "w flushed", "saturated", "flushed", "SQNR dB",
              "pred. dB", "note")
    rows = _rows(data)
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    quantized = sum(layer["status"] == "quantized" for layer in data["layers"])
    everything = data.get("attention") or []
    summary = f"{quantized} of {len(data['layers'])} layers quantized"
    sites = [s for s in everything if s["kind"] != "recurrent"]
    if sites:
        summary += (f"; {sum(s['status'] == 'quantized' for s in sites)} of {len(sites)} "
                    "attention products quantized (softmax, LayerNorm and GELU stay float)")
    hidden = [s for s in everything if s["kind"] == "recurrent"]
    if hidden:
        summary += (f"; {sum(s['status'] == 'quantized' for s in hidden)} of {len(hidden)} "
                    "recurrent hidden states quantized")
    lines.append(summary)
    return "\n".join(lines)
