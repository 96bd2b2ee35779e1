"""Streaming observer of a layer's inputs: exact max, and a histogram for MSE bias search.

Memory is fixed whatever the number of calibration samples: one exact running ``max|x|`` and a
histogram of ``|x|`` over float32 bit patterns. Bin ``k`` holds the magnitudes whose float32
bits shifted right by 16 equal ``k``: one bin per (exponent, top 7 mantissa bits), 32768 bins.
For each bin it keeps the count, ``sum |x|`` and ``sum x^2`` (float64).

Why this binning is exact for formats with at most 6 mantissa bits: grid points, rounding
midpoints, ``max_finite`` and half the smallest subnormal all fall on bin edges, so every value in
a bin rounds to the same grid point ``q`` (a value on the bin's left edge may be a tie, whose
error is the same either way). The bin's squared error is then exactly
``sum (|x| - q)^2 = S2 - 2 q S1 + n q^2``, and the histogram gives the same ``mse`` bias as
:func:`hfp8.select_exponent_bias` on the whole data. For wider mantissas it is an approximation.

To keep calibration cheap on large activations, each :meth:`observe` call puts at most
``sample_size`` values, drawn uniformly with replacement, into the histogram; smaller tensors go
in whole. The max is always exact over every value. Within a pass the draw is made once per
batch and seed (``sample_size`` integers ``r`` uniform in ``[0, 2^31)`` from a generator seeded by
the batch's index over the whole data set, so that a batch draws the same values on whichever
rank runs it) and every observer of that seed takes positions ``floor(r n / 2^31)`` of its
``n`` values from it: one draw serves all the points of a batch (drawing per point took 0.16 s
of a 1.4 s calibration pass over the 10M decoder, cProfile). Outside a pass each observer draws
from its own generator.
"""

from __future__ import annotations

import functools

import torch

from hfp8 import distributed
from hfp8.data.batches import current_batch
from hfp8.numerics.bias_selection import (
    BIAS_METHODS,
    DEFAULT_SEARCH_RADIUS,
    max_bias_for_amax,
    valid_bias_range,
)
from hfp8.numerics.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.numerics.formats import FloatFormat
from hfp8.numerics.sqnr import sqnr_db

__all__ = ["HistogramObserver"]

_SHIFT = 16
_BINS = 1 << (31 - _SHIFT)  # magnitudes only: 2^15 bins
_FIRST_NON_FINITE_BIN = 0x7F800000 >> _SHIFT  # +Inf and every NaN land at or above this bin
_DRAW_BITS = 31  # a shared draw serves tensors of up to 2^(63 - 31) values (int64 products)


@functools.lru_cache(maxsize=4)
def _batch_draw(seed: int, batch: int, size: int) -> torch.Tensor:
    """``size`` int64 values uniform in ``[0, 2^31)``, the same for every observer of ``seed``
    in batch ``batch`` (and on every rank); made once, never written to."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    return torch.randint(1 << _DRAW_BITS, (size,), generator=generator)


@functools.cache
def _bin_midpoints() -> torch.Tensor:
    """float32 midpoint of every finite bin (bit pattern ``k << 16 | 0x8000``); made once,
    never written to."""
    bins = torch.arange(_FIRST_NON_FINITE_BIN, dtype=torch.int64)
    return ((bins << _SHIFT) | (1 << (_SHIFT - 1))).to(torch.int32).view(torch.float32)


class HistogramObserver:
    """Sees tensors with :meth:`observe`; decides a bias with :meth:`exponent_bias`."""

    def __init__(self, sample_size: int = 1 << 16, seed: int = 0) -> None:
        self.sample_size = sample_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.amax = 0.0
        self.num_values = 0  # every value seen (finite or not)
        self.num_non_finite = 0  # NaN and +-Inf among them, counted exactly
        self.num_calls = 0
        self.counts = torch.zeros(_BINS, dtype=torch.float64)
        self.sums = torch.zeros(_BINS, dtype=torch.float64)
        self.squares = torch.zeros(_BINS, dtype=torch.float64)

    # -- seeing ----------------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        # Outside every __torch_function__ mode and subclass: the statistics are plain tensor
        # work, and an active mode (an attention owner's, hfp8.ptq.operand_sites) would see each
        # of its dozen ops in Python (measured: a pass over the 10M decoder 1.41 -> 1.34 s).
        with torch._C.DisableTorchFunction(), torch.no_grad():
            self._observe(x)

    def _observe(self, x: torch.Tensor) -> None:
        values = x.detach().reshape(-1)
        if values.numel() == 0:
            return
        self.num_calls += 1
        self.num_values += values.numel()
        low, high = torch.aminmax(values)  # one pass, no |x| temporary
        batch_max = torch.maximum(low.abs(), high.abs())
        if not torch.isfinite(batch_max):
            finite_mask = torch.isfinite(values)
            self.num_non_finite += int(values.numel() - finite_mask.sum())
            finite = values[finite_mask]
            batch_max = finite.abs().max() if finite.numel() else batch_max.new_zeros(())
        self.amax = max(self.amax, float(batch_max))
        if values.numel() > self.sample_size:
            # index_select: the same values as values[...], in half its time (65,536 of 524,288)
            positions = self._sample_positions(values.numel()).to(values.device)
            values = values.index_select(0, positions)
        magnitude = values.float().abs().cpu()
        bins = (magnitude.view(torch.int32) >> _SHIFT).to(torch.int64)
        as_double = magnitude.double()
        self.counts += torch.bincount(bins, minlength=_BINS).double()
        self.sums += torch.bincount(bins, weights=as_double, minlength=_BINS)
        self.squares += torch.bincount(bins, weights=as_double * as_double, minlength=_BINS)

    def _sample_positions(self, numel: int) -> torch.Tensor:
        """``sample_size`` positions in ``[0, numel)``, uniform with replacement: from the pass's
        shared draw of this batch (``floor(r numel / 2^31)``, off uniform by under
        ``numel / 2^31`` relative), or outside a pass from this observer's generator."""
        batch = current_batch()
        if batch is None or numel > 1 << (63 - _DRAW_BITS):
            return torch.randint(numel, (self.sample_size,), generator=self.generator)
        return (_batch_draw(self.seed, batch, self.sample_size) * numel) >> _DRAW_BITS

    def reduce(self) -> None:
        """Sum (and max) this observer with its namesakes on every other rank, in place: every
        rank then holds what one observer over all ranks' values would (no-op without a
        process group; see :mod:`hfp8.distributed`)."""
        if not distributed.active():
            return
        for tensor in (self.counts, self.sums, self.squares):
            distributed.all_reduce(tensor)
        scalars = torch.tensor([self.num_values, self.num_calls, self.num_non_finite],
                               dtype=torch.float64)
        distributed.all_reduce(scalars)
        self.num_values, self.num_calls, self.num_non_finite = (int(v) for v in scalars.tolist())
        self.amax = float(distributed.all_reduce(torch.tensor(self.amax, dtype=torch.float64), "max"))

    # -- deciding --------------------------------------------------------------------------------
    def _finite(self):
        cut = _FIRST_NON_FINITE_BIN
        return self.counts[:cut], self.sums[:cut], self.squares[:cut]

    def squared_error(self, fmt: FloatFormat) -> float:
        """Sum of squared rounding errors of the histogrammed finite values at ``fmt``."""
        return float(self.squared_errors(fmt, [fmt.exponent_bias])[0])

    def squared_errors(self, fmt: FloatFormat, biases: list[int]) -> torch.Tensor:
        """:meth:`squared_error` at each bias in ``biases`` (``fmt``'s own is not used), float64,
        all in one rounding of the bin midpoints: per bin ``S2 - 2 q S1 + n q^2``, over the
        occupied bins only (an empty bin adds exactly 0; a tensor fills a few thousand of the
        32768)."""
        counts, sums, squares = self._finite()
        occupied = counts.nonzero().squeeze(1)
        if occupied.numel() == 0:
            return torch.zeros(len(biases), dtype=torch.float64)
        counts, sums, squares = counts[occupied], sums[occupied], squares[occupied]
        midpoints = _bin_midpoints()[occupied].expand(len(biases), -1)
        q = fake_quantize_per_channel(midpoints, fmt, torch.tensor(biases), axis=0).double()
        return (squares - 2 * q * sums + counts * q * q).clamp_min(0).sum(dim=1)

    def exponent_bias(self, fmt: FloatFormat, method: str = "mse",
                      search_radius: int = DEFAULT_SEARCH_RADIUS) -> int:
        """Bias by ``method`` (as :func:`hfp8.select_exponent_bias`; ``fmt``'s own if nothing seen).
        ``"mse"``: the least squared error from the widest bias that holds ``amax`` up to
        ``search_radius`` finer ones (the widest on a tie)."""
        if method not in BIAS_METHODS:
            raise ValueError(f"method must be one of {BIAS_METHODS}, got {method!r}")
        if self.amax == 0.0 or method == "fixed":
            return fmt.exponent_bias
        widest = int(max_bias_for_amax(torch.tensor([self.amax]), fmt)[0])
        if method == "max":
            return widest
        _, high = valid_bias_range(fmt)
        candidates = list(range(widest, max(min(widest + search_radius, high), widest) + 1))
        return candidates[int(torch.argmin(self.squared_errors(fmt, candidates)))]

    def summary(self, fmt: FloatFormat) -> dict:
        """What rounding at ``fmt`` (bias included) does to the observed values.

        Fractions are over the histogrammed values (all of them, or the random sample).
        ``saturated``: |x| at or above max_finite (clipped, or exactly the max);
        ``flushed``: non-zero values that round to zero; ``sqnr_db``: 10 log10(sum x^2 / SSE).
        """
        counts, _, squares = self._finite()
        total = float(self.counts.sum())
        if total == 0:
            return {"values_seen": self.num_values, "calls": self.num_calls, "amax": self.amax}
        midpoints = _bin_midpoints()
        q = fake_quantize(midpoints, fmt)
        saturated = float(counts[midpoints > fmt.max_finite].sum())
        nonzero = torch.arange(len(counts)) > 0  # bin 0: zeros and float32 values below 2^-133
        flushed = float(counts[(q == 0) & nonzero].sum())
        error = self.squared_error(fmt)
        signal = float(squares.sum())
        # None: no rounding error at all (SQNR infinite), kept JSON-friendly.
        sqnr = sqnr_db(signal, error)
        return {
            "values_seen": self.num_values,
            "calls": self.num_calls,
            "values_histogrammed": int(total),
            "amax": self.amax,
            "saturated_fraction": saturated / total,
            "flushed_fraction": flushed / total,
            "zero_fraction": float(counts[0]) / total,
            "non_finite_fraction": float(self.counts[_FIRST_NON_FINITE_BIN:].sum()) / total,
            "non_finite_values": self.num_non_finite,
            "sqnr_db": sqnr,
        }
