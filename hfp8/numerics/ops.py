"""The rounding operator ``hfp8::quantize_dequantize``: one node per point for export and tracing.

``hfp8::quantize_dequantize(x, scale, exponent_bits, mantissa_bits, specials, site)`` is ``x``
rounded onto the format ``FloatFormat(exponent_bits, mantissa_bits, b, specials)`` whose bias
``b`` is given as the power-of-two ``scale = 2^(b_default - b)``, exactly what
:func:`hfp8.fake_quantize` computes; its gradient passes straight through. It is a
``torch.library.custom_op`` so that the ONNX exporter sees one node per quantization point and
translates it to ``QuantizeLinear -> DequantizeLinear`` (:mod:`hfp8.export.onnx_ops`); ``site``
names the point. Registered on import: a quantized model runs once this module is loaded.
Eagerly, a plain tensor skips the operator's dispatch and goes to :func:`hfp8.fake_quantize`
itself (the same values and gradient; :func:`hfp8.ptq.quantizers.quantize_point`), and
``torch.compile`` inference traces plain ops (:mod:`hfp8.numerics.traced_rounding`); under
``torch.export`` and ``torch.jit.trace`` every point is this operator.
"""

from __future__ import annotations

import math

import torch

from hfp8.numerics.fake_quant import fake_quantize
from hfp8.numerics.formats import FloatFormat

__all__ = ["quantize_dequantize", "scale_for_bias"]


def scale_for_bias(fmt: FloatFormat, exponent_bias: torch.Tensor) -> torch.Tensor:
    """``2^(b_default - b)`` as float32, elementwise over an integer bias tensor (traceable)."""
    return torch.exp2((fmt.default_bias - exponent_bias).to(torch.float32))


def _bias_from_scale(scale: float, exponent_bits: int, mantissa_bits: int, specials: str) -> FloatFormat:
    fraction, exponent = math.frexp(scale)
    if fraction != 0.5:
        raise ValueError(f"scale must be a power of two, got {scale!r}")
    base = FloatFormat(exponent_bits, mantissa_bits, None, specials)
    return base.with_bias(base.exponent_bias - (exponent - 1))


@torch.library.custom_op("hfp8::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, exponent_bits: int,
                        mantissa_bits: int, specials: str, site: str) -> torch.Tensor:
    """``fake_quantize(x, fmt at the bias that scale encodes)``; see the module docstring."""
    fmt = _bias_from_scale(float(scale), exponent_bits, mantissa_bits, specials)
    return fake_quantize(x, fmt)


@quantize_dequantize.register_fake
def _(x, scale, exponent_bits, mantissa_bits, specials, site):
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    return grad, None, None, None, None, None


quantize_dequantize.register_autograd(_straight_through)
