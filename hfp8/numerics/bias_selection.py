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

from hfp8.numerics.fake_quant import nearest_rounder
from hfp8.numerics.formats import FloatFormat

__all__ = ["select_exponent_bias", "BIAS_METHODS", "max_bias_for_amax", "valid_bias_range",
           "candidate_errors"]

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


def _row_ranges(rows: torch.Tensor, chunk: int):
    """Ranges of whole rows of ``rows`` of about ``chunk`` elements (one row where a row is
    longer)."""
    count, width = rows.shape
    step = max(1, chunk // max(width, 1))
    return (range(first, min(first + step, count)) for first in range(0, count, step))


def _finite_amax(rows: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``max |x|`` over the finite entries of each row (0 where none), block by block: the
    temporaries are one block's, however large the tensor."""
    amax = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for mine in _row_ranges(rows, chunk):
        for column in range(0, rows.shape[1], chunk):
            block = rows[mine.start:mine.stop, column:column + chunk]
            magnitude = block.abs().nan_to_num_(nan=0.0, posinf=0.0)  # Inf and NaN count as 0
            torch.maximum(amax[mine.start:mine.stop], magnitude.amax(dim=1),
                          out=amax[mine.start:mine.stop])
    return amax


def candidate_errors(rows: torch.Tensor, fmt: FloatFormat, candidates: torch.Tensor,
                     chunk: int = 1 << 20) -> torch.Tensor:
    """``errors[r, c] = sum((fq(x; b) - x)^2)`` over the finite entries ``x`` of row ``r`` of
    ``rows``, at bias ``b = candidates[r, c]`` (float64, CPU), for every candidate in one
    pass over the data instead of one rounding per candidate.

    Every candidate of a row is at least the row's first one, ``b0 = candidates[r, 0]``, so
    its grid is ``b0``'s shifted down: a value ``|x| >= smallest_normal(b0)`` is normal at every
    candidate, and at bias ``b`` it either rounds within its own binade, with an error that does
    not depend on ``b``, or (``|x| > max_finite(b)``) saturates, with error ``(|x| - M_b)^2``.
    ``max_finite(b)`` is ``(1 + J / 2^m) 2^(E - b)`` (top exponent field ``E``, mantissa field
    ``J``): the lower edge of one of the ``2^m`` slots of its binade. So per row, binade and slot
    it suffices to add up the count, ``d = |x| - lower edge``, ``d^2`` and the squared
    within-binade error (``d`` and the error are exact in float, in units of the binade's
    spacing ``2^(binade - m)``, and scaled once per bin); for a slot above the max,
    ``sum (|x| - M)^2 = sum d^2 + 2 D sum d + n D^2`` with ``D = lower edge - M >= 0`` (no
    cancellation). Values below
    ``smallest_normal(b0)`` are rounded exactly at each candidate (few, in practice). Sums run
    in float64, in an order of their own: equal to per-candidate rounding's up to float64
    rounding."""
    candidates = candidates.to("cpu", torch.int64)
    result = torch.zeros(rows.shape[0], candidates.shape[1], dtype=torch.float64)
    for mine in _row_ranges(rows, chunk):  # all work space is one range of rows' (issue 23)
        result[mine.start:mine.stop] = _errors_of_rows(
            rows[mine.start:mine.stop], fmt, candidates[mine.start:mine.stop], chunk)
    return result


def _errors_of_rows(rows: torch.Tensor, fmt: FloatFormat, candidates: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """:func:`candidate_errors` of a few rows (CPU int64 ``candidates``), their columns in
    pieces of ``chunk``."""
    count, width = rows.shape
    mantissa, slots = fmt.mantissa_bits, 1 << fmt.mantissa_bits
    top_field, top_slot = fmt.largest_finite_fields()
    bins = top_field * slots  # a row's normal values at b0 lie in top_field binades
    floor_binade = 1 - candidates[:, 0]  # the binade of smallest_normal(b0), per row
    tables = torch.zeros(4, count * bins + 1, dtype=torch.float64)  # last bin: not normal
    small_values, small_rows = [], []
    local = floor_binade.to(rows.device)[:, None]
    owner = torch.arange(count, device=rows.device)[:, None]
    for column in range(0, width, chunk):
        block = rows[:, column:column + chunk]
        absolute = block.abs()
        floor = torch.exp2(local.to(block.dtype))
        fraction, exponent = torch.frexp(absolute)  # |x| = fraction 2^exponent, [0.5, 1)
        normal = (absolute >= floor) & torch.isfinite(absolute)
        small = (absolute > 0) & (absolute < floor)
        if bool(small.any()):
            which = small.nonzero()
            small_values.append(absolute[small].cpu().to(torch.float64))
            small_rows.append(which[:, 0].cpu())
        # t = |x| 2^(m - binade) in [2^m, 2^(m+1)): its integer part is the slot (plus 2^m),
        # its fraction u the offset in the slot and round(t) - t the within-binade error,
        # both in units of 2^(binade - m), the same for every value of a bin: scaled after
        # the sums (exact in float: t has the input's precision)
        scaled = fraction * (2 * slots)
        whole = scaled.floor()
        slot = whole.to(torch.int64) - slots
        binade = (exponent.to(torch.int64) - 1 - local).clamp(0, top_field - 1)
        index = torch.where(normal, (owner * top_field + binade) * slots + slot,
                            count * bins).reshape(-1)
        offset = (scaled - whole).reshape(-1).to(torch.float64)
        error = (torch.round(scaled) - scaled).reshape(-1).to(torch.float64)
        for table, weights in zip(tables, (None, offset, offset.square(), error.square())):
            table += torch.bincount(index, weights, minlength=count * bins + 1).to(
                "cpu", torch.float64)
    unit = torch.exp2((floor_binade[:, None] + torch.arange(top_field)[None, :] - mantissa)
                      .to(torch.float64))[..., None]  # 2^(binade - m) per row and binade
    unit = unit.expand(count, top_field, slots).reshape(-1)
    tables[1, :-1] *= unit
    tables[2:, :-1] *= unit.square()
    number, first_sum, second_sum, within_sum = (
        table[:-1].reshape(count, top_field, slots) for table in tables)
    result = torch.zeros(count, candidates.shape[1], dtype=torch.float64)
    relative = torch.arange(top_field, dtype=torch.int64)
    edge = (1 + torch.arange(slots, dtype=torch.float64) / slots)[None, None, :] * torch.exp2(
        (floor_binade[:, None] + relative[None, :]).to(torch.float64))[..., None]
    for step in range(candidates.shape[1]):
        top_binade = (top_field - candidates[:, step] - floor_binade)[:, None, None]  # relative
        maximum = (1 + top_slot / slots) * torch.exp2(
            (top_field - candidates[:, step]).to(torch.float64))[:, None, None]
        above = (relative[None, :, None] > top_binade) | (
            (relative[None, :, None] == top_binade) & (torch.arange(slots) >= top_slot))
        gap = (edge - maximum).clamp(min=0)
        saturated = second_sum + 2 * gap * first_sum + number * gap.square()
        result[:, step] = torch.where(above, saturated, within_sum).sum(dim=(1, 2))
    if small_values:
        values, owners = torch.cat(small_values), torch.cat(small_rows)
        for step in range(candidates.shape[1]):
            rounded = nearest_rounder(fmt, candidates[owners, step])(values)
            result[:, step] += torch.bincount(owners, (rounded - values).square(), count)
    return result


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
    amax = _finite_amax(rows)
    best = max_bias_for_amax(amax, fmt)
    if method == "mse" and rows.shape[1]:
        _, high = valid_bias_range(fmt)
        widest = best
        fitted = torch.isfinite(amax.cpu()) & (amax.cpu() > 0)
        candidates = torch.stack([torch.where(fitted, (widest + step).clamp(max=high), widest)
                                  for step in range(search_radius + 1)], dim=1)
        errors = candidate_errors(rows, fmt, candidates)
        best_error = errors[:, 0]
        for step in range(1, search_radius + 1):  # ties keep the smaller bias (wider range)
            better = errors[:, step] < best_error
            best = torch.where(better, candidates[:, step], best)
            best_error = torch.where(better, errors[:, step], best_error)
    if axis is None:
        return int(best[0])
    return best
