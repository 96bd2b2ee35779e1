"""Error-compensating rounding of a weight onto its FP8 grid (GPTQ/OBQ-style).

Round-to-nearest treats each weight alone. With the layer's input second moments
``H = E[x x^T]`` (:mod:`hfp8.calibration.input_moments`), the expected squared output error of
a weight-row error ``e`` is ``e^T H e``; rounding the inputs of a row one after another and
moving each rounding error onto the weights not yet rounded, in proportion to the inverse
Hessian (Frantar et al., GPTQ, 2022; the optimal brain quantizer update), keeps that error far
smaller. This is what a depthwise 3x3 edge detector needs: its taps nearly cancel on flat
regions, and rounding each tap on its own breaks the cancellation.

Every weight still lands on the layer's grid (the format at the layer's exponent bias, or at
each output channel's bias): only which neighbour each weight rounds to changes, so export and
bit-exact verification are untouched. Per group of a grouped convolution (per output channel
of a depthwise one), with its own ``H``. Rows are processed in blocks of ``BLOCK`` columns
(the lazy batch update of GPTQ); the algebra runs in float64 with ``DAMPING`` times the mean
diagonal added to ``H`` (inputs that never vary get ``H_jj = 1`` and weight 0, which is on the
grid).
"""

from __future__ import annotations

import torch

from hfp8.ptq.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.ptq.formats import FloatFormat

__all__ = ["compensated_rounding", "DAMPING", "BLOCK"]

DAMPING = 0.01
BLOCK = 128


def _rounder(fmt: FloatFormat, exponent_bias: torch.Tensor, groups: int, rows: int):
    """``round(values)`` for values of shape ``(groups, rows, k)``: each row (an output
    channel) on its own bias when ``exponent_bias`` has one per channel."""
    bias = torch.as_tensor(exponent_bias)
    if bias.dim() == 0:
        at_bias = fmt.with_bias(int(bias))
        return lambda values: fake_quantize(values, at_bias)
    per_row = bias.reshape(groups * rows)

    def round_rows(values):
        flat = values.reshape(groups * rows, -1)
        return fake_quantize_per_channel(flat, fmt, per_row, axis=0).reshape(values.shape)
    return round_rows


def _inverse_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping)^-1`` per group; zeroes ``weight`` columns of
    inputs that never vary (in place)."""
    hessian = hessian.clone()
    diagonal = hessian.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    weight.masked_fill_(dead[:, None, :], 0.0)
    damping = DAMPING * diagonal.mean(dim=1, keepdim=True)
    diagonal += damping
    for attempt in range(6):  # more damping if H is not numerically positive definite
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
            return torch.linalg.cholesky(inverse, upper=True)
        except RuntimeError:
            diagonal += damping * 10 ** attempt
    raise ValueError("input second moments are not positive definite, even damped")


@torch.no_grad()
def compensated_rounding(weight: torch.Tensor, hessian: torch.Tensor, fmt: FloatFormat,
                         exponent_bias) -> torch.Tensor:
    """``weight`` (Conv/Linear layout, ``out`` first) rounded onto ``fmt`` at
    ``exponent_bias`` (an int, or one per output channel) with error compensation under
    ``hessian`` (``(groups, d, d)``, ``d`` = the weight's inputs per group). Same dtype and
    shape as ``weight``; every value is on the grid."""
    groups, inputs = hessian.shape[0], hessian.shape[1]
    rows = weight.shape[0] // groups
    if weight.numel() != groups * rows * inputs:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match moments of shape "
                         f"{tuple(hessian.shape)}")
    work = weight.detach().double().reshape(groups, rows, inputs).clone()
    factor = _inverse_factor(hessian.double(), work)
    round_values = _rounder(fmt, exponent_bias, groups, rows)
    result = torch.empty_like(work)
    for start in range(0, inputs, BLOCK):
        stop = min(start + BLOCK, inputs)
        block = work[..., start:stop].clone()
        errors = torch.empty_like(block)
        block_factor = factor[:, start:stop, start:stop]
        for j in range(stop - start):
            column = block[..., j]
            rounded = round_values(column.unsqueeze(-1)).squeeze(-1)
            result[..., start + j] = rounded
            error = (column - rounded) / block_factor[:, j, j].unsqueeze(-1)
            block[..., j:] -= error.unsqueeze(-1) * block_factor[:, j, j:].unsqueeze(1)
            errors[..., j] = error
        work[..., stop:] -= errors @ factor[:, start:stop, stop:]
    return result.reshape(weight.shape).to(weight.dtype)
