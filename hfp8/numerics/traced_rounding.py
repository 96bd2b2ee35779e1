"""Rounding written for ``torch.compile``: plain elementwise torch ops, the bias a tensor.

:func:`hfp8.fake_quantize` walks the tensor in cache-sized blocks with Python-level loops and
scratch buffers, which is the fastest eager form; a compiler wants the opposite, one expression
it can fuse into the elementwise work around it (a convolution's bias and activation, a
residual add). :func:`round_at_bias` is that expression: with the format's default bias ``d``,
its largest finite value ``M`` and smallest normal ``n`` at ``d``, and ``s = 2^(d - b)``::

    y = clamp(x / s, -M, M)                     # x on the default-bias grid, saturated
    p = max(2^floor(log2|y|), n)                # binade of y (its exponent field), clamped
    C = 1.5 * 2^(P - 1 - m) * p                 # P = 24 (float32) or 53 (float64) bits
    fq(x) = copysign((y + C) - C, y) * s

the identity of :mod:`hfp8.numerics.fake_quant`, at the default bias, rescaled. Multiplying
the rounded value by the power of two ``s`` is exact (every value of a valid format is an exact
float). ``x / s`` is exact unless it lands among the compute type's subnormals, below
``2^-126`` (float32); :func:`traceable` admits only formats whose smallest tie ``2^(-d-m)`` is
at least that, so such a ``y`` rounds to zero either way. The result therefore equals
``fake_quantize(x, fmt.with_bias(b))`` bit for bit (NaN stays NaN; its payload may differ).
The bias stays a tensor: a compiled graph does not specialise on its value.
"""

from __future__ import annotations

import torch

from hfp8.numerics.fake_quant import _FLOAT_LAYOUT, _compute_dtype, _top_exponent
from hfp8.numerics.formats import FloatFormat

__all__ = ["round_at_bias", "traceable"]


def _default(fmt: FloatFormat) -> FloatFormat:
    return FloatFormat(fmt.exponent_bits, fmt.mantissa_bits, None, fmt.specials)


def _constants(fmt: FloatFormat) -> tuple[int, float, float, int]:
    """(default bias d, largest finite M and smallest normal n at d, mantissa bits m): plain
    numbers, computed outside the compiled graph."""
    base = _default(fmt)
    return base.exponent_bias, base.max_finite, base.smallest_normal, base.mantissa_bits


# torch.compiler.assume_constant_result(_constants), written out: that decorator imports
# TorchDynamo (about 1 s at `import hfp8`, on every command) to set this one attribute. A test
# checks that the decorator still marks a function this way.
_constants._dynamo_marked_constant = True


def traceable(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    """Whether :func:`round_at_bias` rounds ``dtype`` tensors onto ``fmt``'s grids exactly:
    the default-bias format must round in ``dtype``'s own precision (float16/bfloat16 in
    float32, as :func:`hfp8.fake_quantize` does) and its smallest tie ``2^(-d-m)`` must be a
    normal number of that precision."""
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False
    base = _default(fmt)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = (1 - base.exponent_bias, _top_exponent(base))
    smallest_normal_exponent = -1022 if compute == torch.float64 else -126
    return (_compute_dtype(dtype, fmt.mantissa_bits, exponents) == compute
            and -base.exponent_bias - base.mantissa_bits >= smallest_normal_exponent)


def round_at_bias(x: torch.Tensor, fmt: FloatFormat, exponent_bias: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to nearest (ties to even, saturating) onto ``fmt`` at the integer bias held
    by the 0-d tensor ``exponent_bias`` (``fmt``'s own bias is not used); ``x``'s dtype. Plain
    torch ops, no gradient rule: for inference under ``torch.compile`` (check
    :func:`traceable` first)."""
    default_bias, max_finite, smallest_normal, mantissa_bits = _constants(fmt)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    precision, int_dtype, exponent_mask = _FLOAT_LAYOUT[compute]
    scale = torch.exp2((default_bias - exponent_bias).to(compute))
    y = torch.clamp(x.to(compute) / scale, -max_finite, max_finite)
    binade = torch.bitwise_and(y.view(int_dtype), exponent_mask).view(compute)
    magic = torch.clamp_min(binade, smallest_normal) * (
        1.5 * 2.0 ** (precision - 1 - mantissa_bits))
    return (torch.copysign((y + magic) - magic, y) * scale).to(x.dtype)
