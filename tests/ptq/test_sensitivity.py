"""Per-layer sensitivity (the estimate) and, through quantize_model, the budgeted choice."""

import copy

import pytest
import torch
from torch import nn

import hfp8
from hfp8.data.model_io import call_model
from hfp8.ptq.quantizers import quantized_layers
from hfp8.ptq.sensitivity import layer_sensitivity


def _fragile_model():
    """stem -> conv -> [fragile 1x1 conv -> BN with near-dead channels] -> conv -> head.
    Channels 6 and 7 of the fragile conv read only a constant input channel, so their float
    output is constant and BN's running variance is ~0 (MobileNetV2's first depthwise conv,
    planted): any rounding of their weights is divided by sqrt(eps)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),                       # 0 stem (first)
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),                       # 2
        nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # 4 fragile, 5 BN
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),                       # 7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))         # 11 head (last)
    with torch.no_grad():
        model[2].weight[3] = 0.0
        model[2].bias[3] = 1.0                  # channel 3 of layer 2's output is constant 1
        model[4].weight[6:] = 0.0
        model[4].weight[6, 3] = 0.31
        model[4].weight[7, 3] = -0.73
        model[5].bias.fill_(0.1)
    batches = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    hfp8.recalibrate_batchnorm(model, batches, quiet=True)  # exact statistics: var ~0 for 6, 7
    return model.eval(), batches


@torch.no_grad()
def _measured_alone(model, qmodel, names, batches):
    """Output noise-to-signal ratio with only one layer quantized (one pass per layer)."""
    result = {}
    for name in names:
        alone = copy.deepcopy(model)
        layer = qmodel.get_submodule(name)
        alone.get_submodule(name).register_forward_hook(lambda m, a, o, layer=layer: layer(*a))
        noise = signal = 0.0
        for batch in batches:
            reference, test = call_model(model, batch).double(), call_model(alone, batch).double()
            noise += float((test - reference).square().sum())
            signal += float(reference.square().sum())
        result[name] = noise / signal
    return result


def test_the_estimate_finds_the_planted_fragile_layer_and_ranks_like_quantizing_alone():
    model, batches = _fragile_model()
    config = hfp8.QuantConfig(float_budget=0.0, bn_recalibration="none")
    qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
    names = list(quantized_layers(qmodel))
    assert names == ["2", "4", "7"]
    estimate = layer_sensitivity(model, qmodel, names, batches, num_batches=2)
    measured = _measured_alone(model, qmodel, names, batches)
    assert max(estimate, key=estimate.get) == "4" == max(measured, key=measured.get)
    assert sorted(names, key=estimate.get) == sorted(names, key=measured.get)
    # first order: within a factor of 3 of the measured ratio where the model is near linear;
    # the fragile layer's error is so large that the ReLU after it clips it (estimate 3.1,
    # measured 0.037): over-estimated, still ranked first by far
    for name in ("2", "7"):
        assert measured[name] / 3 < estimate[name] < measured[name] * 3, (name, estimate, measured)
    assert estimate["4"] > measured["4"]


def test_quantize_model_keeps_the_fragile_layer_float_within_its_budget():
    model, batches = _fragile_model()
    weights = {n: model.get_submodule(n).weight.numel() for n in ("2", "4", "7")}
    budget = (weights["4"] + 1) / sum(weights.values())  # room for the fragile layer only
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=budget), quiet=True)
    assert set(quantized_layers(qmodel)) == {"2", "7"}
    report = hfp8.manifest(qmodel)
    layer = next(entry for entry in report["layers"] if entry["name"] == "4")
    assert layer["status"] == "float" and layer["reason"].startswith("sensitive: predicted")
    assert {e["name"]: e["float"] for e in report["sensitivity"]} == {"2": False, "4": True, "7": False}
    text = hfp8.format_manifest(report)
    assert "sensitive" in text and "pred. dB" in text


def test_budget_in_multiply_accumulates_and_target_through_the_config():
    model, batches = _fragile_model()
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(
        float_budget=1.0, budget_unit="macs", target_sqnr_db=-100.0), quiet=True)
    assert set(quantized_layers(qmodel)) == {"2", "4", "7"}  # the target is met at once
    with pytest.raises(ValueError, match="float_budget must be a fraction"):
        hfp8.QuantConfig(float_budget=1.5)
    with pytest.raises(ValueError, match="budget_unit"):
        hfp8.QuantConfig(budget_unit="flops")


def test_layers_whose_results_are_discarded_cause_no_predicted_error():
    """A quantized branch whose output the model computes and throws away: no output depends
    on it, so its predicted harm is 0 (and the estimate does not fail for lack of a gradient)."""
    class Discarding(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = self.stem(x)
            self.branch(y)  # computed, discarded
            return self.head(y.mean((2, 3)))
    torch.manual_seed(0)
    qmodel = hfp8.quantize_model(Discarding().eval(), [torch.randn(4, 3, 8, 8) for _ in range(3)],
                                 quiet=True)
    entries = hfp8.manifest(qmodel)["sensitivity"]
    assert [entry["name"] for entry in entries] == ["branch.0", "branch.1"]
    assert all(entry["nsr"] == 0.0 and not entry["float"] for entry in entries)


def test_the_progress_bar_counts_layers_so_one_long_batch_does_not_look_hung(capsys):
    """One batch of large images takes many seconds (issue 20: 23.6 s with a bar at 0/1): the
    bar advances per layer and says which pass runs."""
    model, batches = _fragile_model()
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    names = list(quantized_layers(qmodel))
    layer_sensitivity(model, qmodel, names, batches, num_batches=1, quiet=False)
    shown = capsys.readouterr().err
    assert "Layer sensitivity" in shown and f"/{len(names)} [" in shown and "layer/s" in shown
    assert "batch 1, forward" in shown


def _counting_forwards(model):
    """A list that gets one entry per forward of ``model`` or any copy of it made later
    (the estimate's reference is a copy that keeps the model's hooks)."""
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


class TwoHeads(nn.Module):
    """Two outputs a hundredfold apart in scale (the projection scales each by its RMS), or
    only the first."""

    def __init__(self, outputs: int = 2):
        super().__init__()
        self.outputs = outputs
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.small, self.large = nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x):
        features = self.body(x)
        if self.outputs == 1:
            return self.small(features)
        return self.small(features), 100 * self.large(features)


@pytest.mark.parametrize("outputs", ["one output", "two outputs"])
def test_samples_in_chunks_give_the_sums_of_one_forward(outputs, monkeypatch):
    """Past SAVED_BYTES of activations the samples after the first run in chunks (here one at
    a time, with a limit of one byte): the same estimate as one forward over the batch (the
    projection is the whole batch's, each output scaled by the whole batch's RMS: one output's
    after the fact, two outputs' measured first without gradient), to float64 rounding."""
    from hfp8.ptq import sensitivity

    # not _fragile_model: its planted constant channels make BatchNorm divide rounding noise
    # by sqrt(eps), so any reordering of sums moves the estimate by ~1e-8 even in float64
    torch.manual_seed(0)
    model = TwoHeads(1 if outputs == "one output" else 2).eval()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    config = hfp8.QuantConfig(float_budget=0.0, keep_first_and_last=False)
    qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
    names = list(quantized_layers(qmodel))

    # in float64, where reordering the sums moves the estimate by ~1e-16, not float32's ~1e-6
    model, qmodel = copy.deepcopy(model).double(), copy.deepcopy(qmodel).double()
    batches = [batch.double() for batch in batches]

    def estimate():
        return layer_sensitivity(model, qmodel, names, batches, num_batches=2, max_samples=5)
    monkeypatch.setattr(sensitivity, "FIRST_SAMPLES", 5)  # the whole batch in the first forward
    calls = _counting_forwards(model)
    whole = estimate()
    monkeypatch.undo()
    monkeypatch.setattr(sensitivity, "SAVED_BYTES", 1)
    chunked = estimate()
    # per batch: the whole batch in one forward; then the first sample, two without gradient
    # (one row per sample?), and one at a time (two outputs: the RMS of both measured first
    # without gradient, one at a time)
    no_gradient = [] if outputs == "one output" else [1, 1, 1, 1, 1]
    assert calls == [5, 5] + ([1, 2, *no_gradient, 1, 1, 1, 1]) * 2
    for name in names:
        assert chunked[name] == pytest.approx(whole[name], rel=1e-12, abs=0), name


def test_a_batch_within_the_limit_runs_in_two_forwards_with_gradient():
    """Within SAVED_BYTES: the first sample (its saved bytes measured), two samples without
    gradient (one row per sample?), then the rest in one forward."""
    model, batches = _fragile_model()
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    calls = _counting_forwards(model)
    layer_sensitivity(model, qmodel, list(quantized_layers(qmodel)), batches, max_samples=5)
    assert calls == [1, 2, 4]


class Summed(nn.Module):
    """An output summed over the batch: one row whatever the batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                                  nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x).sum(0, keepdim=True)


class BatchContext(nn.Module):
    """Outputs with a row per sample, but a quantized layer that sees the batch's mean."""

    def __init__(self):
        super().__init__()
        self.body, self.context = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return self.head(features + self.context(features.mean(0, keepdim=True)))


@pytest.mark.parametrize("model_class", [Summed, BatchContext],
                         ids=["output summed over the batch", "layer on the batch mean"])
def test_a_reduction_over_the_batch_keeps_one_forward(model_class, monkeypatch):
    """Something of one row whatever the batch (an output, or what a quantized layer sees):
    chunks cannot be told apart in it or would change it, so the batch runs in one forward
    even past the limit. The first forward's one sample gives one row too: the forward on two
    without gradient tells."""
    from hfp8.ptq import sensitivity

    torch.manual_seed(0)
    model, batches = model_class().eval(), [torch.randn(4, 6) for _ in range(2)]
    config = hfp8.QuantConfig(float_budget=0.0, keep_first_and_last=False)
    qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
    calls = _counting_forwards(model)
    monkeypatch.setattr(sensitivity, "SAVED_BYTES", 1)
    layer_sensitivity(model, qmodel, list(quantized_layers(qmodel)), batches, max_samples=4)
    assert calls == [1, 2, 4]  # the first sample, two (one row, not two), then one forward


def test_the_estimate_leaves_no_tensor_alive():
    """The probe that measures what autograd saves must not keep its graph: a pack hook that
    hands back an output it saves makes a reference cycle through C++ (before: 170 tensors,
    a reference copy's parameters and the probe's activations, left per quantize_model of the
    10M decoder)."""
    import gc

    model, batches = _fragile_model()
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    names = list(quantized_layers(qmodel))

    def live_tensors():
        gc.collect()
        # type(), not isinstance: some module objects warn when asked for their class
        return sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())
    layer_sensitivity(model, qmodel, names, batches)  # anything made once per process
    before = live_tensors()
    layer_sensitivity(model, qmodel, names, batches)
    assert live_tensors() == before
