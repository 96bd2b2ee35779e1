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
of a depthwise one), with its own ``H``. Columns are processed in blocks of ``BLOCK`` (the lazy
batch update of GPTQ), from one Cholesky factor of ``H`` and no inverse (``_round_columns``
says why that is the same rounding), with ``DAMPING`` times the mean diagonal added to ``H``
(inputs that never vary get ``H_jj = 1`` and weight 0, which is on the grid).

The moments are summed in float64; the factorization and the column loop run in float32
(``WORK_DTYPE``; float64 for float64 weights, or at a bias float32 cannot round at), as GPTQ
implementations do: 1.4x faster on a 4096-wide layer. Against the float64 algebra, 3,370 of
ImageNet MobileNetV2's 3.47M weights round to the other neighbour (near-ties), and the test
against the paper's float64 loop allows exactly float32's error (tests/ptq).
"""

from __future__ import annotations

import torch

from hfp8._runs import runs_within
from hfp8.numerics.fake_quant import nearest_rounder, rounding_dtype
from hfp8.numerics.formats import FloatFormat

__all__ = ["compensated_rounding", "compensated_rounding_many", "rounded_runs", "DAMPING",
           "BLOCK", "WORK_BYTES"]

DAMPING = 0.01
BLOCK = 128
FLIP_ROWS = 256  # rows of the factor reordered at a time (_feedback)
INNER = 16  # columns of a sub-block (measured: 8-32 alike, 128 1.6x slower at d = 1024)
# work space of one run of side-by-side weights (chosen with pipeline.MOMENTS_BYTES: see there)
WORK_BYTES = 128 << 20
WORK_DTYPE = torch.float32  # of the factorization and the column loop (module docstring)


def reversed_square(hessian: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``P H P`` (``P``: the order reversal) in ``dtype``, a fresh tensor: what :func:`_feedback`
    factors (it reads the diagonal and the lower triangle, that is, ``H``'s upper one)."""
    return hessian.cpu().to(dtype).flip((-1, -2))  # flip copies: always a fresh tensor


def _feedback(squares: list, weight: torch.Tensor, out: torch.Tensor) -> None:
    """Writes GPTQ's error feedback into ``out`` as one unit lower-triangular ``G`` per group
    (``(groups, d, d)``), from ``reversed_ = P H P``, the one tensor of ``squares``
    (:func:`reversed_square`; only its diagonal and lower triangle are read, and it is damped
    in place); zeroes ``weight`` columns of inputs that never vary (in place). ``squares`` is
    emptied (the caller's frame would otherwise keep the square alive), so the square is freed
    once factored: a layer's factorization holds two squares (the factor and ``out``), not
    four.

    With ``P`` the order reversal and ``P H P = L L^T`` (lower Cholesky of the damped ``H``),
    ``A = P L P`` is upper triangular with ``A A^T = H``; GPTQ's factor is ``U = A^-1``
    (``U^T U = H^-1``). ``G[k, j] = A[j, k] / A[k, k]`` for ``j < k``. One factorization and no
    inverse: the loop below reads ``A`` where GPTQ reads ``A^-1``."""
    reversed_ = squares.pop()
    diagonal = reversed_.diagonal(dim1=1, dim2=2)  # in reversed order
    dead = diagonal == 0
    diagonal[dead] = 1.0
    weight.masked_fill_(dead.flip(-1)[:, None, :], 0.0)
    # the mean in the original order (the damping, bit for bit, of the unreversed form)
    damping = DAMPING * diagonal.flip(-1).mean(dim=1, keepdim=True)
    diagonal += damping
    for attempt in range(6):  # more damping if H is not numerically positive definite
        lower, info = torch.linalg.cholesky_ex(reversed_)
        if not bool(info.any()):
            del reversed_, diagonal
            # A^T = P L^T P, row-major as the loop reads it, copied a block of rows at a time
            # (a flip copies: whole, it would be one more square)
            transposed, inputs = lower.transpose(-1, -2), out.shape[-1]
            for start in range(0, inputs, FLIP_ROWS):
                stop = min(start + FLIP_ROWS, inputs)
                out[:, start:stop] = transposed[:, inputs - stop:inputs - start].flip((-1, -2))
            del lower, transposed
            out.div_(out.diagonal(dim1=1, dim2=2).clone().unsqueeze(-1))
            return
        diagonal += damping * 10 ** attempt
    raise ValueError("input second moments are not positive definite, even damped")


def _round_columns(work: torch.Tensor, feedback: torch.Tensor, round_values) -> torch.Tensor:
    """GPTQ's loop on ``work`` (``(groups, rows, d)``, float32 or float64) under ``feedback``
    (:func:`_feedback`), rounded in place and returned.

    GPTQ rounds column ``k`` at ``w~_k = w_k - sum_{j<k} U[j, k] (w~_j - q_j) / U[j, j]`` (each
    rounding error pushed onto the columns not yet rounded). Unrolled, ``w - q = E U`` with
    ``E[:, j] = (w~_j - q_j) / U[j, j]``, so ``E = (w - q) A`` and the same ``w~`` reads
    ``w~_k = w_k + sum_{j<k} G[k, j] (w_j - q_j)``: each column pulls the errors of the columns
    before it (Babai's nearest-plane algorithm on the basis ``A``; the same rounding to the
    work's precision). Lazily: columns in blocks of ``BLOCK``, each pulling the errors of all
    earlier blocks in one matrix product, and within a block sub-blocks of ``INNER`` (the
    rank-1 updates are memory-bound; sub-blocks keep them small). Columns are handled transposed
    (``(groups, columns, rows)``) so that each column is contiguous."""
    groups, rows, inputs = work.shape
    errors = torch.empty(groups, inputs, rows, dtype=work.dtype)  # w - q, transposed
    for start in range(0, inputs, BLOCK):
        stop = min(start + BLOCK, inputs)
        original = work[..., start:stop].transpose(1, 2).contiguous()  # (groups, width, rows)
        block = original.clone()
        if start:
            block.baddbmm_(feedback[:, start:stop, :start], errors[:, :start])
        block_errors = errors[:, start:stop]
        for first in range(0, stop - start, INNER):
            last = min(first + INNER, stop - start)
            if first:
                block[:, first:last].baddbmm_(
                    feedback[:, start + first:start + last, start:start + first],
                    block_errors[:, :first])
            for j in range(first, last):
                rounded = round_values(block[:, j])
                block[:, j] = rounded
                torch.sub(original[:, j], rounded, out=block_errors[:, j])
                if j + 1 < last:  # the rest of the sub-block: one rank-1 update per group
                    block[:, j + 1:last].baddbmm_(
                        feedback[:, start + j + 1:start + last, start + j:start + j + 1],
                        block_errors[:, j:j + 1])
        work[..., start:stop] = block.transpose(1, 2)
    return work


def _row_biases(exponent_bias, groups: int, rows: int) -> torch.Tensor:
    """``(groups, rows)`` int64: the layer's bias, or each output channel's."""
    bias = torch.as_tensor(exponent_bias).detach().to("cpu", torch.int64)
    return bias.expand(groups, rows) if bias.dim() == 0 else bias.reshape(groups, rows)


def compensated_rounding_many(problems: list[tuple], fmt: FloatFormat,
                              work_bytes: int = WORK_BYTES) -> list[torch.Tensor]:
    """:func:`compensated_rounding` of several weights at once: ``problems`` is a list of
    ``(weight, hessian, exponent_bias)``; see :func:`rounded_runs`."""
    results: list[torch.Tensor | None] = [None] * len(problems)
    for index, rounded in rounded_runs(list(problems), fmt, work_bytes):
        results[index] = rounded
    return results


@torch.no_grad()
def rounded_runs(problems: list[tuple | None], fmt: FloatFormat, work_bytes: int = WORK_BYTES):
    """Yields ``(index, rounded weight)`` for every ``(weight, hessian, exponent_bias)`` of
    ``problems``, run by run (``hessian``: a tensor, or a callable with its ``shape`` that
    makes :func:`reversed_square` of it in the dtype it is given, called when its run
    starts). Weights of the same shape per group (``rows`` x ``d``) are rounded side by side,
    in one column loop for all (each group still with its own ``H``): the loop's cost is per
    column, and a network has many layers of few distinct shapes. A run holds at
    most ``work_bytes`` of work space (weights, errors and feedback, float32 or float64; one
    weight alone may exceed it), and ``problems`` is consumed: each entry is set to None as its
    run starts, so the caller, writing each result back as it comes, holds one run's work space
    and no more. The results equal those of one call per weight (the groups of a run never
    mix)."""
    by_shape: dict[tuple, list[tuple[int, int, int]]] = {}  # (d, rows, dtype) -> shapes
    for index, (weight, hessian, exponent_bias) in enumerate(problems):
        groups, inputs = hessian.shape[0], hessian.shape[1]
        rows = weight.shape[0] // groups
        if weight.numel() != groups * rows * inputs:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match moments of "
                             f"shape {tuple(hessian.shape)}")
        # float32 where rounding at the biases is exact in it (E4M3: biases -91..127; a weight
        # of magnitude 1 gets about 7), float64 for float64 weights
        dtype = rounding_dtype(fmt, exponent_bias, torch.promote_types(weight.dtype, WORK_DTYPE))
        by_shape.setdefault((inputs, rows, dtype), []).append((index, groups, rows))
    for (inputs, rows, dtype), shapes in by_shape.items():
        # work of a weight: itself (rounded in place), its errors and its feedback
        def work_size(shape, size=dtype.itemsize, inputs=inputs):
            return size * shape[1] * inputs * (2 * shape[2] + inputs)
        for run in runs_within(shapes, work_size, work_bytes):
            total = sum(groups for _, groups, _ in run)
            # the run's weights side by side, written in place (no concatenated copies)
            work = torch.empty(total, rows, inputs, dtype=dtype)
            feedback = torch.empty(total, inputs, inputs, dtype=dtype)
            biases = torch.empty(total, rows, dtype=torch.int64)
            targets, offset = [], 0
            for i, groups, _ in run:
                weight, hessian, exponent_bias = problems[i]
                problems[i] = None  # the second moments can go once their feedback is made
                mine = slice(offset, offset + groups)
                work[mine] = weight.detach().reshape(groups, rows, inputs)
                squares = [hessian(dtype) if callable(hessian) else
                           reversed_square(hessian, dtype)]
                del hessian
                _feedback(squares, work[mine], feedback[mine])
                biases[mine] = _row_biases(exponent_bias, groups, rows)
                targets.append((i, mine, weight.shape, weight.device, weight.dtype))
                offset += groups
            rounded = _round_columns(work, feedback, nearest_rounder(fmt, biases, dtype))
            del feedback
            for i, mine, shape, device, weight_dtype in targets:
                yield i, rounded[mine].reshape(shape).to(device, weight_dtype)


def compensated_rounding(weight: torch.Tensor, hessian: torch.Tensor, fmt: FloatFormat,
                         exponent_bias) -> torch.Tensor:
    """``weight`` (Conv/Linear layout, ``out`` first) rounded onto ``fmt`` at
    ``exponent_bias`` (an int, or one per output channel) with error compensation under
    ``hessian`` (``(groups, d, d)``, ``d`` = the weight's inputs per group). Same dtype and
    shape as ``weight``; every value is on the grid."""
    return compensated_rounding_many([(weight, hessian, exponent_bias)], fmt)[0]
