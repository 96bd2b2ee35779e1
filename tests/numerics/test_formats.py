import math

import pytest
import torch

import hfp8
from hfp8 import FloatFormat
from tests.reference import scalar_code_value


def test_presets_match_design():
    assert (hfp8.E4M3.exponent_bits, hfp8.E4M3.mantissa_bits) == (4, 3)
    assert (hfp8.E4M3.exponent_bias, hfp8.E4M3.specials) == (7, "fn")
    assert hfp8.E4M3.max_finite == 448.0
    assert (hfp8.E5M2.exponent_bias, hfp8.E5M2.specials) == (15, "ieee")
    assert hfp8.E5M2.max_finite == 57344.0


@pytest.mark.parametrize(
    "fmt, expected_max",
    [
        (FloatFormat(4, 3, 7, "fn"), 448.0),
        (FloatFormat(4, 3, 7, "ieee"), 240.0),
        (FloatFormat(4, 3, 7, "none"), 480.0),
        (FloatFormat(5, 2, 15, "ieee"), 57344.0),
        (FloatFormat(5, 2, 15, "fn"), 2.0**16 * 1.5),
        (FloatFormat(4, 3, 9, "fn"), 112.0),
        (FloatFormat(4, 3, -3, "fn"), 448.0 * 1024),
        (FloatFormat(3, 0, None, "fn"), 2.0**3),  # m = 0: the top field holds only NaN
    ],
)
def test_max_finite_from_design_formulas(fmt, expected_max):
    assert fmt.max_finite == expected_max


def test_max_finite_formula_fn_and_ieee_general():
    for e in range(2, 8):
        for m in range(1, 8):
            b = 2 ** (e - 1) - 1
            fn = FloatFormat(e, m, b, "fn")
            ieee = FloatFormat(e, m, b, "ieee")
            assert fn.max_finite == 2.0 ** (2**e - 1 - b) * (2 - 2.0 ** (1 - m))
            assert ieee.max_finite == 2.0 ** (2**e - 2 - b) * (2 - 2.0**-m)


def test_default_bias_and_with_bias():
    assert FloatFormat(4, 3).exponent_bias == 7
    assert FloatFormat(5, 2, specials="ieee").exponent_bias == 15
    moved = hfp8.E4M3.with_bias(9)
    assert moved == FloatFormat(4, 3, 9, "fn")
    assert moved.max_finite == 448.0 / 4
    assert hfp8.E4M3.with_bias(-2).exponent_bias == -2


def test_str_and_repr_are_readable():
    assert str(hfp8.E4M3.with_bias(9)) == "E4M3(bias=9, fn)"
    assert repr(hfp8.E5M2) == "E5M2(bias=15, ieee)"


def test_format_is_frozen_and_hashable():
    with pytest.raises(Exception):
        hfp8.E4M3.exponent_bias = 3
    assert len({hfp8.E4M3, FloatFormat(4, 3, 7, "fn"), hfp8.E5M2}) == 2


def test_smallest_values():
    assert hfp8.E4M3.smallest_normal == 2.0**-6
    assert hfp8.E4M3.smallest_subnormal == 2.0**-9
    assert hfp8.E5M2.smallest_subnormal == 2.0**-16
    assert FloatFormat(3, 0).smallest_subnormal is None
    assert FloatFormat(3, 0).smallest_positive == FloatFormat(3, 0).smallest_normal


@pytest.mark.parametrize("fmt", [hfp8.E4M3, hfp8.E5M2, FloatFormat(4, 3, 7, "ieee"),
                                 FloatFormat(4, 3, 7, "none"), FloatFormat(2, 1, 1, "none"),
                                 FloatFormat(3, 0, 3, "fn"), FloatFormat(4, 3, 20, "fn")])
def test_grid_is_the_set_of_finite_code_values(fmt):
    values = set()
    for code in range(2**fmt.bits):
        v = scalar_code_value(code, fmt.exponent_bits, fmt.mantissa_bits, fmt.exponent_bias,
                              fmt.specials)
        if math.isfinite(v):
            values.add(v + 0.0)  # -0.0 and 0.0 are one value
    grid = fmt.grid()
    assert grid.dtype == torch.float32
    assert grid.tolist() == sorted(values)
    assert len(grid) == fmt.num_finite_values
    assert grid[-1].item() == fmt.max_finite
    assert grid[grid > 0].min().item() == fmt.smallest_positive


def test_grid_of_a_wide_format():
    fmt = FloatFormat(8, 7, 127, "ieee")  # bfloat16's layout
    grid = fmt.grid()
    assert torch.equal(grid, torch.sort(grid).values)
    assert grid[-1].item() == torch.finfo(torch.bfloat16).max


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 3), "exponent_bits"),
        ((9, 3), "exponent_bits"),
        ((4, -1), "mantissa_bits"),
        ((4, 17), "mantissa_bits"),
        ((4, 3, 7, "weird"), "specials"),
        ((1, 3, 0, "ieee"), "at least 2 exponent bits"),
        ((1, 0, 0, "fn"), "no positive finite value"),
        ((8, 3, -1, "fn"), "does not fit in float32"),
        ((4, 3, 150, "fn"), "below float32's smallest subnormal"),
    ],
)
def test_invalid_formats_are_refused_clearly(args, message):
    with pytest.raises(ValueError, match=message):
        FloatFormat(*args)


def test_non_integer_bias_is_refused():
    with pytest.raises(TypeError, match="exponent_bias"):
        FloatFormat(4, 3, 7.5)
    with pytest.raises(TypeError, match="exponent_bits"):
        FloatFormat(4.0, 3)
    assert FloatFormat(4, 3, torch.tensor(9)).exponent_bias == 9


def test_extreme_but_valid_biases():
    assert FloatFormat(4, 3, -112, "fn").max_finite == 448.0 * 2.0**119
    assert FloatFormat(4, 3, 147, "fn").smallest_subnormal == 2.0**-149
