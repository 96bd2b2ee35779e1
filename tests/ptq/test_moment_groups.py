"""Second moments measured in groups of layers when they would not fit MOMENTS_BYTES together."""
from __future__ import annotations

import torch
from torch import nn

import hfp8
from hfp8.calibration.input_moments import moment_bytes
from hfp8.ptq import calibrate, pipeline
from hfp8.ptq.calibrate import moment_groups
from hfp8.ptq.quantizers import quantized_layers
from tests.small_models import calibration_batches, trained


def test_moment_bytes_is_eight_bytes_per_entry_of_each_groups_square_or_its_upper_bands():
    assert moment_bytes(nn.Linear(10, 3)) == 8 * 10 * 10
    # 600 wide: bands of 256 rows from the diagonal on, rows 0-255, 256-511, 512-599
    assert moment_bytes(nn.Linear(600, 3)) == 8 * (256 * 600 + 256 * 344 + 88 * 88)
    assert moment_bytes(nn.Conv2d(8, 16, 3, groups=2)) == 8 * 2 * (4 * 9) ** 2
    assert moment_bytes(nn.Conv1d(4, 4, 5, groups=4)) == 8 * 4 * 5 ** 2


def test_groups_keep_model_order_last_group_first_and_stay_under_the_limit():
    qmodel = hfp8.quantize_model(trained("cnn"), calibration_batches(1),
                                 hfp8.QuantConfig(weight_rounding="nearest", float_budget=0),
                                 quiet=True)
    layers = quantized_layers(qmodel)
    sizes = {name: moment_bytes(layer) for name, layer in layers.items()}
    assert moment_groups(qmodel, 10**12) == [list(layers)]
    assert moment_groups(qmodel, 1) == [[name] for name in reversed(layers)]  # one may exceed
    limit = max(sizes.values()) + 1
    groups = moment_groups(qmodel, limit)
    assert [name for group in groups[::-1] for name in group] == list(layers)
    assert all(sum(sizes[name] for name in group) <= limit for group in groups)
    # the order of first calls wins over registration order; unnamed layers follow
    called = list(layers)[1:][::-1]
    expected = called + list(layers)[:1]
    assert moment_groups(qmodel, 1, called) == [[name] for name in reversed(expected)]


def test_one_pass_per_group_holds_one_groups_moments_and_gives_the_single_pass_weights(monkeypatch):
    """With a limit of one byte every layer has its own (moments-only) pass and each pass holds
    one layer's moments. Measured from the last layer back, each layer's input still comes from
    layers rounded to nearest, as in one pass: the quantized model is the single pass's, bit for
    bit (measuring front to back, as before, gave other weights). Each pass after the first
    stops its forward at its layer: the last layer runs in the first pass only."""
    model = trained("cnn")
    batches = calibration_batches(3)
    config = hfp8.QuantConfig(float_budget=0.0, bn_recalibration="none")
    held, last_layer_calls = [], []
    original = calibrate.analysis_pass

    def counting(qmodel, *args, **kwargs):
        last = qmodel.get_submodule(list(quantized_layers(qmodel))[-1])
        calls = [0]
        handle = last.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            observers, moments = original(qmodel, *args, **kwargs)
        finally:
            handle.remove()
        held.append(len(moments))
        last_layer_calls.append(calls[0])
        return observers, moments

    monkeypatch.setattr(pipeline, "analysis_pass", counting)
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 10**12)
    single = hfp8.quantize_model(model, batches, config, quiet=True)
    layers = len(quantized_layers(single))
    assert held == [layers] and layers >= 3
    held.clear(), last_layer_calls.clear()
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 1)
    grouped = hfp8.quantize_model(model, batches, config, quiet=True)
    assert held == [1] * layers
    assert last_layer_calls == [config.analysis_batches] + [0] * (layers - 1)
    for key, value in single.state_dict().items():
        assert torch.equal(value, grouped.state_dict()[key]), key


def _assert_one_layer_per_pass_gives_the_single_pass(model, batches, monkeypatch) -> None:
    """Every layer quantized (first and last too), compensated, no budget: the state dict with
    one analysis pass equals the one with a pass per layer (MOMENTS_BYTES of one byte)."""
    config = hfp8.QuantConfig(float_budget=0.0, keep_first_and_last=False)
    single = hfp8.quantize_model(model, batches, config, quiet=True)
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 1)
    grouped = hfp8.quantize_model(model, batches, config, quiet=True)
    for key, value in single.state_dict().items():
        assert torch.equal(value, grouped.state_dict()[key]), key


def test_a_layer_that_runs_twice_per_forward_gets_its_whole_pass(monkeypatch):
    """A layer called twice per forward (shared weights) sees both calls' inputs in its own
    moments-only pass: its pass does not stop at the first call, so the weights are again the
    single pass's."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.shared, self.last = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.last(self.shared(torch.relu(self.shared(self.first(x)))))

    model = Twice().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    _assert_one_layer_per_pass_gives_the_single_pass(model, batches, monkeypatch)


def test_each_square_is_made_when_its_rounding_run_starts_and_gone_when_it_ends(monkeypatch):
    """Wide layers hold half their square until compensated rounding takes it; the squares are
    made run by run (one layer per run here), so no two are alive at once, whatever the number
    of layers in the group."""
    import weakref

    from hfp8.calibration.input_moments import InputMoments
    from hfp8.ptq import refinement, weight_rounding

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(520, 520) for _ in range(4))).eval()
    batches = [torch.randn(64, 520) for _ in range(2)]
    made = []
    alive_when_made = []
    original = InputMoments.reversed_square

    def tracking(self, dtype, release):
        alive_when_made.append(sum(ref() is not None for ref in made))
        square = original(self, dtype, release)
        made.append(weakref.ref(square))
        return square

    monkeypatch.setattr(InputMoments, "reversed_square", tracking)
    monkeypatch.setattr(refinement, "rounded_runs",  # work space of one byte: a run per layer
                        lambda problems, fmt: weight_rounding.rounded_runs(problems, fmt, 1))
    hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0,
                                                         keep_first_and_last=False), quiet=True)
    assert len(made) == 4 and alive_when_made == [0, 0, 0, 0]


def test_a_moments_only_pass_sees_the_activations_unrounded_as_the_first_pass_does(monkeypatch):
    """Activations far beyond E4M3's range (|x| ~ 1e4 > 448): a point left to round at its
    provisional bias during a moments-only pass would saturate them and feed the next layer's
    moments other values than the single pass measured; every point passes them unrounded, so
    the weights are again the single pass's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = [1e4 * torch.randn(32, 16) for _ in range(2)]
    _assert_one_layer_per_pass_gives_the_single_pass(model, batches, monkeypatch)
