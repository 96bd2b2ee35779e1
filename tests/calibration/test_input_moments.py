import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hfp8.calibration.input_moments import InputMoments, moment_bytes, supports


def _reference_rows(layer, x):
    """Every input row, through F.unfold on the whole input (the slow, obvious way)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        padding, dilation = (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        kernel, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    n, features, positions = patches.shape
    groups = layer.groups
    return patches.view(n, groups, features // groups, positions).permute(1, 0, 3, 2) \
        .reshape(groups, n * positions, features // groups)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2), (2, 6, 9, 9)),
    (nn.Conv2d(3, 3, 3, padding=2, dilation=2, groups=3), (2, 3, 8, 8)),  # depthwise, dilated
    (nn.Conv2d(4, 8, 1), (3, 4, 5, 6)),
    (nn.Conv2d(4, 4, 1, stride=2, groups=2), (2, 4, 7, 6)),
    (nn.Conv2d(3, 6, (3, 2), stride=(2, 3), padding=(2, 1), groups=3), (2, 3, 9, 11)),
    (nn.Conv2d(5, 2, (4, 3), stride=(1, 2), padding=(0, 2), dilation=(2, 1)), (2, 5, 10, 7)),
    (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
    (nn.Linear(5, 3), (2, 7, 5)),
    # wide enough for the Gram product in column strips, the last strip shorter than the rest
    (nn.Linear(600, 3), (3, 40, 600)),
    (nn.Conv2d(128, 4, 3, padding=1, groups=2), (2, 128, 5, 5)),  # 2 groups of 576 columns
], ids=["grouped-strided", "depthwise-dilated", "pointwise", "pointwise-grouped-strided",
        "depthwise-multiplier-asymmetric", "full-dilated-uneven-padding", "conv1d", "linear",
        "linear-wide-strips", "grouped-wide-strips"])
def test_second_moments_equal_the_unfolded_inputs(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    moments = InputMoments(layer, max_rows=10**9)
    moments.observe(x)
    moments.observe(2 * x)  # streaming: the average over both calls
    rows = _reference_rows(layer, x).double()
    expected = 2.5 * torch.bmm(rows.transpose(1, 2), rows) / rows.shape[1]
    torch.testing.assert_close(moments.hessian(), expected, rtol=1e-5, atol=1e-6)
    assert moments.hessian().shape[0] == layer.groups if not isinstance(layer, nn.Linear) else 1


def test_rows_per_call_are_bounded_and_nothing_observed_is_none():
    layer = nn.Conv2d(8, 8, 3, padding=1)
    moments = InputMoments(layer, max_rows=100)
    assert moments.hessian() is None
    moments.observe(torch.randn(4, 8, 32, 32))
    assert moments.count == 100


def test_unsupported_layers_are_said_so():
    assert not supports(nn.Conv3d(2, 2, 3))
    assert not supports(nn.Conv2d(2, 2, 3, padding="same"))
    assert not supports(nn.Conv2d(2, 2, 3, padding_mode="circular"))
    with pytest.raises(ValueError, match="not supported"):
        InputMoments(nn.Conv3d(2, 2, 3))


def test_sampled_rows_are_rows_of_the_unfolded_input():
    """With fewer rows per call than positions, every gathered row is one of the layer's input
    rows (checked as a set against the unfold reference), for the depthwise and general paths."""
    torch.manual_seed(0)
    for layer, shape in [(nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 6, 5)),
                         (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7))]:
        x = torch.randn(*shape)
        moments = InputMoments(layer, max_rows=7)
        from hfp8.calibration.input_moments import _rows
        sampled = _rows(layer, x, 7, torch.Generator().manual_seed(3))
        reference = _reference_rows(layer, x)
        assert sampled.shape == (reference.shape[0], 7, reference.shape[2])
        for group in range(reference.shape[0]):
            for row in sampled[group]:
                assert (reference[group] == row).all(dim=1).any()
        moments.observe(x)
        assert moments.count == 7


def test_a_wide_layer_holds_only_the_upper_bands_and_moment_bytes_counts_them():
    """A 2048-wide layer accumulates its upper bands only (about (d + 256) / 2d of the square)
    and moment_bytes, which the grouping of analysis passes relies on, is what it holds."""
    layer = nn.Linear(2048, 1)
    moments = InputMoments(layer)
    moments.observe(torch.randn(3, 2048))
    held = sum(band.numel() * band.element_size() for band in moments.bands)
    assert held == moment_bytes(layer)
    assert held <= (2048 + 256) / (2 * 2048) * 8 * 2048 ** 2
    square = moments.hessian()
    assert torch.equal(square, square.transpose(1, 2))  # mirrored from the bands


def test_reducing_across_ranks_sums_every_band_and_an_idle_rank_sends_the_same_shapes(monkeypatch):
    """With a process group, each band is all-reduced; a rank that saw nothing sends zeros of
    the very shapes the others send (gloo needs equal shapes). Two identical ranks are faked by
    an all_reduce that doubles: the Hessian is unchanged, exactly."""
    from hfp8.calibration import input_moments

    sent = []

    def doubling(tensor, op="sum"):
        sent.append(tuple(tensor.shape))
        return tensor.mul_(2)

    monkeypatch.setattr(input_moments.distributed, "active", lambda: True)
    monkeypatch.setattr(input_moments.distributed, "all_reduce", doubling)
    layer = nn.Linear(600, 2)
    seen = InputMoments(layer, max_rows=10**9)
    seen.observe(torch.randn(5, 600))
    before = seen.hessian()
    seen.reduce()
    assert torch.equal(seen.hessian(), before)
    shapes_of_a_rank_that_saw_data, sent[:] = list(sent), []
    idle = InputMoments(layer)
    idle.reduce()  # zeros from every rank: still nothing observed
    assert sent == shapes_of_a_rank_that_saw_data and len(sent) == 4  # 3 bands and the count
    assert idle.hessian() is None


@pytest.mark.parametrize("width", [300, 600])  # one band (the square), three bands
def test_the_reversed_square_made_from_the_bands_is_the_hessians_where_it_is_read(width):
    """What compensated rounding factors, made straight from the bands in float32: the
    reversed Hessian's diagonal and lower triangle bit for bit (the Cholesky factorization
    reads nothing else); a narrow layer's upper triangle is the square's, a wide one's holds
    the square's values inside the bands' diagonal blocks and 0 elsewhere."""
    from hfp8.ptq.weight_rounding import reversed_square

    moments = InputMoments(nn.Linear(width, 2), max_rows=10**9)
    moments.observe(torch.randn(50, width))
    moments.observe(torch.randn(30, width))
    expected = reversed_square(moments.hessian(), torch.float32)
    made = moments.reversed_square(torch.float32, release=True)
    assert made.dtype == torch.float32 and moments.bands is None
    assert torch.equal(made.tril(), expected.tril())
    upper, expected_upper = made.triu(1), expected.triu(1)
    if width < 512:
        assert torch.equal(upper, expected_upper)
    else:
        assert bool(((upper == expected_upper) | (upper == 0)).all()) and upper.count_nonzero()
