"""Second moments measured in groups of layers when they would not fit MOMENTS_BYTES together."""
from __future__ import annotations

import torch
from torch import nn

import hfp8
from hfp8.calibration.input_moments import moment_bytes
from hfp8.numerics.fake_quant import quantize_weight
from hfp8.ptq import calibrate, pipeline
from hfp8.ptq.calibrate import moment_groups
from hfp8.ptq.quantizers import quantized_layers
from tests.small_models import calibration_batches, digits, trained


def test_moment_bytes_is_eight_bytes_per_entry_of_each_groups_square_or_its_upper_bands():
    assert moment_bytes(nn.Linear(10, 3)) == 8 * 10 * 10
    # 600 wide: bands of 256 rows from the diagonal on, rows 0-255, 256-511, 512-599
    assert moment_bytes(nn.Linear(600, 3)) == 8 * (256 * 600 + 256 * 344 + 88 * 88)
    assert moment_bytes(nn.Conv2d(8, 16, 3, groups=2)) == 8 * 2 * (4 * 9) ** 2
    assert moment_bytes(nn.Conv1d(4, 4, 5, groups=4)) == 8 * 4 * 5 ** 2


def test_groups_keep_model_order_and_stay_under_the_limit():
    qmodel = hfp8.quantize_model(trained("cnn"), calibration_batches(1),
                                 hfp8.QuantConfig(weight_rounding="nearest", float_budget=0),
                                 quiet=True)
    layers = quantized_layers(qmodel)
    sizes = {name: moment_bytes(layer) for name, layer in layers.items()}
    assert moment_groups(qmodel, 10**12) == [list(layers)]
    assert moment_groups(qmodel, 1) == [[name] for name in layers]  # one layer alone may exceed
    limit = max(sizes.values()) + 1
    groups = moment_groups(qmodel, limit)
    assert [name for group in groups for name in group] == list(layers)
    assert all(sum(sizes[name] for name in group) <= limit for group in groups)


def test_one_pass_per_group_holds_one_groups_moments_and_still_compensates(monkeypatch):
    """With a limit of one byte every layer has its own (moments-only) pass; each pass holds
    one layer's moments; the weights land on their grids and compensated rounding still beats
    rounding to nearest on held-out data. With a limit no model reaches, the result is the
    single pass's, bit for bit."""
    model = trained("cnn")
    batches, held_out = calibration_batches(3), digits()[2]
    config = hfp8.QuantConfig(float_budget=0.0, bn_recalibration="none")
    single = hfp8.quantize_model(model, batches, config, quiet=True)
    held = []
    original = calibrate.analysis_pass

    def counting(*args, **kwargs):
        observers, moments = original(*args, **kwargs)
        held.append(len(moments))
        return observers, moments

    monkeypatch.setattr(pipeline, "analysis_pass", counting)
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 10**12)
    unbounded = hfp8.quantize_model(model, batches, config, quiet=True)
    for key, value in single.state_dict().items():
        assert torch.equal(value, unbounded.state_dict()[key]), key
    layers = len(quantized_layers(single))
    assert held == [layers]
    held.clear()
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 1)
    grouped = hfp8.quantize_model(model, batches, config, quiet=True)
    assert held == [1] * layers
    for name, layer in quantized_layers(grouped).items():
        bias = layer.weight_exponent_bias
        assert torch.equal(layer.weight, quantize_weight(layer.weight, hfp8.E4M3, bias)), name
    nearest = hfp8.quantize_model(model, batches, hfp8.QuantConfig(
        float_budget=0.0, bn_recalibration="none", weight_rounding="nearest"), quiet=True)
    with torch.no_grad():
        reference = model(held_out)

        def error(qmodel):
            return float((qmodel(held_out) - reference).double().square().sum())
        assert error(grouped) < error(nearest)
