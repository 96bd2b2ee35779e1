"""Quantized Conv1d/2d/3d and Linear: E4M3 weights on the grid, fake-quantized inputs.

Each class is the torch layer it extends plus two int64 buffers:

* ``weight_exponent_bias``: shape ``()`` (per tensor) or ``(out_channels,)`` (per channel). The
  ``weight`` parameter already holds the rounded values ``fq(w; weight_exponent_bias)``, so the
  forward pass does no weight work and the state dict is what deployment stores.
* ``input_exponent_bias``: shape ``()``; the input is rounded with
  ``fq(x; input_format.with_bias(input_exponent_bias))`` before the float convolution.

The forward pass is therefore exactly what a QDQ deployment computes: ``DQ(Q(x)) (*) DQ(w_codes)``.
One temporary state, set only by :func:`hfp8.quantize_model` (and cleared in ``finally``):
``observer``, while set, lets inputs pass through unrounded and shows them to the observer.
"""

from __future__ import annotations

import torch
from torch import nn

from hfp8.ptq.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.ptq.formats import FloatFormat

__all__ = [
    "QuantizedLinear",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QUANTIZED_TYPES",
    "quantize_layer",
    "quantize_weight",
]


class _QuantizedLayer:
    """Shared behaviour; mixed into subclasses of the torch layers."""

    weight_format: FloatFormat | None
    input_format: FloatFormat | None

    def _init_quantization(self, weight_format, input_format, per_channel: bool) -> None:
        self.weight_format = weight_format
        self.input_format = input_format
        self.observer = None
        weight_shape = (self.weight.shape[0],) if per_channel else ()
        default_weight = weight_format.exponent_bias if weight_format is not None else 0
        default_input = input_format.exponent_bias if input_format is not None else 0
        device = self.weight.device
        self.register_buffer("weight_exponent_bias",
                             torch.full(weight_shape, default_weight, dtype=torch.int64, device=device))
        self.register_buffer("input_exponent_bias",
                             torch.tensor(default_input, dtype=torch.int64, device=device))

    @property
    def per_channel(self) -> bool:
        return self.weight_exponent_bias.dim() == 1

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if self.input_format is None:
            return x
        return fake_quantize(x, self.input_format.with_bias(int(self.input_exponent_bias)))

    def extra_repr(self) -> str:
        weight = "float" if self.weight_format is None else (
            f"{self.weight_format.name}(bias per channel)" if self.per_channel
            else str(self.weight_format.with_bias(int(self.weight_exponent_bias))))
        inputs = "float" if self.input_format is None else str(
            self.input_format.with_bias(int(self.input_exponent_bias)))
        return f"{super().extra_repr()}, weight={weight}, input={inputs}"


class QuantizedLinear(_QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.weight, self.bias)


class QuantizedConv1d(_QuantizedLayer, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight, self.bias)


class QuantizedConv2d(_QuantizedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight, self.bias)


class QuantizedConv3d(_QuantizedLayer, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight, self.bias)


# Exact float types we replace (subclasses may override forward, so they are left alone).
QUANTIZED_TYPES = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
}


def _empty_like_layer(layer: nn.Module) -> nn.Module:
    """A new quantized layer with the same hyper-parameters, device and dtype as ``layer``."""
    cls = QUANTIZED_TYPES[type(layer)]
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return cls(layer.in_features, layer.out_features, bias=layer.bias is not None, **factory)
    return cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
               padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
               bias=layer.bias is not None, padding_mode=layer.padding_mode, **factory)


def quantize_weight(weight: torch.Tensor, fmt: FloatFormat, exponent_bias) -> torch.Tensor:
    """``fq(weight)`` with one bias (int or 0-d tensor) or one per output channel (1-D tensor)."""
    bias = torch.as_tensor(exponent_bias)
    if bias.dim() == 1:
        return fake_quantize_per_channel(weight, fmt, bias, axis=0)
    return fake_quantize(weight, fmt.with_bias(int(bias)))


def quantize_layer(layer: nn.Module, weight_format: FloatFormat | None,
                   weight_exponent_bias, input_format: FloatFormat | None) -> nn.Module:
    """Quantized copy of a float Conv/Linear ``layer``; ``layer`` itself is not modified.

    ``weight_exponent_bias``: an int (per tensor) or a 1-D tensor (one per output channel);
    ignored when ``weight_format`` is None. The input bias starts at the format's own bias.
    """
    quantized = _empty_like_layer(layer)
    bias = torch.as_tensor(weight_exponent_bias if weight_format is not None else 0)
    quantized._init_quantization(weight_format, input_format, per_channel=bias.dim() == 1)
    with torch.no_grad():
        weight = layer.weight.detach()
        if weight_format is not None:
            weight = quantize_weight(weight, weight_format, bias)
            quantized.weight_exponent_bias.copy_(bias)
        quantized.weight.copy_(weight)
        if layer.bias is not None:
            quantized.bias.copy_(layer.bias.detach())
    quantized.train(layer.training)
    return quantized
