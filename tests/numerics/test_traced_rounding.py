"""round_at_bias (the torch.compile form of the rounding) against ml_dtypes, eager and compiled."""

import math

import numpy as np
import pytest
import torch

from hfp8 import FloatFormat
from hfp8.numerics.traced_rounding import round_at_bias, traceable
from tests.reference import (
    dense_sweep,
    midpoints,
    ml_dtypes_round_saturating,
    same_float32_bits,
)

CASES = [(4, 3, "fn"), (4, 3, "ieee"), (5, 2, "ieee")]


def _values(fmt: FloatFormat) -> np.ndarray:
    """A dense sweep from below the smallest subnormal's half to past the max, every tie, the
    grid, float32 subnormals, zeros of both signs, +-Inf and NaN."""
    grid = fmt.grid().double().numpy()
    ties = midpoints(grid).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-39, 3e38],
                        dtype=np.float32)
    sweep = dense_sweep(fmt.smallest_positive / 8, 4 * fmt.max_finite, 20000)
    return np.concatenate([sweep, ties, -ties, grid.astype(np.float32), specials])


@pytest.mark.parametrize("exponent_bits, mantissa_bits, specials", CASES)
def test_eager_matches_ml_dtypes_at_every_bias_with_ties_subnormals_and_saturation(
        exponent_bits, mantissa_bits, specials):
    base = FloatFormat(exponent_bits, mantissa_bits, None, specials)
    for bias in range(base.exponent_bias - 8, base.exponent_bias + 12):
        fmt = base.with_bias(bias)
        values = _values(fmt)
        actual = round_at_bias(torch.from_numpy(values), base, torch.tensor(bias)).numpy()
        assert same_float32_bits(actual, ml_dtypes_round_saturating(values, fmt)), (fmt, bias)


def test_compiled_with_inductor_matches_ml_dtypes_with_one_graph_for_every_bias():
    base = FloatFormat(4, 3, None, "fn")
    compiled = torch.compile(lambda x, bias: round_at_bias(x, base, bias), dynamic=True,
                             fullgraph=True)
    for bias in (3, 7, 9, 14):
        fmt = base.with_bias(bias)
        values = _values(fmt)
        actual = compiled(torch.from_numpy(values), torch.tensor(bias)).numpy()
        assert same_float32_bits(actual, ml_dtypes_round_saturating(values, fmt)), bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_round_in_float32_and_keep_their_dtype(dtype):
    fmt = FloatFormat(4, 3, 9, "fn")
    values = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 40).to(dtype)
    actual = round_at_bias(values, fmt, torch.tensor(9))
    assert actual.dtype == dtype
    expected = ml_dtypes_round_saturating(values.float().numpy(), fmt)
    assert same_float32_bits(actual.float().numpy(), torch.from_numpy(expected).to(dtype).float().numpy())


def test_float64_inputs_round_in_float64():
    fmt = FloatFormat(4, 3, 10, "fn")
    values = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    actual = round_at_bias(values, fmt, torch.tensor(10))
    assert actual.dtype == torch.float64
    # every float32 rounding of these values is exact in float64's grid: the same values
    expected = ml_dtypes_round_saturating(values.float().numpy(), fmt).astype(np.float64)
    assert np.array_equal(actual.numpy(), expected)


def test_traceable_admits_the_fp8_formats_and_refuses_what_it_cannot_round_exactly():
    assert traceable(FloatFormat(4, 3, 7, "fn"), torch.float32)
    assert traceable(FloatFormat(5, 2, 15, "ieee"), torch.bfloat16)
    assert traceable(FloatFormat(5, 2, 15, "ieee"), torch.float64)
    assert not traceable(FloatFormat(4, 3, 7, "fn"), torch.int32)
    # default bias 127 with 3 mantissa bits: ties at 2^-130, below float32's normals
    wide = FloatFormat(8, 3, None, "ieee")
    assert -wide.exponent_bias - wide.mantissa_bits < math.log2(2.0**-126)
    assert not traceable(wide, torch.float32)
    assert traceable(wide, torch.float64)


def test_the_constants_are_marked_as_torch_compiler_assume_constant_result_marks_them():
    """``_constants`` carries the mark by hand (the decorator would import TorchDynamo at
    ``import hfp8``): the mark must be the one the decorator sets in this torch."""
    from hfp8.numerics import traced_rounding

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    marks = {key: value for key, value in vars(marked).items()}
    assert marks and all(getattr(traced_rounding._constants, key, None) == value
                         for key, value in marks.items()), marks
