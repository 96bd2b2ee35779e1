"""Independent references for the number formats, written from docs/formats.md section 1.

Nothing here imports hfp8's rounding code: scalar definitions in plain Python, and casts through
ml_dtypes / torch float8 dtypes with the power-of-two scale ``2^(default_bias - bias)``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch


def scalar_code_value(code: int, exponent_bits: int, mantissa_bits: int, bias: int,
                      specials: str) -> float:
    """Value of one code, straight from the definition (sign | exponent | mantissa)."""
    sign = -1.0 if code >> (exponent_bits + mantissa_bits) & 1 else 1.0
    exponent = (code >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = code & ((1 << mantissa_bits) - 1)
    exponent_all_ones = exponent == (1 << exponent_bits) - 1
    mantissa_all_ones = mantissa == (1 << mantissa_bits) - 1
    if specials == "ieee" and exponent_all_ones:
        return sign * math.inf if mantissa == 0 else math.nan
    if specials == "fn" and exponent_all_ones and mantissa_all_ones:
        return math.nan
    if exponent == 0:
        return sign * 2.0 ** (1 - bias) * (mantissa / 2**mantissa_bits)
    return sign * 2.0 ** (exponent - bias) * (1 + mantissa / 2**mantissa_bits)


# (exponent_bits, mantissa_bits, specials) -> (reference dtype, its bias)
ML_DTYPES = {
    (4, 3, "fn"): (ml_dtypes.float8_e4m3fn, 7),
    (4, 3, "ieee"): (ml_dtypes.float8_e4m3, 7),
    (5, 2, "ieee"): (ml_dtypes.float8_e5m2, 15),
    (3, 4, "ieee"): (ml_dtypes.float8_e3m4, 3),
    (2, 3, "none"): (ml_dtypes.float6_e2m3fn, 1),
    (3, 2, "none"): (ml_dtypes.float6_e3m2fn, 3),
    (2, 1, "none"): (ml_dtypes.float4_e2m1fn, 1),
}


def ml_dtypes_round(x: np.ndarray, exponent_bits: int, mantissa_bits: int, specials: str,
                    bias: int) -> np.ndarray:
    """Round through ml_dtypes at ``bias`` via the power-of-two scale; no saturation."""
    dtype, reference_bias = ML_DTYPES[(exponent_bits, mantissa_bits, specials)]
    scale = 2.0 ** (reference_bias - bias)
    scaled = (x / x.dtype.type(scale)).astype(dtype)
    return scaled.astype(x.dtype) * x.dtype.type(scale)


def ml_dtypes_round_saturating(x: np.ndarray, fmt) -> np.ndarray:
    """ml_dtypes' round to nearest even onto ``fmt`` (any object with the FloatFormat fields and
    ``max_finite``) at its own bias, saturating: clamped to ``+-max_finite`` first (the max is on
    the grid, so clamping before rounding is saturation). float32 in and out."""
    clamped = np.clip(x, -fmt.max_finite, fmt.max_finite).astype(np.float32)
    return ml_dtypes_round(clamped, fmt.exponent_bits, fmt.mantissa_bits, fmt.specials,
                           fmt.exponent_bias)


def same_float32_bits(actual: np.ndarray, expected: np.ndarray) -> bool:
    """float32 arrays equal bit for bit, NaN for NaN (a NaN's payload is not specified)."""
    nan = np.isnan(expected)
    return bool(np.array_equal(np.isnan(actual), nan)
                and np.array_equal(actual[~nan].view(np.int32), expected[~nan].view(np.int32)))


def torch_float8_round(x: torch.Tensor, dtype: torch.dtype, reference_bias: int,
                       bias: int) -> torch.Tensor:
    """Round through a torch float8 dtype at ``bias`` via the power-of-two scale."""
    scale = 2.0 ** (reference_bias - bias)
    return (x / scale).to(dtype).to(x.dtype) * scale


def nearest_even_reference(value: float, grid: list[float], codes: list[int]) -> float:
    """Round one value to the nearest of the sorted non-negative ``grid``; ties to the even code.

    Plain scalar bisection; saturates at the largest grid value. Sign handled by the caller.
    """
    import bisect

    magnitude = abs(value)
    if magnitude >= grid[-1]:
        return math.copysign(grid[-1], value)
    index = bisect.bisect_left(grid, magnitude)
    if grid[index] == magnitude:
        return math.copysign(grid[index], value)
    low, high = grid[index - 1], grid[index]
    if magnitude - low < high - magnitude:
        chosen = low
    elif magnitude - low > high - magnitude:
        chosen = high
    else:
        chosen = low if codes[index - 1] % 2 == 0 else high
    return math.copysign(chosen, value)


def dense_sweep(low: float, high: float, count: int, seed: int = 0) -> np.ndarray:
    """float32 values covering [low, high] densely: evenly spaced bit patterns plus random
    bit patterns in that range, both signs."""
    low_bits = np.array([low], dtype=np.float32).view(np.int32)[0]
    high_bits = np.array([high], dtype=np.float32).view(np.int32)[0]
    stride = max(1, (int(high_bits) - int(low_bits)) // count)
    even = np.arange(low_bits, high_bits + 1, stride, dtype=np.int64).astype(np.int32)
    rng = np.random.default_rng(seed)
    random = rng.integers(low_bits, high_bits + 1, size=count, dtype=np.int64).astype(np.int32)
    magnitudes = np.concatenate([even, random]).view(np.float32)
    return np.concatenate([magnitudes, -magnitudes])


def midpoints(grid: np.ndarray) -> np.ndarray:
    """Exact midpoints between consecutive grid values (the ties), computed in float64."""
    grid = np.asarray(grid, dtype=np.float64)
    return (grid[:-1] + grid[1:]) / 2
