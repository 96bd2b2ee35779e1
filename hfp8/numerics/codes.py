"""Bit codes of formats of at most 8 bits: ``sign | exponent field | mantissa field``."""

from __future__ import annotations

import functools
import math

import torch

from hfp8.numerics.fake_quant import fake_quantize
from hfp8.numerics.formats import FloatFormat

__all__ = ["encode", "decode"]


def _require_byte_format(fmt: FloatFormat) -> None:
    if fmt.bits > 8:
        raise ValueError(f"{fmt} has {fmt.bits} bits; encode/decode handle formats of at most 8")


@functools.lru_cache(maxsize=64)
def _code_table(fmt: FloatFormat) -> torch.Tensor:
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    all_ones_exponent, all_ones_mantissa = 2**e - 1, 2**m - 1
    values = []
    for code in range(2**fmt.bits):
        sign = -1.0 if (code >> (e + m)) & 1 else 1.0
        exponent_field = (code >> m) & all_ones_exponent
        mantissa_field = code & all_ones_mantissa
        if fmt.specials == "ieee" and exponent_field == all_ones_exponent:
            magnitude = math.inf if mantissa_field == 0 else math.nan
        elif fmt.specials == "fn" and (exponent_field, mantissa_field) == (
            all_ones_exponent, all_ones_mantissa
        ):
            magnitude = math.nan
        else:
            magnitude = fmt.code_value(exponent_field, mantissa_field)
        values.append(sign * magnitude)
    return torch.tensor(values, dtype=torch.float64).float()


def decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """float32 values of integer ``codes`` (any integer dtype, values in ``0 .. 2^bits - 1``)."""
    _require_byte_format(fmt)
    if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError("decode needs an integer tensor of codes")
    index = codes.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= 2**fmt.bits):
        raise ValueError(f"codes of {fmt} lie in 0..{2**fmt.bits - 1}")
    return _code_table(fmt).to(codes.device)[index]


@functools.lru_cache(maxsize=64)
def _positive_values(fmt: FloatFormat) -> torch.Tensor:
    """Finite non-negative values in code order (code k has value ``table[k]``), float64."""
    table = _code_table(fmt).double()
    positive = table[: 2 ** (fmt.bits - 1)]
    return positive[torch.isfinite(positive)]


def encode(x: torch.Tensor, fmt: FloatFormat, saturate: bool = True) -> torch.Tensor:
    """``torch.uint8`` codes of ``x`` rounded to ``fmt`` (as :func:`fake_quantize` rounds).

    Zeros keep their sign. NaN becomes the all-ones code of its sign's half (``S.1..1.1..1``,
    which is NaN in both "fn" and "ieee"); the "none" layout has no NaN and refuses it.
    """
    _require_byte_format(fmt)
    values = fake_quantize(x.detach(), fmt, saturate=saturate).double()
    magnitude = values.abs()
    nan = torch.isnan(values)
    if bool(nan.any()) and fmt.specials == "none":
        raise ValueError(f"{fmt} has no NaN code, but the input holds NaN")
    positive = _positive_values(fmt).to(values.device)
    index = torch.searchsorted(positive, torch.where(nan, 0.0, magnitude))
    sign = torch.signbit(values).to(torch.int64) << (fmt.bits - 1)
    codes = index | sign
    if fmt.has_inf:
        infinite = torch.isinf(values)
        inf_code = (2**fmt.exponent_bits - 1) << fmt.mantissa_bits
        codes = torch.where(infinite, sign | inf_code, codes)
    codes = torch.where(nan, sign | (2 ** (fmt.bits - 1) - 1), codes)
    return codes.to(torch.uint8)
