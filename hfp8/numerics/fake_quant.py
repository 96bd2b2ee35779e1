"""Fake quantization: round a tensor onto a :class:`FloatFormat` grid, keep its dtype.

Round to nearest, ties to even, uses the classic "add and subtract a magic constant" identity,
done per element so that it covers every format (not only those torch has a dtype for)::

    p = max(2^floor(log2|x|), 2^(1 - b))       # binade of x, clamped to the subnormal range
    C = 1.5 * 2^(P - 1 - m) * p                  # P = 24 (float32) or 53 (float64) bits
    fq(x) = copysign((x + C) - C, x)

``x + C`` lands in the binade of ``C`` whose spacing is exactly the format's step ``p * 2^-m``, so
the float unit's own round-to-nearest-even performs the rounding; ``- C`` is exact. Saturation is
a clamp to ``+-max_finite`` before rounding (the max is on the grid). Everything stays in the
input's floating-point type, so the result is bit-exact, not an approximation.

Eagerly that is six elementwise passes over cache-sized blocks: clamp, the exponent field, its
clamp, ``add`` and ``sub`` with ``alpha = C / p`` (a power of two times 1.5, so ``alpha * p`` is
exact and folding the product into the sum changes nothing), copysign.
"""

from __future__ import annotations

import functools
import math

import torch

from hfp8.numerics.formats import FloatFormat

__all__ = ["fake_quantize", "fake_quantize_per_channel", "nearest_rounder", "rounding_dtype",
           "ROUNDING_MODES"]

ROUNDING_MODES = ("nearest", "stochastic")

# Work on blocks that stay in cache: every elementwise pass after the first then costs cache
# bandwidth, not memory bandwidth. 2^18 float32 = 1 MiB, split by torch across its threads.
_BLOCK = 1 << 18

_FLOAT_LAYOUT = {  # dtype -> (bits of precision P, integer view dtype, exponent-field mask)
    torch.float32: (24, torch.int32, 0x7F800000),
    torch.float64: (53, torch.int64, 0x7FF0000000000000),
}
_MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.float64: -1022}
_MAX_EXPONENT = {torch.float32: 127, torch.float64: 1023}


class _StraightThrough(torch.autograd.Function):
    """Returns the quantized tensor; the gradient passes through unchanged (identity)."""

    @staticmethod
    def forward(ctx, x, quantized):  # noqa: D401 - autograd signature
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _compute_dtype(dtype: torch.dtype, mantissa_bits: int, exponents: tuple[int, int]) -> torch.dtype:
    """float32 when every binade of the format is a normal float32 binade (the binade is read
    from the exponent field, which a float32 subnormal does not have) and the magic constant C
    is a normal float32 for every binade, else float64.

    ``exponents`` is (exponent of the smallest normal, exponent of the largest binade).
    """
    if dtype == torch.float64:
        return torch.float64
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {dtype}")
    low, high = exponents
    c_low = low + 23 - mantissa_bits
    c_high = high + 24 - mantissa_bits
    if low >= _MIN_NORMAL_EXPONENT[torch.float32] and c_low >= _MIN_NORMAL_EXPONENT[torch.float32] \
            and c_high <= _MAX_EXPONENT[torch.float32]:
        return torch.float32
    return torch.float64


def _round_nearest(x, out, scratch, sums, mantissa_bits, min_normal, max_finite) -> None:
    """Writes round-to-nearest-even of ``x`` into ``out``; ``scratch``/``sums`` are work space."""
    precision, int_dtype, exponent_mask = _FLOAT_LAYOUT[x.dtype]
    if torch.is_tensor(max_finite):
        torch.minimum(torch.maximum(x, -max_finite, out=out), max_finite, out=out)
    else:
        torch.clamp(x, -max_finite, max_finite, out=out)
    # p = 2^floor(log2|x|): keep only the exponent field of the bit pattern.
    torch.bitwise_and(out.view(int_dtype), exponent_mask, out=scratch.view(int_dtype))
    if torch.is_tensor(min_normal):
        torch.maximum(scratch, min_normal, out=scratch)
    else:
        scratch.clamp_min_(min_normal)
    magic_per_binade = 1.5 * 2.0 ** (precision - 1 - mantissa_bits)  # C = magic_per_binade * p
    torch.add(out, scratch, alpha=magic_per_binade, out=sums)
    sums.sub_(scratch, alpha=magic_per_binade)
    torch.copysign(sums, out, out=out)


def _round_stochastic(x, mantissa_bits, min_normal, max_finite, generator) -> torch.Tensor:
    """Rounds |x| down or up to its neighbours with probability proportional to proximity.

    With ``r = |x| / step`` and ``u ~ U[0, 1)`` on the 2^-24 (float32) or 2^-53 (float64) lattice,
    the result is ``(floor(r) + [u < frac(r)]) * step``: unbiased whenever ``frac(r)`` is a
    multiple of that lattice, otherwise biased by less than one lattice unit of ``step``.
    """
    _, int_dtype, exponent_mask = _FLOAT_LAYOUT[x.dtype]
    if torch.is_tensor(max_finite):
        clamped = torch.minimum(torch.maximum(x, -max_finite), max_finite)
    else:
        clamped = x.clamp(-max_finite, max_finite)
    magnitude = clamped.abs()
    binade = torch.bitwise_and(magnitude.view(int_dtype), exponent_mask).view(x.dtype)
    step = torch.maximum(binade, torch.as_tensor(min_normal, dtype=x.dtype, device=x.device))
    step = step * 2.0**-mantissa_bits
    ratio = magnitude / step
    lower = torch.floor(ratio)
    uniform = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    rounded = (lower + (uniform < ratio - lower).to(x.dtype)) * step
    return torch.copysign(rounded, clamped)


def _overflow_to_specials(x, result, fmt: FloatFormat, step_at_top) -> torch.Tensor:
    """Non-saturating conversion: values that round beyond max become Inf ("ieee") or NaN ("fn").

    The overflow tie ``max_finite + step_at_top / 2`` rounds to even like every other tie: to
    ``max_finite`` when its code is even (E4M3FN: 448 = S.1111.110, so 464 -> 448), else to the
    special (ieee E4M3: 240 = S.1110.111, so 248 -> Inf).
    """
    top_field, top_mantissa = fmt.largest_finite_fields()
    max_code_is_odd = (top_mantissa if fmt.mantissa_bits else top_field) % 2 == 1
    magnitude, threshold = x.abs(), fmt.max_finite + step_at_top / 2
    overflow = magnitude >= threshold if max_code_is_odd else magnitude > threshold
    special = torch.full_like(result, math.inf if fmt.specials == "ieee" else math.nan)
    return torch.where(overflow, torch.copysign(special, x), result)


def _round_in_blocks(source, result, rows, mantissa_bits, min_normal, max_finite,
                     sliced: bool) -> None:
    """Rounds ``source`` into ``result`` ``rows`` slices of dim 0 at a time, in one block's work
    space; ``sliced``: the bounds hold one entry per slice of dim 0, taken along with it."""
    scratch = torch.empty((min(rows, len(source)), *source.shape[1:]), dtype=source.dtype,
                          device=source.device)
    sums = torch.empty_like(scratch)
    for start in range(0, len(source), rows):
        mine = slice(start, min(start + rows, len(source)))
        size = mine.stop - start
        low, high = (min_normal[mine], max_finite[mine]) if sliced else (min_normal, max_finite)
        _round_nearest(source[mine], result[mine], scratch[:size], sums[:size], mantissa_bits,
                       low, high)


def _round(source, mantissa_bits, min_normal, max_finite, rounding, generator) -> torch.Tensor:
    """Rounds a contiguous tensor in the compute dtype, block by block (the work space is one
    block's): scalar parameters in blocks of ``_BLOCK`` values, parameters per slice of dim 0
    in blocks of whole slices; other per-channel (tensor) parameters broadcast over the whole
    tensor at once."""
    if rounding == "stochastic":
        return _round_stochastic(source, mantissa_bits, min_normal, max_finite, generator)
    result = torch.empty_like(source)
    per_slice = torch.is_tensor(max_finite) and max_finite.dim() > 0 and \
        max_finite.numel() == max_finite.shape[0] == source.shape[0]  # bounds per slice of dim 0
    if per_slice and source.numel() > _BLOCK:  # blocks of whole slices
        _round_in_blocks(source, result, max(1, _BLOCK // max(source[0].numel(), 1)),
                         mantissa_bits, min_normal, max_finite, sliced=True)
    elif torch.is_tensor(max_finite) or source.numel() <= _BLOCK:  # one block: no slicing
        _round_nearest(source, result, torch.empty_like(source), torch.empty_like(source),
                       mantissa_bits, min_normal, max_finite)
    else:  # blocks of _BLOCK values of the flat tensor
        _round_in_blocks(source.view(-1), result.view(-1), _BLOCK, mantissa_bits, min_normal,
                         max_finite, sliced=False)
    return result


def _check(x, rounding) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"fake_quantize needs a torch.Tensor, got {type(x).__name__}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def _finish(x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    result = result.to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, result)
    return result


def _top_exponent(fmt: FloatFormat) -> int:
    """Exponent of the binade holding ``max_finite``."""
    return math.frexp(fmt.max_finite)[1] - 1


@functools.lru_cache(maxsize=1024)
def _grid_constants(fmt: FloatFormat, dtype: torch.dtype) -> tuple[torch.dtype, int, float, float]:
    """(compute dtype, exponent of the top binade, smallest normal, max finite) of ``fmt`` for
    ``dtype`` inputs: cached, since a quantized model rounds at the same few formats on every
    call (computing them is a good part of a small tensor's rounding time)."""
    top = _top_exponent(fmt)
    compute = _compute_dtype(dtype, fmt.mantissa_bits, (1 - fmt.exponent_bias, top))
    return compute, top, fmt.smallest_normal, fmt.max_finite


def fake_quantize(
    x: torch.Tensor,
    fmt: FloatFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Round ``x`` onto the grid of ``fmt`` and return it in ``x``'s dtype, shape and device.

    * ``rounding="nearest"``: round to nearest, ties to even, subnormals included (exact).
    * ``rounding="stochastic"``: round to one of the two neighbouring grid points with
      probability proportional to proximity (unbiased inside the range; ``generator`` seeds it).
    * ``saturate=True``: finite values and +-Inf beyond ``max_finite`` become ``+-max_finite``.
      ``saturate=False`` follows IEEE/OCP instead: what rounds beyond the max becomes +-Inf for
      "ieee" and NaN for "fn"; "none" has no such codes and only saturates.
    * NaN stays NaN; the sign of zero is kept (``-tiny`` rounds to ``-0.0``).

    float16/bfloat16 inputs are computed in float32 and cast back (a grid value the input dtype
    cannot hold, far outside E4M3's range, is rounded once more by that cast). Gradients pass
    straight through (identity), for later training use.
    """
    _check(x, rounding)
    if not saturate and fmt.specials == "none":
        raise ValueError(f"{fmt} has no Inf or NaN codes: only saturating conversion exists")
    compute, top, min_normal, max_finite = _grid_constants(fmt, x.dtype)
    with torch.no_grad():
        source = x.detach().to(compute).contiguous()
        result = _round(source, fmt.mantissa_bits, min_normal, max_finite, rounding, generator)
        if not saturate:
            step_at_top = 2.0 ** (top - fmt.mantissa_bits)
            result = _overflow_to_specials(source, result, fmt, step_at_top)
    return _finish(x, result)


def fake_quantize_per_channel(
    x: torch.Tensor,
    fmt: FloatFormat,
    exponent_bias: torch.Tensor,
    axis: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` (saturating) with one exponent bias per slice along ``axis``.

    ``exponent_bias`` is a 1-D integer tensor of length ``x.shape[axis]``; slice ``i`` is rounded
    onto ``fmt.with_bias(exponent_bias[i])``. ``fmt``'s own bias is not used.
    """
    _check(x, rounding)
    biases = torch.as_tensor(exponent_bias).detach().to("cpu")
    if biases.dtype.is_floating_point and not torch.equal(biases, biases.round()):
        raise TypeError("exponent_bias must hold integers")
    biases = biases.to(torch.int64).reshape(-1)
    axis = axis % max(x.dim(), 1)
    if x.dim() == 0 or biases.numel() != x.shape[axis]:
        raise ValueError(
            f"need one exponent bias per slice along axis {axis}: got {biases.numel()} for shape "
            f"{tuple(x.shape)}"
        )
    if biases.numel() == 0:
        return _finish(x, x.detach().clone())
    compute = _compute_dtype_for_biases(x.dtype, fmt, biases)
    shape = [1] * x.dim()
    shape[axis] = -1
    min_normal, max_finite = (bound.reshape(shape).to(x.device)
                              for bound in _grid_bounds(fmt, biases, compute))
    with torch.no_grad():
        source = x.detach().to(compute).contiguous()
        result = _round(source, fmt.mantissa_bits, min_normal, max_finite, rounding, generator)
    return _finish(x, result)


def _compute_dtype_for_biases(dtype: torch.dtype, fmt: FloatFormat, biases: torch.Tensor):
    """:func:`_compute_dtype` for rounding at every bias in ``biases`` (CPU, int64): the extremes
    decide (every bias in between then also fits)."""
    low, high = int(biases.min()), int(biases.max())
    return _compute_dtype(dtype, fmt.mantissa_bits, (1 - high, _top_exponent(fmt.with_bias(low))))


def _grid_bounds(fmt: FloatFormat, biases: torch.Tensor, dtype: torch.dtype):
    """Elementwise ``2^(1 - b)`` (smallest normal) and ``max_finite`` of ``fmt`` at each integer
    bias ``b`` in ``biases`` (CPU, int64), in ``dtype``."""
    high = int(biases.max())
    min_normal = torch.ldexp(torch.ones(()), (1 - biases).double()).to(dtype)
    max_finite = torch.ldexp(torch.full((), fmt.with_bias(high).max_finite, dtype=torch.float64),
                             (high - biases).double()).to(dtype)
    return min_normal, max_finite


def rounding_dtype(fmt: FloatFormat, exponent_bias, dtype: torch.dtype = torch.float32):
    """``dtype`` if rounding onto ``fmt`` at every bias in ``exponent_bias`` (an int or a tensor
    of them) is exact in it (every grid value and midpoint representable), else float64."""
    biases = torch.as_tensor(exponent_bias).detach().to("cpu", torch.int64).reshape(-1)
    return _compute_dtype_for_biases(dtype, fmt, biases)


def nearest_rounder(fmt: FloatFormat, exponent_bias: torch.Tensor,
                    dtype: torch.dtype = torch.float64):
    """``fq`` for many calls on tensors of ``exponent_bias``'s shape: element ``i`` is rounded
    to nearest (ties to even, saturating) onto ``fmt`` at bias ``exponent_bias[i]``, the values
    :func:`fake_quantize_per_channel` gives, in ``dtype`` (float32 or float64, CPU or the
    biases' device). Validation, bounds and work space are made once; a call costs the few
    elementwise operations of the rounding itself (a column-by-column loop calls it thousands of
    times). The returned tensor is overwritten by the next call."""
    biases = torch.as_tensor(exponent_bias)
    device = biases.device
    biases = biases.detach().to("cpu", torch.int64)
    if _compute_dtype_for_biases(dtype, fmt, biases) != dtype:
        raise ValueError(f"{fmt} at biases {int(biases.min())}..{int(biases.max())} needs float64 "
                         "to round exactly")
    min_normal, max_finite = (bound.to(device) for bound in _grid_bounds(fmt, biases, dtype))
    result, scratch, sums = (torch.empty(biases.shape, dtype=dtype, device=device)
                             for _ in range(3))

    def round_values(values: torch.Tensor) -> torch.Tensor:
        _round_nearest(values, result, scratch, sums, fmt.mantissa_bits, min_normal, max_finite)
        return result
    return round_values


def quantize_weight(weight: torch.Tensor, fmt, exponent_bias) -> torch.Tensor:
    """``fq(weight)`` with one bias (int or 0-d tensor) or one per output channel (1-D tensor)."""
    bias = torch.as_tensor(exponent_bias)
    if bias.dim() == 1:
        return fake_quantize_per_channel(weight, fmt, bias, axis=0)
    return fake_quantize(weight, fmt.with_bias(int(bias)))
