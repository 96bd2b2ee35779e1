import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hfp8
from hfp8 import FloatFormat
from hfp8.numerics import bias_selection
from hfp8.numerics.bias_selection import candidate_errors, max_bias_for_amax, valid_bias_range
from tests.reference import ml_dtypes_round


def _reference_sse(x: np.ndarray, fmt: FloatFormat, bias: int) -> float:
    """Squared error through ml_dtypes (saturation applied by clipping first)."""
    clipped = np.clip(x, -fmt.with_bias(bias).max_finite, fmt.with_bias(bias).max_finite)
    rounded = ml_dtypes_round(clipped.astype(np.float32), fmt.exponent_bits, fmt.mantissa_bits,
                              fmt.specials, bias)
    return float(np.sum((rounded.astype(np.float64) - x.astype(np.float64)) ** 2))


@pytest.mark.parametrize("scale", [1e-4, 0.3, 1.0, 77.0, 5e4])
def test_max_method_is_the_largest_bias_that_does_not_saturate(scale):
    x = torch.randn(1000) * scale
    amax = x.abs().max().item()
    for fmt in (hfp8.E4M3, hfp8.E5M2):
        bias = hfp8.select_exponent_bias(x, fmt, method="max")
        assert isinstance(bias, int)
        assert amax <= fmt.with_bias(bias).max_finite
        assert amax > fmt.with_bias(bias + 1).max_finite


def test_max_method_at_exact_boundaries():
    assert hfp8.select_exponent_bias(torch.tensor([448.0]), hfp8.E4M3, "max") == 7
    assert hfp8.select_exponent_bias(torch.tensor([448.001]), hfp8.E4M3, "max") == 6
    assert hfp8.select_exponent_bias(torch.tensor([224.0]), hfp8.E4M3, "max") == 8


@pytest.mark.parametrize("distribution", ["normal", "laplace", "outlier", "uniform"])
def test_mse_method_matches_a_brute_force_reference(distribution):
    rng = np.random.default_rng(0)
    x = {
        "normal": rng.standard_normal(5000),
        "laplace": rng.laplace(size=5000),
        "outlier": np.concatenate([rng.standard_normal(5000) * 0.01, [40.0]]),
        "uniform": rng.uniform(-3, 3, 5000),
    }[distribution].astype(np.float32)
    fmt = FloatFormat(3, 4, 3, "ieee")  # a narrow range makes the trade-off visible
    chosen = hfp8.select_exponent_bias(torch.from_numpy(x), fmt, method="mse")
    errors = {b: _reference_sse(x, fmt, b) for b in range(-5, 30)}
    best = min(errors.values())
    assert errors[chosen] == best
    assert chosen == min(b for b, e in errors.items() if e == best)


def test_mse_can_trade_saturation_for_resolution():
    x = torch.cat([torch.randn(10000) * 0.01, torch.tensor([1.0])])
    fmt = FloatFormat(3, 4, 3, "ieee")
    assert hfp8.select_exponent_bias(x, fmt, "mse") > hfp8.select_exponent_bias(x, fmt, "max")


def test_per_channel_equals_per_row():
    w = torch.randn(8, 3, 3, 3) * torch.logspace(-4, 3, 8).view(8, 1, 1, 1)
    w[5] = 0.0
    for method in ("max", "mse"):
        per_channel = hfp8.select_exponent_bias(w, hfp8.E4M3, method, axis=0)
        assert per_channel.dtype == torch.int64 and per_channel.shape == (8,)
        expected = [hfp8.select_exponent_bias(w[i], hfp8.E4M3, method) for i in range(8)]
        assert per_channel.tolist() == expected
    along_one = hfp8.select_exponent_bias(w.transpose(0, 1), hfp8.E4M3, "mse", axis=1)
    assert along_one.tolist() == expected


def test_all_zero_and_non_finite_inputs_get_the_formats_own_bias():
    fmt = hfp8.E4M3.with_bias(9)
    for x in (torch.zeros(10), torch.full((4,), math.nan), torch.tensor([math.inf, -math.inf]),
              torch.empty(0)):
        for method in ("max", "mse"):
            assert hfp8.select_exponent_bias(x, fmt, method) == 9


def test_non_finite_values_are_ignored():
    x = torch.randn(100)
    polluted = torch.cat([x, torch.tensor([math.nan, math.inf, -math.inf])])
    for method in ("max", "mse"):
        assert hfp8.select_exponent_bias(polluted, hfp8.E4M3, method) == \
            hfp8.select_exponent_bias(x, hfp8.E4M3, method)


@pytest.mark.parametrize("axis", [None, 0])
def test_largest_finite_magnitude_is_found_in_blocks_past_the_chunk(axis):
    """The ``max`` bias reads ``max |x|`` over finite values block by block; an Inf, a NaN and
    the largest value in other blocks than the first, and rows longer than a block."""
    x = torch.randn(5, 3000)
    x[0, 2500], x[1, 10], x[3, 1500] = math.inf, math.nan, -math.inf
    x[2, 2999], x[4, 0] = -700.0, 0.03
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros(()))
    amax = finite.amax() if axis is None else finite.amax(dim=1)
    expected = bias_selection.max_bias_for_amax(amax.reshape(-1), hfp8.E4M3)
    original = bias_selection._finite_amax
    with pytest.MonkeyPatch.context() as patch:  # rows of 3 blocks
        patch.setattr(bias_selection, "_finite_amax", lambda rows: original(rows, chunk=1024))
        ours = hfp8.select_exponent_bias(x, hfp8.E4M3, "max", axis=axis)
    assert torch.equal(torch.as_tensor(ours).reshape(-1), expected)


def test_bias_is_clamped_to_the_float32_range():
    tiny = torch.tensor([1e-40])  # a float32 subnormal
    bias = hfp8.select_exponent_bias(tiny, hfp8.E4M3, "max")
    FloatFormat(4, 3, bias)  # must be a valid format


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        hfp8.select_exponent_bias(torch.ones(3), hfp8.E4M3, "percentile")
    with pytest.raises(TypeError, match="floating-point"):
        hfp8.select_exponent_bias(torch.ones(3, dtype=torch.int32), hfp8.E4M3)
    with pytest.raises(IndexError):
        hfp8.select_exponent_bias(torch.ones(3), hfp8.E4M3, axis=2)


values = st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
                  min_size=1, max_size=64)
formats = st.sampled_from([hfp8.E4M3, hfp8.E5M2, FloatFormat(3, 4, 3, "ieee")])


@settings(max_examples=150, deadline=None)
@given(values, formats, st.integers(min_value=-12, max_value=12), st.sampled_from(["max", "mse"]))
def test_scaling_by_a_power_of_two_shifts_the_bias(xs, fmt, k, method):
    x = torch.tensor(xs)
    if not bool((x != 0).any()):
        return
    scaled = hfp8.select_exponent_bias(2.0**k * x, fmt, method)
    plain = hfp8.select_exponent_bias(x, fmt, method)
    low, high = valid_bias_range(fmt)
    if not (low + 12 < plain < high - 12):
        # e.g. x = 1e-45: its bias is clamped to the float32-valid range (tested elsewhere)
        return
    assert scaled == plain - k


@settings(max_examples=150, deadline=None)
@given(values, formats)
def test_mse_error_never_exceeds_max_error(xs, fmt):
    x = torch.tensor(xs)
    errors = {}
    for method in ("max", "mse"):
        bias = hfp8.select_exponent_bias(x, fmt, method)
        errors[method] = float(((hfp8.fake_quantize(x, fmt.with_bias(bias)) - x).double() ** 2).sum())
    assert errors["mse"] <= errors["max"]


def test_fixed_is_the_formats_own_bias_whatever_the_data():
    """The third method lives here too (it was special-cased twice in the pipeline)."""
    fmt = hfp8.E4M3.with_bias(9)
    x = torch.randn(4, 16) * 1000
    assert hfp8.select_exponent_bias(x, fmt, "fixed") == 9
    assert torch.equal(hfp8.select_exponent_bias(x, fmt, "fixed", axis=0),
                       torch.full((4,), 9, dtype=torch.int64))
    observer = hfp8.HistogramObserver()
    observer.observe(x)
    assert observer.exponent_bias(fmt, "fixed") == 9


# -- candidate_errors: every candidate bias in one pass, against one rounding per candidate ----
def squared_error(values: torch.Tensor, fmt: FloatFormat, biases: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum((fq(x; b_row) - x)^2)`` over the finite entries, by rounding each row at
    its bias (fake_quantize_per_channel, itself checked against torch's and ml_dtypes' casts)."""
    clean = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    quantized = hfp8.fake_quantize_per_channel(clean, fmt, biases, axis=0)
    return (quantized.double() - clean.double()).square().sum(dim=1)


def _candidates(x: torch.Tensor, fmt: FloatFormat, radius: int = 8) -> torch.Tensor:
    amax = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(1)
    widest = max_bias_for_amax(amax, fmt)
    _, high = valid_bias_range(fmt)
    return torch.stack([(widest + step).clamp(max=high) for step in range(radius + 1)], 1)


EDGE_FORMATS = [hfp8.E4M3, hfp8.E5M2, FloatFormat(3, 4, 3, "ieee"), FloatFormat(3, 5, 3, "fn"),
                FloatFormat(4, 0, 7, "fn"), FloatFormat(2, 1, 1, "none")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", EDGE_FORMATS, ids=str)
def test_candidate_errors_equal_one_rounding_per_candidate(fmt, dtype):
    """Rows of different scales (most values subnormal at the widest bias in one, values near
    float32's max in another), zeros, NaN and Inf; a small chunk cuts rows into pieces, or
    takes several whole rows at a time."""
    rng = torch.Generator().manual_seed(0)
    scales = torch.tensor([[1e-3], [1.0], [300.0], [1e-30], [1.0]])
    x = torch.randn(5, 3000, generator=rng) * scales
    x[:, :5] = torch.tensor([-1e-40, 0.0, float("nan"), float("inf"), 1e-6])
    x[4, 7] = 3e38
    x = x.to(dtype)
    candidates = _candidates(x, fmt)
    fast = candidate_errors(x, fmt, candidates, chunk=1000)
    slow = torch.stack([squared_error(x, fmt, candidates[:, k])
                        for k in range(candidates.shape[1])], 1)
    # float64 sums in two orders: equal up to float64 rounding of the larger terms
    assert torch.allclose(fast, slow, rtol=1e-13, atol=0), (fast - slow).abs().max()
    # ranges of several whole rows (10 rows of 100 per chunk of 1000), the last one short
    many = x.reshape(150, 100)[:145]
    candidates = _candidates(many, fmt)
    fast = candidate_errors(many, fmt, candidates, chunk=1000)
    slow = torch.stack([squared_error(many, fmt, candidates[:, k])
                        for k in range(candidates.shape[1])], 1)
    assert torch.allclose(fast, slow, rtol=1e-13, atol=0), (fast - slow).abs().max()


@settings(max_examples=100, deadline=None)
@given(values, formats, st.booleans())
def test_candidate_errors_pick_the_bias_one_rounding_per_candidate_picks(xs, fmt, per_row):
    x = torch.tensor(xs).reshape(len(xs), 1) if per_row else torch.tensor(xs).reshape(1, -1)
    candidates = _candidates(x, fmt)
    fast = candidate_errors(x, fmt, candidates)
    slow = torch.stack([squared_error(x, fmt, candidates[:, k])
                        for k in range(candidates.shape[1])], 1)
    assert torch.allclose(fast, slow, rtol=1e-12, atol=0)


def test_equal_candidates_get_exactly_equal_errors():
    """A candidate clamped to the top of the valid range repeats: its error must repeat
    exactly, or a rounding difference would pick a different bias than a tie does."""
    fmt = hfp8.E4M3
    _, high = valid_bias_range(fmt)
    x = torch.tensor([[2.0 ** (1 - high) * 3, 2.0 ** (1 - high) * 5, 1e-45]])
    candidates = _candidates(x, fmt)
    assert int(candidates[0, -1]) == int(candidates[0, -2]) == high
    errors = candidate_errors(x, fmt, candidates)
    assert errors[0, -1] == errors[0, -2]
