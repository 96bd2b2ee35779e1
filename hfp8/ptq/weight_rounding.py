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

from hfp8.numerics.fake_quant import nearest_rounder
from hfp8.numerics.formats import FloatFormat

__all__ = ["compensated_rounding", "compensated_rounding_many", "DAMPING", "BLOCK"]

DAMPING = 0.01
BLOCK = 128


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


def _round_columns(work: torch.Tensor, factor: torch.Tensor, round_values) -> torch.Tensor:
    """The GPTQ loop on ``work`` (``(groups, rows, d)``, float64, consumed) under ``factor``
    (``(groups, d, d)``): column by column, each rounding error moved onto the columns not yet
    rounded; lazily, ``BLOCK`` columns at a time."""
    inputs = work.shape[-1]
    result = torch.empty_like(work)
    for start in range(0, inputs, BLOCK):
        stop = min(start + BLOCK, inputs)
        block = work[..., start:stop].clone()
        errors = torch.empty_like(block)
        block_factor = factor[:, start:stop, start:stop]
        diagonal = block_factor.diagonal(dim1=1, dim2=2)  # (groups, width)
        for j in range(stop - start):
            column = block[..., j]
            rounded = round_values(column)
            result[..., start + j] = rounded
            error = errors[..., j]
            torch.sub(column, rounded, out=error)
            error.div_(diagonal[:, j:j + 1])
            block[..., j:].sub_(error.unsqueeze(-1) * block_factor[:, j:j + 1, j:])
        work[..., stop:] -= errors @ factor[:, start:stop, stop:]
    return result


def _row_biases(exponent_bias, groups: int, rows: int) -> torch.Tensor:
    """``(groups, rows)`` int64: the layer's bias, or each output channel's."""
    bias = torch.as_tensor(exponent_bias).detach().to("cpu", torch.int64)
    return bias.expand(groups, rows) if bias.dim() == 0 else bias.reshape(groups, rows)


@torch.no_grad()
def compensated_rounding_many(problems: list[tuple], fmt: FloatFormat) -> list[torch.Tensor]:
    """:func:`compensated_rounding` of several weights at once: ``problems`` is a list of
    ``(weight, hessian, exponent_bias)``. Weights whose rows have the same width ``d`` are
    rounded side by side, in one column loop for all (each group still with its own ``H``; rows
    are padded with zeros, which round to zero and move no error): the loop's cost is per
    column, and a network has many layers of few distinct widths. The results equal those of one
    call per weight up to float64 summation order in the block updates."""
    results: list[torch.Tensor | None] = [None] * len(problems)
    by_width: dict[int, list[tuple[int, int, int]]] = {}  # d -> (index, groups, rows)
    for index, (weight, hessian, _) in enumerate(problems):
        groups, inputs = hessian.shape[0], hessian.shape[1]
        rows = weight.shape[0] // groups
        if weight.numel() != groups * rows * inputs:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match moments of "
                             f"shape {tuple(hessian.shape)}")
        by_width.setdefault(inputs, []).append((index, groups, rows))
    for inputs, shapes in by_width.items():
        padded_rows = max(rows for _, _, rows in shapes)
        works, factors, biases = [], [], []
        for i, groups, rows in shapes:
            weight, hessian, exponent_bias = problems[i]
            # a copy: dead columns are zeroed in it (a float64 weight would otherwise be
            # the caller's own tensor)
            work = weight.detach().double().reshape(groups, rows, inputs).cpu().clone()
            factors.append(_inverse_factor(hessian.double().cpu(), work))
            row_bias = _row_biases(exponent_bias, groups, rows)
            pad = padded_rows - rows
            works.append(torch.cat([work, work.new_zeros(groups, pad, inputs)], dim=1))
            biases.append(torch.cat([row_bias, row_bias[:, :1].expand(groups, pad)], dim=1))
        rounded = _round_columns(torch.cat(works), torch.cat(factors),
                                 nearest_rounder(fmt, torch.cat(biases)))
        offset = 0
        for i, groups, rows in shapes:
            weight = problems[i][0]
            mine = rounded[offset:offset + groups, :rows]
            results[i] = mine.reshape(weight.shape).to(weight.device, weight.dtype)
            offset += groups
    return results


def compensated_rounding(weight: torch.Tensor, hessian: torch.Tensor, fmt: FloatFormat,
                         exponent_bias) -> torch.Tensor:
    """``weight`` (Conv/Linear layout, ``out`` first) rounded onto ``fmt`` at
    ``exponent_bias`` (an int, or one per output channel) with error compensation under
    ``hessian`` (``(groups, d, d)``, ``d`` = the weight's inputs per group). Same dtype and
    shape as ``weight``; every value is on the grid."""
    return compensated_rounding_many([(weight, hessian, exponent_bias)], fmt)[0]
