"""The deployment form of a quantized model: its quantized weights stored as FP8 codes.

Each quantized weight becomes a ``torch.float8_*`` buffer of its codes, read through a
parametrization that calls ``hfp8::dequantize_weight`` (codes times the power-of-two scale
``2^(b_default - b)``, exact). The layer's own forward then reads that weight, whatever its code
does with it, so torch's exporter sees FP8 initializers and a DequantizeLinear per weight
(:mod:`hfp8.export.onnx_ops`), and the model computes the same numbers as the quantized one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from hfp8.export import ExportError
from hfp8.export.onnx_ops import (
    UnsupportedFormatError,
    exportable_base,
    torch_fp8_dtype,
)
from hfp8.numerics.ops import scale_for_bias
from hfp8.ptq.operand_sites import operand_sites
from hfp8.ptq.quantizers import layer_state, quantized_layers, weight_bias_buffer

__all__ = ["DequantizedWeight", "deployment_form"]


class DequantizedWeight(nn.Module):
    """Parametrization: the layer's ``weight`` is its FP8 codes times the power-of-two scale."""

    def __init__(self, scale: torch.Tensor, site: str) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.site = site

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.ops.hfp8.dequantize_weight(codes, self.scale, 0, self.site)


def _exportable(fmt) -> None:
    """An ExportError, the one error export raises, for a format ONNX cannot hold."""
    try:
        exportable_base(fmt)
    except UnsupportedFormatError as error:
        raise ExportError(str(error)) from None


def _store_codes(layer: nn.Module, name: str, weight_name: str) -> None:
    fmt = layer_state(layer).weight_format
    weight = layer.get_parameter(weight_name).detach().float()
    scale = scale_for_bias(fmt, getattr(layer, weight_bias_buffer(weight_name)).cpu())
    broadcast = scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.dim() else scale
    base = exportable_base(fmt)
    scaled = weight / broadcast  # exact: a power of two
    codes = scaled.clamp(-base.max_finite, base.max_finite).to(torch_fp8_dtype(fmt))
    if not torch.equal(codes.float() * broadcast, weight):
        raise ExportError(f"weights of {name!r} ({weight_name}) are not on the {fmt.name} grid; "
                          "was the model modified after quantize_model?")
    del layer._parameters[weight_name]
    layer.register_buffer(weight_name, codes)
    site = name if weight_name == "weight" else f"{name}.{weight_name}"
    parametrize.register_parametrization(layer, weight_name, DequantizedWeight(scale, site),
                                         unsafe=True)


def deployment_form(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` (CPU, eval) whose quantized weights are FP8 codes read through
    ``hfp8::dequantize_weight``: what the ONNX file stores. It computes the same numbers.

    The quantized weights already on the CPU are not copied: the copy starts with the same
    parameters (``deepcopy``'s memo), reads each once for its codes and drops it; ``qmodel``
    is not changed (the 150M decoder's export peaked at 2.42 GiB instead of 2.73 GiB)."""
    shared = {id(weight): weight for layer in quantized_layers(qmodel).values()
              if layer_state(layer).weight_format is not None
              for weight in map(layer.get_parameter, layer_state(layer).weights)
              if weight.device.type == "cpu"}
    model = copy.deepcopy(qmodel, shared).eval().cpu()
    for name, layer in quantized_layers(model).items():
        state = layer_state(layer)
        for fmt in (state.weight_format, state.input_format):
            if fmt is not None:
                _exportable(fmt)
        if state.weight_format is not None:
            for weight_name in state.weights:
                _store_codes(layer, name, weight_name)
    for _, site in operand_sites(model).values():
        _exportable(site.fmt)
    return model
