"""Choosing integer exponent biases from data (the methods of ``BIAS_METHODS``).

* ``fixed``: the format's own bias ``fmt.exponent_bias``, whatever the data.
* ``max``: the largest bias ``b`` with ``max|x| <= max_finite(b)``; nothing saturates.
* ``mse``: among ``b_max, b_max + 1, ..., b_max + search_radius`` the bias with the smallest sum of
  squared rounding errors ``sum((fq(x; b) - x)^2)``; ties go to the smaller bias (wider range).
  Biases below ``b_max`` are never better: their grid, restricted to ``[0, max|x|]``, is a subset
  of the grid at ``b_max`` (it is that grid doubled), so ``mse`` error <= ``max`` error always.

Only finite values take part (NaN stays NaN and +-Inf saturates whatever the bias). A tensor (or
channel) with no finite non-zero value has nothing to fit: it gets ``fmt.exponent_bias``.
Biases are clamped to the range in which the format stays inside float32 (see FloatFormat).
"""

from __future__ import annotations

import math

import torch

from hfp8.numerics.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.numerics.formats import FloatFormat

__all__ = ["select_exponent_bias", "BIAS_METHODS", "max_bias_for_amax", "valid_bias_range"]

BIAS_METHODS = ("mse", "max", "fixed")
DEFAULT_SEARCH_RADIUS = 8


def valid_bias_range(fmt: FloatFormat) -> tuple[int, int]:
    """Smallest and largest exponent bias at which ``fmt`` still fits float32 exactly."""
    top_field = max(fmt.largest_finite_fields()[0], 1)
    return top_field - 127, 150 - fmt.mantissa_bits


def max_bias_for_amax(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Largest integer bias ``b`` with ``amax <= max_finite(b)``, elementwise, as int64.

    ``max_finite(b) = max_finite(b0) * 2^(b0 - b)``, so ``b = b0 + floor(log2(max0 / amax))``;
    the float logarithm is only a first guess, corrected with exact power-of-two comparisons.
    Entries with ``amax == 0`` (or non-finite) get ``fmt.exponent_bias``.
    """
    amax = amax.detach().to(torch.float64).cpu()
    base, top = fmt.exponent_bias, fmt.max_finite
    usable = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(usable, amax, torch.ones_like(amax))
    guess = base + torch.floor(math.log2(top) - torch.log2(safe))

    def fits(bias):
        return torch.ldexp(torch.full_like(safe, top), base - bias) >= safe

    for _ in range(2):
        guess = torch.where(fits(guess + 1), guess + 1, guess)
        guess = torch.where(fits(guess), guess, guess - 1)
    low, high = valid_bias_range(fmt)
    guess = guess.clamp(low, high)
    return torch.where(usable, guess, torch.full_like(guess, base)).to(torch.int64)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    values = x.detach()
    if not values.dtype.is_floating_point:
        raise TypeError(f"select_exponent_bias needs a floating-point tensor, got {values.dtype}")
    values = values.to(torch.float32) if values.dtype != torch.float64 else values
    if axis is None:
        return values.reshape(1, -1)
    if values.dim() == 0:
        raise ValueError("axis needs a tensor with at least one dimension")
    return values.movedim(axis, 0).reshape(values.shape[axis], -1)


def squared_error(values: torch.Tensor, fmt: FloatFormat, biases: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum((fq(x; b_row) - x)^2)`` over the finite entries of ``values`` (float64)."""
    finite = torch.isfinite(values)
    clean = torch.where(finite, values, torch.zeros_like(values))
    if biases.numel() == 1:
        quantized = fake_quantize(clean, fmt.with_bias(int(biases.reshape(-1)[0])))
    else:
        quantized = fake_quantize_per_channel(clean, fmt, biases, axis=0)
    error = (quantized.double() - clean.double()).square()
    return error.sum(dim=1)


def select_exponent_bias(
    x: torch.Tensor,
    fmt: FloatFormat,
    method: str = "mse",
    axis: int | None = None,
    search_radius: int = DEFAULT_SEARCH_RADIUS,
) -> int | torch.Tensor:
    """Integer exponent bias for ``x`` in ``fmt`` (see the module docstring for the methods).

    Returns an ``int`` when ``axis is None``; otherwise a 1-D int64 tensor with one bias per
    index along ``axis`` (for a conv or linear weight, ``axis=0`` gives one per output channel).
    """
    if method not in BIAS_METHODS:
        raise ValueError(f"method must be one of {BIAS_METHODS}, got {method!r}")
    if search_radius < 0:
        raise ValueError("search_radius must be >= 0")
    rows = _channels_first(x, axis)
    if method == "fixed":
        fixed = torch.full((rows.shape[0],), fmt.exponent_bias, dtype=torch.int64)
        return fmt.exponent_bias if axis is None else fixed
    finite = torch.isfinite(rows)
    amax = torch.where(finite, rows.abs(), torch.zeros_like(rows)).amax(dim=1) \
        if rows.shape[1] else torch.zeros(rows.shape[0])
    best = max_bias_for_amax(amax, fmt)
    if method == "mse" and rows.shape[1]:
        _, high = valid_bias_range(fmt)
        widest = best
        fitted = torch.isfinite(amax.cpu()) & (amax.cpu() > 0)
        # the rounding runs on x's device; the per-row bookkeeping stays on the CPU, with biases
        best_error = squared_error(rows, fmt, best).cpu()
        for step in range(1, search_radius + 1):
            candidate = torch.where(fitted, (widest + step).clamp(max=high), widest)
            error = squared_error(rows, fmt, candidate).cpu()
            better = error < best_error
            best = torch.where(better, candidate, best)
            best_error = torch.where(better, error, best_error)
    if axis is None:
        return int(best[0])
    return best
