"""Second moments of a layer's input, ``H = E[x x^T]``, per group of a (grouped) convolution.

``x`` is one row of what the layer multiplies by its weight: for Linear the input's last
dimension (``in_features``); for a recurrent layer (LSTM/GRU/RNN and cells) the same, the vector
its first-layer input matrices ``weight_ih_l0`` (and ``_reverse``) multiply at one step; for
Conv1d/2d the unfolded patch of one group (``C_in/groups x kernel`` values at one output
position). ``H`` (float64, shape ``(groups, d, d)``) is what
error-compensating weight rounding needs: the expected squared output error of a weight error
``e`` is ``e^T H e`` per output.

Streaming and bounded: each call adds at most ``max_rows`` rows per group (a seeded random
choice of positions, fewer for very wide layers so that at most ``max_values`` values are
gathered), so memory is at most ``groups x d x d`` float64 whatever the calibration size (a wide
layer keeps the upper half only, see ``_BAND``). Non-finite inputs are
not filtered here: the observers of the same pass refuse them before the moments are used.
Convolutions are unfolded with the layer's own stride, padding and dilation from the input the
layer receives; a subclass that pads inside its forward (TF "same" padding) is seen without that
padding, which leaves out the border patches only. Conv3d is not supported (``supports`` says so).
"""

from __future__ import annotations

import torch
from torch import nn

from hfp8 import distributed
from hfp8.data.batches import reseed_for_batch

__all__ = ["InputMoments", "moment_bytes", "supports"]


_VECTOR_INPUTS = (nn.Linear, nn.RNNBase, nn.RNNCellBase)  # rows are the input's last dimension


def supports(layer: nn.Module) -> bool:
    return isinstance(layer, (*_VECTOR_INPUTS, nn.Conv1d, nn.Conv2d)) and \
        getattr(layer, "padding_mode", "zeros") == "zeros" and \
        not isinstance(getattr(layer, "padding", 0), str)


def _groups_and_width(layer: nn.Module) -> tuple[int, int]:
    """(groups, d): ``d`` is in_features, a recurrent layer's input_size, or C_in/groups x
    kernel."""
    if isinstance(layer, nn.Linear):
        return 1, layer.in_features
    if isinstance(layer, (nn.RNNBase, nn.RNNCellBase)):
        return 1, layer.input_size
    return layer.groups, layer.weight[0].numel()


# Wide layers keep only the upper part of their symmetric moment, in bands of _BAND rows: band
# ``i`` holds rows ``[i B, (i+1) B)`` from column ``i B`` on (``d (d + B) / 2`` values instead of
# ``d^2``: 0.53 of the square at d = 4096). Each batch computes just those bands
# (``x[:, band]^T x[:, i B:]``), about half the multiply-adds of the whole product (measured
# 0.64-0.84x its time at d = 384..4096 on 512-4096 rows, 2 threads), and the square is put
# together, mirrored, only when compensated rounding takes it. Each entry is the same dot product
# over the same rows as in the whole product: a BLAS may order its sums by the product's shape,
# but with torch 2.13's CPU build the quantized MobileNetV2 and 10M decoder came out bit for bit
# the same. A layer narrower than two bands keeps the whole square.
_BAND = 256


def _bands(width: int) -> list[tuple[int, int]]:
    """(first row, end row) of each stored band; a narrow layer's one band is the square."""
    if width < 2 * _BAND:
        return [(0, width)]
    return [(start, min(start + _BAND, width)) for start in range(0, width, _BAND)]


def moment_bytes(layer: nn.Module) -> int:
    """Bytes of ``layer``'s float64 second moments as accumulated: ``8 groups d^2`` for a
    narrow layer, about ``8 groups d (d + 256) / 2`` for a wide one (the upper bands only)."""
    groups, width = _groups_and_width(layer)
    return 8 * groups * sum((stop - start) * (width - start) for start, stop in _bands(width))


_CHUNK = 1 << 18  # values per step of a float32 -> float64 sum: a 2 MiB temporary, in cache


def _add_into(total: torch.Tensor, moment: torch.Tensor) -> None:
    """``total += moment`` (float64 += float32, the same values as ``total + moment.double()``)
    in cache-sized chunks: measured 4x faster on a 4096^2 moment than one mixed-dtype ``add_``
    or a whole float64 copy (which also faults in fresh pages on every batch)."""
    flat_total, flat = total.view(-1), moment.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        flat_total[start:start + _CHUNK].add_(flat[start:start + _CHUNK].double())


def _pick(count: int, limit: int, generator: torch.Generator) -> torch.Tensor | None:
    return None if count <= limit else torch.randperm(count, generator=generator)[:limit]


def _rows(layer: nn.Module, x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """``(groups, rows, d)``: at most ``limit`` input rows of one call, chosen at random. For a
    convolution only the chosen patches are gathered, tap by tap, straight from the input:
    neither a padded copy nor the unfolded input is ever made (a zero-padded tap reads a
    clamped position and is set to 0)."""
    if isinstance(layer, _VECTOR_INPUTS):
        flat = x.reshape(-1, x.shape[-1])
        pick = _pick(flat.shape[0], limit, generator)
        return (flat if pick is None else flat[pick.to(flat.device)]).unsqueeze(0)
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        padding, dilation = (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        kernel, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    n, _, height, width = x.shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    pick = _pick(n * out_h * out_w, limit, generator)
    if pick is None:
        pick = torch.arange(n * out_h * out_w)
    pick = pick.to(x.device)
    sample, position = pick // (out_h * out_w), pick % (out_h * out_w)
    taps_h = torch.arange(kernel[0], device=x.device) * dilation[0]
    taps_w = torch.arange(kernel[1], device=x.device) * dilation[1]
    # input coordinates of every (row, tap), taps in the weight's (kh, kw) order
    rows_h = ((position // out_w) * stride[0] - padding[0])[:, None, None] + taps_h[None, :, None]
    rows_w = ((position % out_w) * stride[1] - padding[1])[:, None, None] + taps_w[None, None, :]
    rows_h, rows_w = (t.expand(-1, kernel[0], kernel[1]).reshape(len(pick), -1)
                      for t in (rows_h, rows_w))
    inside = (rows_h >= 0) & (rows_h < height) & (rows_w >= 0) & (rows_w < width)
    spots = rows_h.clamp(0, height - 1) * width + rows_w.clamp(0, width - 1)
    # (rows, taps, C), a fresh tensor: two index tensors on the flattened map instead of three
    # on (sample, h, w), the same values (MobileNetV2's depthwise layers: 0.76 -> 0.56 s per
    # batch of 32 under load, measured side by side)
    values = x.reshape(n, x.shape[1], height * width)[sample[:, None], :, spots]
    values.masked_fill_(~inside[..., None], 0.0)
    groups = layer.groups
    if groups == x.shape[1]:  # depthwise: (C, rows, taps) is the layout
        return values.permute(2, 0, 1).contiguous()
    # one row per group, (C/groups x kh x kw) as the weight's inputs are laid out, contiguous
    # per group: batched matrix products on strided rows are many times slower
    values = values.reshape(len(pick), values.shape[1], groups, -1).permute(2, 0, 3, 1)
    return values.reshape(groups, len(pick), -1).contiguous()


class InputMoments:
    """Forward pre-hook state: ``observe(x)`` adds rows, ``hessian()`` returns ``E[x x^T]``."""

    def __init__(self, layer: nn.Module, max_rows: int = 4096, seed: int = 0,
                 max_values: int = 1 << 22) -> None:
        if not supports(layer):
            raise ValueError(f"{type(layer).__name__} input moments are not supported")
        self.layer = layer
        # rows per call: at most max_rows, and at most max_values gathered values (a depthwise
        # layer of 960 channels needs few rows per channel for its 9 x 9 moments)
        groups, width = _groups_and_width(layer)
        width *= groups
        self.max_rows = min(max_rows, max(256, max_values // max(width, 1)))
        self.seed, self._batch = seed, None
        self.generator = torch.Generator().manual_seed(seed)
        self.bands: list[torch.Tensor] | None = None  # float64 sums, see _BAND
        self.count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        reseed_for_batch(self)  # the same rows of a batch on whichever rank runs it
        rows = _rows(self.layer, x.detach().float(), self.max_rows, self.generator)
        columns, width = rows.transpose(1, 2), rows.shape[2]
        bands = [torch.bmm(columns[:, start:stop], rows[:, :, start:]).cpu()
                 for start, stop in _bands(width)]
        if self.bands is None:
            self.bands = [band.double() for band in bands]
        else:
            for total, band in zip(self.bands, bands):
                _add_into(total, band)
        self.count += rows.shape[1]

    def reduce(self) -> None:
        """Sum with the other ranks' moments of this layer (no-op without a process group)."""
        if not distributed.active():
            return
        groups, width = _groups_and_width(self.layer)
        bands = self.bands if self.bands is not None else \
            [torch.zeros(groups, stop - start, width - start, dtype=torch.float64)
             for start, stop in _bands(width)]
        for band in bands:
            distributed.all_reduce(band)
        count = distributed.all_reduce(torch.tensor(float(self.count), dtype=torch.float64))
        self.bands, self.count = (bands, int(count)) if int(count) else (None, 0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(groups, d, d)``: the shape of :meth:`hessian`."""
        groups, width = _groups_and_width(self.layer)
        return groups, width, width

    @property
    def observed(self) -> bool:
        return self.bands is not None and self.count > 0

    def hessian(self) -> torch.Tensor | None:
        """``(groups, d, d)`` float64, or None if nothing was observed (a wide layer's square is
        put together from its bands, mirrored)."""
        if not self.observed:
            return None
        if len(self.bands) == 1:
            return self.bands[0] / self.count
        square = torch.empty(self.shape, dtype=torch.float64)
        width = square.shape[2]
        for band, (start, stop) in zip(self.bands, _bands(width)):
            torch.div(band, self.count, out=square[:, start:stop, start:])
            square[:, stop:, start:stop] = square[:, start:stop, stop:].transpose(1, 2)
        return square

    def reversed_square(self, dtype: torch.dtype, release: bool) -> torch.Tensor:
        """``P H P`` (``P``: the order reversal) in ``dtype``, what compensated rounding factors
        (:func:`hfp8.ptq.weight_rounding.reversed_square` of :meth:`hessian`, made here from the
        bands without the float64 square): the same diagonal and lower triangle, bit for bit; a
        wide layer's upper triangle is 0 outside the bands' diagonal blocks (the factorization
        never reads it). ``release``: the accumulator is emptied, each band released as it goes
        in."""
        bands, count = self.bands, self.count
        if release:
            self.bands, self.count = None, 0
        if len(bands) == 1:
            return (bands[0] / count).to(dtype).flip((-1, -2))
        reversed_ = torch.zeros(self.shape, dtype=dtype)
        width = reversed_.shape[2]
        for index, (start, stop) in enumerate(_bands(width)):
            band = bands[index]
            if release:
                bands[index] = None
            # H[start:stop, start:] lands, reversed, in rows d-stop..d-start, columns 0..d-start
            reversed_[:, width - stop:width - start, :width - start] = \
                (band / count).to(dtype).flip((-1, -2))
            del band
        return reversed_
