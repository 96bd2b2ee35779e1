import math

import pytest
import torch

import hfp8
from hfp8 import FloatFormat
from tests.reference import scalar_code_value

EIGHT_BIT_LAYOUTS = [
    FloatFormat(e, 7 - e, b, specials)
    for e in (2, 3, 4, 5, 6)
    for specials in ("fn", "ieee", "none")
    for b in (2 ** (e - 1) - 1, 2 ** (e - 1) + 3, -2)
    if not (specials == "ieee" and e < 2)
]


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


@pytest.mark.parametrize("fmt", EIGHT_BIT_LAYOUTS, ids=str)
def test_all_256_codes_decode_to_the_definition(fmt):
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    decoded = hfp8.decode(codes, fmt)
    assert decoded.dtype == torch.float32
    for code in range(256):
        expected = scalar_code_value(code, fmt.exponent_bits, fmt.mantissa_bits,
                                     fmt.exponent_bias, fmt.specials)
        assert _same(decoded[code].item(), expected), (fmt, code)


@pytest.mark.parametrize("fmt", EIGHT_BIT_LAYOUTS, ids=str)
def test_encode_inverts_decode_for_every_non_nan_code(fmt):
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    values = hfp8.decode(codes, fmt)
    keep = ~torch.isnan(values)
    again = hfp8.encode(values[keep], fmt, saturate=not fmt.has_inf)
    assert torch.equal(again, codes[keep])


def test_e4m3_codes_agree_with_torch_float8_bits():
    x = torch.randn(10000) * 50
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, -(2.0**-9)])])
    ours = hfp8.encode(x, hfp8.E4M3)
    reference = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours, reference)


def test_e5m2_codes_agree_with_torch_float8_bits():
    x = torch.randn(10000) * 1000
    ours = hfp8.encode(x, hfp8.E5M2)
    reference = x.to(torch.float8_e5m2).view(torch.uint8)
    assert torch.equal(ours, reference)


def test_nan_and_inf_codes():
    nan_code = hfp8.encode(torch.tensor([math.nan]), hfp8.E4M3)
    assert math.isnan(hfp8.decode(nan_code, hfp8.E4M3).item())
    inf = hfp8.encode(torch.tensor([math.inf, -math.inf]), hfp8.E5M2, saturate=False)
    assert hfp8.decode(inf, hfp8.E5M2).tolist() == [math.inf, -math.inf]
    saturated = hfp8.encode(torch.tensor([math.inf]), hfp8.E5M2)
    assert hfp8.decode(saturated, hfp8.E5M2).item() == 57344.0


def test_none_layout_refuses_nan():
    with pytest.raises(ValueError, match="no NaN code"):
        hfp8.encode(torch.tensor([math.nan]), FloatFormat(4, 3, 7, "none"))


def test_wide_formats_are_refused():
    with pytest.raises(ValueError, match="at most 8"):
        hfp8.encode(torch.zeros(3), FloatFormat(5, 10))
    with pytest.raises(ValueError, match="at most 8"):
        hfp8.decode(torch.zeros(3, dtype=torch.uint8), FloatFormat(5, 10))


def test_decode_checks_its_input():
    with pytest.raises(TypeError):
        hfp8.decode(torch.zeros(3), hfp8.E4M3)
    with pytest.raises(ValueError, match="0..63"):
        hfp8.decode(torch.tensor([64]), FloatFormat(2, 3, 1, "none"))


def test_narrow_format_codes_use_low_bits():
    fmt = FloatFormat(2, 1, 1, "none")  # 4 bits
    codes = hfp8.encode(torch.tensor([6.0, -6.0, 0.5, -0.0]), fmt)
    assert codes.tolist() == [0b0111, 0b1111, 0b0001, 0b1000]


@pytest.mark.parametrize("fmt, reference", [
    (hfp8.E4M3, "float8_e4m3fn"), (FloatFormat(4, 3, 7, "ieee"), "float8_e4m3"),
    (hfp8.E5M2, "float8_e5m2"), (FloatFormat(3, 4, 3, "ieee"), "float8_e3m4")], ids=str)
def test_non_saturating_codes_at_the_overflow_tie_match_ml_dtypes(fmt, reference):
    import ml_dtypes
    import numpy as np

    top_field = fmt.largest_finite_fields()[0]
    tie = fmt.max_finite + 2.0 ** (top_field - fmt.exponent_bias - fmt.mantissa_bits) / 2
    values = np.array([tie, -tie, np.nextafter(np.float32(tie), np.float32(0)),
                       np.nextafter(np.float32(tie), np.float32(np.inf)), fmt.max_finite,
                       np.inf], dtype=np.float32)
    expected = values.astype(getattr(ml_dtypes, reference)).view(np.uint8)
    ours = hfp8.encode(torch.from_numpy(values), fmt, saturate=False).numpy()
    assert ours.tolist() == expected.tolist()
