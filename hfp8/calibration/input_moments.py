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
gathered), so memory is ``groups x d x d`` whatever the calibration size. Non-finite inputs are
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

__all__ = ["InputMoments", "supports", "moment_bytes"]


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


def moment_bytes(layer: nn.Module) -> int:
    """Bytes of ``layer``'s float64 second moments: ``8 * groups * d^2``."""
    groups, width = _groups_and_width(layer)
    return 8 * groups * width * width


# Column strips of the Gram product: each strip computes only its part on or above the diagonal
# and the rest is mirrored, about half the multiply-adds of the full product (measured 0.64-0.84x
# its time at d = 384..4096 on 512-4096 rows, 2 threads). Each entry is the same dot product over
# the same rows as in the full product; a BLAS may still order its sums by the product's shape,
# but with torch 2.13's CPU build the quantized MobileNetV2 and 10M decoder came out bit for bit
# the same as with the full product.
_STRIP = 256


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` per group: ``(groups, n, d)`` -> ``(groups, d, d)``, symmetric."""
    width = rows.shape[2]
    columns = rows.transpose(1, 2)
    if width < 2 * _STRIP:
        return torch.bmm(columns, rows)
    gram = rows.new_empty(rows.shape[0], width, width)
    for start in range(0, width, _STRIP):
        stop = min(start + _STRIP, width)
        torch.bmm(columns[:, start:stop], rows[:, :, start:], out=gram[:, start:stop, start:])
        gram[:, stop:, start:stop] = gram[:, start:stop, stop:].transpose(1, 2)
    return gram


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
        self.sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        reseed_for_batch(self)  # the same rows of a batch on whichever rank runs it
        rows = _rows(self.layer, x.detach().float(), self.max_rows, self.generator)
        moment = _gram(rows).cpu()
        if self.sum is None:
            self.sum = moment.double()
        else:
            _add_into(self.sum, moment)
        self.count += rows.shape[1]

    def reduce(self) -> None:
        """Sum with the other ranks' moments of this layer (no-op without a process group)."""
        if not distributed.active():
            return
        groups, width = _groups_and_width(self.layer)
        total = self.sum if self.sum is not None else torch.zeros(groups, width, width,
                                                                   dtype=torch.float64)
        distributed.all_reduce(total)
        count = distributed.all_reduce(torch.tensor(float(self.count), dtype=torch.float64))
        self.sum, self.count = (total, int(count)) if int(count) else (None, 0)

    def hessian(self) -> torch.Tensor | None:
        """``(groups, d, d)`` float64, or None if nothing was observed."""
        return None if self.sum is None or self.count == 0 else self.sum / self.count

    def take_hessian(self) -> torch.Tensor | None:
        """:meth:`hessian` without a copy: the accumulated sum is divided in place and handed
        over (this accumulator is empty afterwards)."""
        if self.sum is None or self.count == 0:
            return None
        hessian, self.sum, self.count = self.sum.div_(self.count), None, 0
        return hessian
