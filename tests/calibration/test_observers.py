import math

import pytest
import torch

import hfp8
from hfp8 import FloatFormat, HistogramObserver
from hfp8.data.batches import calibration_batches


@pytest.mark.parametrize("fmt", [hfp8.E4M3, hfp8.E5M2, FloatFormat(3, 4, 3, "ieee"),
                                 FloatFormat(3, 2, 3, "none")], ids=str)
@pytest.mark.parametrize("method", ["max", "mse"])
def test_streaming_bias_equals_bias_of_all_data_at_once(fmt, method):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=generator) * scale for scale in (0.1, 3.0, 0.02, 1.0)]
    batches.append(torch.tensor([30.0, -0.0, 0.0]))  # an outlier and zeros
    observer = HistogramObserver()
    for batch in batches:
        observer.observe(batch)
    everything = torch.cat(batches)
    assert observer.exponent_bias(fmt, method) == hfp8.select_exponent_bias(everything, fmt, method)


def test_histogram_squared_error_is_exact_for_e4m3():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 7
    observer = HistogramObserver()
    observer.observe(x)
    together = observer.squared_errors(hfp8.E4M3, [5, 7, 9, 12])  # all biases in one rounding
    for index, bias in enumerate((5, 7, 9, 12)):
        fmt = hfp8.E4M3.with_bias(bias)
        direct = float(((hfp8.fake_quantize(x, fmt).double() - x.double()) ** 2).sum())
        assert observer.squared_error(fmt) == pytest.approx(direct, rel=1e-9)
        assert float(together[index]) == pytest.approx(direct, rel=1e-9)
    assert HistogramObserver().squared_errors(hfp8.E4M3, [5, 7]).tolist() == [0.0, 0.0]


def test_amax_is_exact_and_ignores_non_finite_values():
    observer = HistogramObserver(sample_size=16)
    x = torch.randn(10_000)
    x[1234] = 99.5
    observer.observe(torch.cat([x, torch.tensor([math.nan, math.inf])]))
    assert observer.amax == 99.5
    assert observer.num_values == 10_002


def test_summary_fractions_on_planted_data():
    fmt = hfp8.E4M3  # max 448, half the smallest subnormal 2^-10
    x = torch.cat([torch.full((10,), 1000.0), torch.full((30,), 1e-4), torch.zeros(60),
                   torch.full((900,), 1.0)])
    observer = HistogramObserver()
    observer.observe(x)
    summary = observer.summary(fmt)
    assert summary["saturated_fraction"] == pytest.approx(0.01)
    assert summary["flushed_fraction"] == pytest.approx(0.03)
    assert summary["zero_fraction"] == pytest.approx(0.06)
    expected_sqnr = 10 * math.log10(float((x.double() ** 2).sum()) /
                                    float(((hfp8.fake_quantize(x, fmt) - x).double() ** 2).sum()))
    assert summary["sqnr_db"] == pytest.approx(expected_sqnr, rel=1e-9)


def test_memory_does_not_grow_with_the_number_of_values():
    observer = HistogramObserver(sample_size=1000)
    sizes = [t.numel() * t.element_size() for t in (observer.counts, observer.sums, observer.squares)]
    for _ in range(50):
        observer.observe(torch.randn(100_000))
    assert [t.numel() * t.element_size() for t in (observer.counts, observer.sums,
                                                   observer.squares)] == sizes
    assert observer.counts.sum() == 50 * 1000


def test_nothing_observed_gives_the_formats_own_bias():
    observer = HistogramObserver()
    assert observer.exponent_bias(hfp8.E4M3.with_bias(5)) == 5
    observer.observe(torch.zeros(10))
    assert observer.exponent_bias(hfp8.E4M3.with_bias(5), "max") == 5


def _positions_in_batches(observer, numel, num_batches=3):
    """The sample positions ``observer`` draws for a tensor of ``numel`` values in each batch of
    a pass."""
    batches = [torch.zeros(1)] * num_batches
    return [observer._sample_positions(numel)
            for _ in calibration_batches(batches, None, torch.device("cpu"), "test", True)]


def test_sample_positions_are_uniform_over_the_tensor():
    # 10 positions, 65536 draws: each count is 6553.6 +- 77 (binomial sd); 5 sd either side
    positions = _positions_in_batches(HistogramObserver(), 10, num_batches=1)[0]
    assert positions.dtype == torch.int64 and positions.numel() == 1 << 16
    counts = torch.bincount(positions, minlength=10)
    assert counts.numel() == 10
    assert (counts - 6553.6).abs().max() < 5 * 77


@pytest.mark.parametrize("numel", [(1 << 16) + 1, 1 << 32, (1 << 32) + 1],
                         ids=["just-over-the-sample", "largest-shared-draw", "own-draw"])
def test_sample_positions_stay_inside_the_tensor(numel):
    positions = torch.cat(_positions_in_batches(HistogramObserver(), numel))
    assert 0 <= int(positions.min()) and int(positions.max()) < numel
    assert int(positions.max()) > numel * 0.99  # the top of the range is reached, not cut


def test_one_draw_per_batch_serves_every_observer_and_every_pass():
    first, second = HistogramObserver(), HistogramObserver()
    small, large = _positions_in_batches(first, 1000), _positions_in_batches(second, 4000)
    again = _positions_in_batches(HistogramObserver(), 1000)  # a later pass: the same batches
    for batch in range(3):
        assert torch.equal(small[batch], again[batch])
        assert torch.equal(small[batch], large[batch] // 4)  # the same r, scaled to each size
    assert not torch.equal(small[0], small[1])  # a new draw for each batch
    other_seed = _positions_in_batches(HistogramObserver(seed=1), 1000)
    assert not torch.equal(small[0], other_seed[0])


def test_outside_a_pass_each_observe_draws_anew():
    observer = HistogramObserver()
    assert not torch.equal(observer._sample_positions(1000), observer._sample_positions(1000))


def test_observing_is_invisible_to_an_active_torch_function_mode():
    class Counting(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    observer = HistogramObserver(sample_size=16)
    x = torch.randn(1000)
    with Counting():
        observer.observe(x)
    assert Counting.calls == 0
    assert observer.amax == float(x.abs().max()) and observer.counts.sum() == 16
