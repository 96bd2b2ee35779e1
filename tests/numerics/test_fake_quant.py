import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hfp8
from hfp8 import FloatFormat
from hfp8.numerics import fake_quant
from tests.reference import (
    dense_sweep,
    midpoints,
    ml_dtypes_round,
    ml_dtypes_round_saturating,
    nearest_even_reference,
    scalar_code_value,
    torch_float8_round,
)

NO_SATURATION = dict(saturate=False)


def _sweep(fmt: FloatFormat, count: int = 20000) -> np.ndarray:
    """Dense float32 sweep from smallest_positive/2 to 2*max, the exact ties, random normals."""
    low, high = fmt.smallest_positive / 2, 2 * fmt.max_finite
    grid = fmt.grid().double().numpy()
    ties = midpoints(grid).astype(np.float32)
    assert np.all(ties.astype(np.float64) == midpoints(grid))  # ties are exact in float32
    rng = np.random.default_rng(1)
    normals = [rng.standard_normal(2000).astype(np.float32) * np.float32(fmt.max_finite * s)
               for s in (1e-6, 1e-3, 0.1, 1.0)]
    # The overflow tie (halfway from max_finite to the next code, which is Inf, NaN or absent)
    # and its float32 neighbours: the one tie the grid's own midpoints do not contain.
    top_field = max(fmt.largest_finite_fields()[0], 1)
    top_step = 2.0 ** (top_field - fmt.exponent_bias - fmt.mantissa_bits)
    tie = np.float32(fmt.max_finite + top_step / 2)
    assert float(tie) == fmt.max_finite + top_step / 2
    overflow = np.array([tie, np.nextafter(tie, np.float32(0)), np.nextafter(tie, np.float32(np.inf))])
    return np.concatenate([dense_sweep(low, high, count), ties, grid.astype(np.float32),
                           overflow, -overflow, *normals])


def _assert_bitwise_equal(ours: torch.Tensor, reference: np.ndarray):
    ours = ours.numpy()
    same_nan = np.isnan(ours) & np.isnan(reference)
    bits = np.dtype(f"uint{8 * ours.itemsize}")
    same_bits = ours.view(bits) == reference.astype(ours.dtype).view(bits)
    bad = ~(same_nan | same_bits)
    assert not bad.any(), f"{bad.sum()} mismatches, first: ours={ours[bad][:5]} ref={reference[bad][:5]}"


@pytest.mark.parametrize("bias", list(range(-10, 31)))
def test_e4m3_fn_matches_ml_dtypes_and_torch_at_every_bias(bias):
    fmt = hfp8.E4M3.with_bias(bias)
    x = _sweep(fmt, 6000)
    ours = hfp8.fake_quantize(torch.from_numpy(x), fmt, **NO_SATURATION)
    _assert_bitwise_equal(ours, ml_dtypes_round(x, 4, 3, "fn", bias))
    # torch's cast: compare where no overflow happens (its overflow behaviour is not ours).
    inside = np.abs(x) <= fmt.max_finite
    torch_ref = torch_float8_round(torch.from_numpy(x[inside]), torch.float8_e4m3fn, 7, bias)
    _assert_bitwise_equal(hfp8.fake_quantize(torch.from_numpy(x[inside]), fmt), torch_ref.numpy())


@pytest.mark.parametrize("bias", [126, 127, 128, 131, 140, 146])
def test_e4m3_fn_at_biases_where_format_values_are_float32_subnormals(bias):
    """Past bias 127 the format's smallest normals are float32 subnormals, which carry no
    exponent field to read the binade from (bias 147 once rounded 3565 * 2^-149 to itself).
    The reference scales in float64, where every value here is normal."""
    fmt = hfp8.E4M3.with_bias(bias)
    x = _sweep(fmt, 6000)
    reference = ml_dtypes_round(x.astype(np.float64), 4, 3, "fn", bias)
    _assert_bitwise_equal(hfp8.fake_quantize(torch.from_numpy(x), fmt, **NO_SATURATION),
                          reference)
    inside = np.abs(x) <= fmt.max_finite  # per channel saturates: compare below the max
    per_channel = hfp8.fake_quantize_per_channel(torch.from_numpy(x[inside])[None], hfp8.E4M3,
                                                 torch.tensor([bias]), axis=0)
    _assert_bitwise_equal(per_channel[0], reference[inside])


def test_e4m3_fn_at_the_highest_valid_bias():
    """Bias 147 (smallest subnormal 2^-149, the last float32 value; its grid's ties are not
    float32 values, so no sweep): every float32 multiple k 2^-149 up to 2^12 of them."""
    bias = 147
    x = (np.arange(1, 1 << 12, dtype=np.float64) * 2.0 ** -149).astype(np.float32)
    reference = ml_dtypes_round(x.astype(np.float64), 4, 3, "fn", bias)
    fmt = hfp8.E4M3.with_bias(bias)
    _assert_bitwise_equal(hfp8.fake_quantize(torch.from_numpy(x), fmt), reference)
    assert float(hfp8.fake_quantize(torch.tensor([3565 * 2.0 ** -149]), fmt)) == 3584 * 2.0 ** -149


@pytest.mark.parametrize("bias", [15, 0, 10, 20, 30])
def test_e5m2_matches_ml_dtypes_and_torch(bias):
    fmt = hfp8.E5M2.with_bias(bias)
    x = _sweep(fmt)
    ours = hfp8.fake_quantize(torch.from_numpy(x), fmt, **NO_SATURATION)
    _assert_bitwise_equal(ours, ml_dtypes_round(x, 5, 2, "ieee", bias))
    inside = np.abs(x) <= fmt.max_finite
    torch_ref = torch_float8_round(torch.from_numpy(x[inside]), torch.float8_e5m2, 15, bias)
    _assert_bitwise_equal(hfp8.fake_quantize(torch.from_numpy(x[inside]), fmt), torch_ref.numpy())


@pytest.mark.parametrize(
    "exponent_bits, mantissa_bits, specials",
    [(4, 3, "ieee"), (3, 4, "ieee"), (2, 3, "none"), (3, 2, "none"), (2, 1, "none")],
)
@pytest.mark.parametrize("bias_shift", [0, -3, 5])
def test_other_layouts_match_ml_dtypes(exponent_bits, mantissa_bits, specials, bias_shift):
    fmt = FloatFormat(exponent_bits, mantissa_bits, None, specials)
    fmt = fmt.with_bias(fmt.exponent_bias + bias_shift)
    x = _sweep(fmt)
    reference = ml_dtypes_round(x, exponent_bits, mantissa_bits, specials, fmt.exponent_bias)
    if specials == "none":
        # ml_dtypes saturates these layouts, as we do.
        ours = hfp8.fake_quantize(torch.from_numpy(x), fmt)
    else:
        ours = hfp8.fake_quantize(torch.from_numpy(x), fmt, **NO_SATURATION)
    _assert_bitwise_equal(ours, reference)


def test_float64_input_is_rounded_once_not_twice():
    # Just above and below each tie: a detour through float32 would land on the tie itself
    # and round to even. (ml_dtypes casts float64 through float32, so it is no reference here.)
    fmt = hfp8.E4M3
    ties = midpoints(fmt.grid().double().numpy())
    rng = np.random.default_rng(3)
    x = np.concatenate([ties + 1e-12, ties - 1e-12, rng.standard_normal(3000) * 30])
    positive_codes = list(range(0x7F))
    grid = [scalar_code_value(c, 4, 3, 7, "fn") for c in positive_codes]
    reference = np.array([nearest_even_reference(v, grid, positive_codes) for v in x.tolist()])
    ours = hfp8.fake_quantize(torch.from_numpy(x), fmt)
    assert ours.dtype == torch.float64
    _assert_bitwise_equal(ours, reference)
    via_float32 = hfp8.fake_quantize(torch.from_numpy(x).float(), fmt).double().numpy()
    assert (via_float32 != reference).any()  # the test can tell single from double rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = (torch.randn(5000) * 20).to(dtype)
    ours = hfp8.fake_quantize(x, hfp8.E4M3)
    assert ours.dtype == dtype
    reference = x.float().to(torch.float8_e4m3fn).float().to(dtype)
    assert torch.equal(ours, reference)


def test_scalar_reference_on_a_non_native_format():
    fmt = FloatFormat(3, 5, 2, "fn")  # 9 bits: no hardware dtype anywhere
    positive_codes = [c for c in range(2 ** (fmt.bits - 1))
                      if math.isfinite(scalar_code_value(c, 3, 5, 2, "fn"))]
    grid = [scalar_code_value(c, 3, 5, 2, "fn") for c in positive_codes]
    x = _sweep(fmt, 4000)
    ours = hfp8.fake_quantize(torch.from_numpy(x), fmt).tolist()
    for value, got in zip(x.tolist(), ours):
        expected = nearest_even_reference(value, grid, positive_codes)
        assert got == expected and math.copysign(1, got) == math.copysign(1, expected), value


@pytest.mark.parametrize("fmt", [hfp8.E4M3, hfp8.E5M2, FloatFormat(4, 3, 7, "ieee"),
                                 FloatFormat(4, 3, 7, "none"), FloatFormat(4, 3, 12, "fn")],
                         ids=str)
def test_saturation(fmt):
    big = fmt.max_finite
    x = torch.tensor([1e30, -1e30, math.inf, -math.inf, big * 1.03, -big * 1.03, big])
    ours = hfp8.fake_quantize(x, fmt)
    assert ours.tolist() == [big, -big, big, -big, big, -big, big]


def test_non_saturating_overflow_follows_the_layout():
    ieee = FloatFormat(4, 3, 7, "ieee")  # max 240, next step 16: overflow from 248 up
    x = torch.tensor([247.9, 248.0, math.inf, -300.0])
    assert hfp8.fake_quantize(x, ieee, saturate=False).tolist() == [240.0, math.inf, math.inf, -math.inf]
    # E4M3FN: max 448 (code S.1111.110, even), next code 480 is NaN: the tie 464 rounds to even.
    fn = hfp8.fake_quantize(torch.tensor([463.9, 464.0, -464.0, 464.1, math.inf]), hfp8.E4M3,
                            saturate=False)
    assert fn[:3].tolist() == [448.0, 448.0, -448.0] and torch.isnan(fn[3:]).all()
    with pytest.raises(ValueError, match="only saturating"):
        hfp8.fake_quantize(x, FloatFormat(4, 3, 7, "none"), saturate=False)


def test_nan_and_signed_zero_are_preserved():
    x = torch.tensor([math.nan, -0.0, 0.0, -1e-6, 1e-6, -(2.0**-10)])
    ours = hfp8.fake_quantize(x, hfp8.E4M3)
    assert math.isnan(ours[0].item())
    assert torch.equal(torch.signbit(ours[1:]), torch.tensor([True, False, True, False, True]))
    assert (ours[1:] == 0).all()


def test_shape_device_dtype_and_layout_preserved():
    x = torch.randn(4, 6, 5).transpose(0, 2)  # non-contiguous
    ours = hfp8.fake_quantize(x, hfp8.E4M3)
    assert ours.shape == x.shape and ours.dtype == x.dtype and ours.device == x.device
    assert torch.equal(ours, x.contiguous().to(torch.float8_e4m3fn).float())
    assert hfp8.fake_quantize(torch.tensor(3.3), hfp8.E4M3).item() == 3.25
    assert hfp8.fake_quantize(torch.empty(0, 3), hfp8.E4M3).shape == (0, 3)


def test_large_tensor_across_block_boundaries():
    x = torch.randn((1 << 18) * 3 + 17) * 100
    ours = hfp8.fake_quantize(x, hfp8.E4M3)
    assert torch.equal(ours, x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_input_is_not_modified():
    x = torch.randn(1000) * 10
    before = x.clone()
    hfp8.fake_quantize(x, hfp8.E4M3)
    assert torch.equal(x, before)


def test_gradient_passes_straight_through():
    x = torch.randn(100, requires_grad=True)
    y = hfp8.fake_quantize(x, hfp8.E4M3)
    assert torch.equal(y, hfp8.fake_quantize(x.detach(), hfp8.E4M3))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        hfp8.fake_quantize(torch.arange(3), hfp8.E4M3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        hfp8.fake_quantize([1.0], hfp8.E4M3)
    with pytest.raises(ValueError, match="rounding"):
        hfp8.fake_quantize(torch.ones(3), hfp8.E4M3, rounding="up")


def test_per_channel_equals_per_slice():
    w = torch.randn(6, 4, 3) * torch.logspace(-3, 3, 6).view(6, 1, 1)
    biases = torch.tensor([-2, 3, 7, 9, 14, 20])
    ours = hfp8.fake_quantize_per_channel(w, hfp8.E4M3, biases, axis=0)
    for i, b in enumerate(biases.tolist()):
        assert torch.equal(ours[i], hfp8.fake_quantize(w[i], hfp8.E4M3.with_bias(b)))
    along_last = hfp8.fake_quantize_per_channel(w.transpose(0, 2), hfp8.E4M3, biases, axis=-1)
    assert torch.equal(along_last, ours.transpose(0, 2))
    with pytest.raises(ValueError, match="one exponent bias per slice"):
        hfp8.fake_quantize_per_channel(w, hfp8.E4M3, biases[:3], axis=0)


def test_per_channel_rounding_of_a_tensor_past_one_block_runs_in_blocks_of_whole_slices(
        monkeypatch):
    """Bounds per slice of dim 0 on a tensor larger than one block: the slices are rounded a
    few at a time (the last block shorter), each onto its own bias, against ml_dtypes."""
    monkeypatch.setattr(fake_quant, "_BLOCK", 40)  # 3 slices of 12 per block; 7 slices
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((7, 3, 4)) * np.logspace(-4, 2, 7)[:, None, None]).astype(np.float32)
    w[2, 0, 0], w[5, 1, 1] = 1e6, -1e6  # saturate at their slice's max
    biases = torch.tensor([3, 20, 9, -1, 14, 7, 11])
    ours = hfp8.fake_quantize_per_channel(torch.from_numpy(w), hfp8.E4M3, biases, axis=0).numpy()
    for i, b in enumerate(biases.tolist()):
        _assert_bitwise_equal(torch.from_numpy(ours[i]),
                              ml_dtypes_round_saturating(w[i], hfp8.E4M3.with_bias(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_rounder_equals_ml_dtypes_element_by_element_bias(dtype):
    """The reusable rounder of compensated rounding: each element at its own bias, called many
    times with fresh values, against ml_dtypes' E4M3FN cast (saturated first, as ours is)."""
    from hfp8.numerics.fake_quant import nearest_rounder
    generator = torch.Generator().manual_seed(0)
    biases = torch.randint(-6, 24, (40, 9), generator=generator)
    rounder = nearest_rounder(hfp8.E4M3, biases, dtype)
    for _ in range(4):
        binade = torch.randint(-22, 14, (40, 9), generator=generator).to(dtype)
        x = torch.randn(40, 9, generator=generator, dtype=dtype) * torch.exp2(binade)
        x[0, :3] = torch.tensor([0.0, -0.0, 1e30], dtype=dtype)
        out = rounder(x)
        for (i, j), b in np.ndenumerate(biases.numpy()):
            fmt = hfp8.E4M3.with_bias(int(b))
            value = np.clip(x[i, j].item(), -fmt.max_finite, fmt.max_finite)
            expected = ml_dtypes_round(np.array([value], dtype=np.float64), 4, 3, "fn", int(b))[0]
            assert out[i, j].item() == expected and math.copysign(1, out[i, j].item()) == \
                math.copysign(1, expected), (i, j, int(b), x[i, j].item())


def test_nearest_rounder_refuses_float32_where_it_cannot_round_exactly():
    from hfp8.numerics.fake_quant import nearest_rounder
    with pytest.raises(ValueError, match="float64"):
        nearest_rounder(hfp8.E4M3, torch.tensor([0, -100]), torch.float32)


# -- properties ----------------------------------------------------------------------------------
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
biases = st.integers(min_value=-10, max_value=30)
layouts = st.sampled_from([hfp8.E4M3, hfp8.E5M2, FloatFormat(4, 3, 7, "ieee"),
                           FloatFormat(3, 4, 3, "none"), FloatFormat(6, 9, 31, "fn")])


@settings(max_examples=200, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=50), layouts, biases)
def test_idempotent(values, fmt, bias):
    fmt = fmt.with_bias(bias)
    once = hfp8.fake_quantize(torch.tensor(values), fmt)
    assert torch.equal(hfp8.fake_quantize(once, fmt), once)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite_floats, min_size=2, max_size=50), layouts, biases)
def test_monotone(values, fmt, bias):
    x = torch.sort(torch.tensor(values)).values
    y = hfp8.fake_quantize(x, fmt.with_bias(bias))
    assert bool((y[1:] >= y[:-1]).all())


@settings(max_examples=200, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=50), layouts, biases,
       st.integers(min_value=-8, max_value=8))
def test_bias_is_a_power_of_two_scale(values, fmt, bias, k):
    x = torch.tensor(values)
    left = hfp8.fake_quantize(x, fmt.with_bias(bias + k))
    right = 2.0**-k * hfp8.fake_quantize(2.0**k * x, fmt.with_bias(bias))
    assert torch.equal(left, right)


def test_stochastic_rounding_is_unbiased_and_picks_neighbours():
    generator = torch.Generator().manual_seed(0)
    fmt = hfp8.E4M3
    n = 200_000
    for value in [0.3, 1.1, 2.0**-8 * 1.3, -37.0, 300.0, 447.0]:
        x = torch.full((n,), value)
        y = hfp8.fake_quantize(x, fmt, rounding="stochastic", generator=generator)
        grid = fmt.grid().double()
        upper = grid[torch.searchsorted(grid, torch.tensor(value, dtype=torch.float64))].item()
        lower = grid[torch.searchsorted(grid, torch.tensor(value, dtype=torch.float64)) - 1].item()
        assert set(y.unique().tolist()) <= {lower, upper}
        # Each draw is a Bernoulli between neighbours: std of the mean = gap*sqrt(p(1-p)/n).
        p = (value - lower) / (upper - lower)
        bound = 5 * (upper - lower) * math.sqrt(p * (1 - p) / n)
        assert abs(y.double().mean().item() - value) <= bound, value


def test_stochastic_rounding_keeps_grid_values_and_saturates():
    generator = torch.Generator().manual_seed(1)
    grid = hfp8.E4M3.grid()
    assert torch.equal(hfp8.fake_quantize(grid, hfp8.E4M3, rounding="stochastic",
                                          generator=generator), grid)
    big = hfp8.fake_quantize(torch.tensor([1e9, -math.inf]), hfp8.E4M3, rounding="stochastic")
    assert big.tolist() == [448.0, -448.0]


def test_stochastic_rounding_per_channel():
    generator = torch.Generator().manual_seed(2)
    x = torch.full((2, 100_000), 1.1)
    # At bias 0, 1.1 lies in the subnormal range (step 2^-2); at bias 7 the step is 2^-3.
    y = hfp8.fake_quantize_per_channel(x, hfp8.E4M3, torch.tensor([7, 0]), axis=0,
                                       rounding="stochastic", generator=generator)
    assert set(y[0].unique().tolist()) == {1.0, 1.125}
    assert set(y[1].unique().tolist()) == {1.0, 1.25}
    assert abs(y[0].double().mean().item() - 1.1) < 5 * 0.125 * math.sqrt(0.2 * 0.8 / 1e5)
    assert abs(y[1].double().mean().item() - 1.1) < 5 * 0.25 * math.sqrt(0.4 * 0.6 / 1e5)
