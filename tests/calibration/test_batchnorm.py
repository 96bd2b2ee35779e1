import copy

import pytest
import torch
from torch import nn

import hfp8
from tests.small_models import calibration_batches, trained


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key in state:
        assert torch.equal(now[key], state[key]), key


def test_statistics_equal_a_direct_computation_over_all_data():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1),
                          nn.BatchNorm2d(4))
    # unequal batch sizes: a cumulative average over values, not over batches
    batches = [torch.randn(n, 3, 9, 9) * 2 + 1 for n in (7, 3, 11)]
    hfp8.recalibrate_batchnorm(model, batches, quiet=True)
    with torch.no_grad():
        inputs = conv(torch.cat(batches)).permute(1, 0, 2, 3).reshape(5, -1).double()
    expected_mean = inputs.mean(dim=1)
    expected_var = ((inputs - expected_mean[:, None]) ** 2).sum(dim=1) / (inputs.shape[1] - 1)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=1e-6, atol=1e-6)


def test_second_layer_sees_batch_normalized_inputs():
    # the second BN's input depends on the first BN normalizing with batch statistics
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3), nn.BatchNorm1d(3))
    batches = [torch.randn(16, 6) for _ in range(3)]
    hfp8.recalibrate_batchnorm(model, batches, quiet=True)
    with torch.no_grad():
        outputs = []
        for x in batches:
            h = model[0](x)
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
            h = h * model[1].weight + model[1].bias
            outputs.append(model[2](h))
        inputs = torch.cat(outputs).double()
    torch.testing.assert_close(model[3].running_mean.double(), inputs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[3].running_var.double(), inputs.var(0), rtol=1e-5, atol=1e-6)


def test_everything_else_is_left_as_found():
    model = trained("cnn").train()
    model[0][1].momentum = 0.37
    model[2].eval()
    before = _state(model)
    flags = {name: m.training for name, m in model.named_modules()}
    hfp8.recalibrate_batchnorm(model, calibration_batches(2), quiet=True)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model[0][1].momentum == 0.37
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(after[key], value), key  # weights, num_batches_tracked untouched
    assert not torch.equal(after["0.1.running_mean"], before["0.1.running_mean"])


def test_state_restored_when_the_calibration_iterable_raises_midway():
    model = trained("resnet")
    model.train()
    model[1].eval()
    before = _state(model)
    flags = {name: m.training for name, m in model.named_modules()}
    hooks = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}

    def failing():
        yield calibration_batches(1)[0]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        hfp8.recalibrate_batchnorm(model, failing(), quiet=True)
    _assert_same_state(model, before)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_dropout_stays_off_during_the_pass():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.BatchNorm1d(4)).eval()
    batches = [torch.randn(32, 4)]
    hfp8.recalibrate_batchnorm(model, batches, quiet=True)
    with torch.no_grad():
        expected = model[0](batches[0]).double()
    torch.testing.assert_close(model[2].running_mean.double(), expected.mean(0), rtol=1e-6, atol=1e-7)


def _conv_bn_pair(running_var, weight_shift, running_mean=None):
    """A float conv + BN ``reference`` and a copy whose conv weight moved by ``weight_shift`` (a
    deterministic perturbation like weight rounding)."""
    reference = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        if running_mean is not None:
            reference[1].running_mean.copy_(running_mean)
        reference[1].running_var.copy_(running_var)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.add_(weight_shift)
    return reference, model


def _expected_shift(reference, model, batches, base_mean, base_var):
    """The "shift" statistics computed directly: the base plus the difference of the two
    convolutions' per-channel mean and unbiased variance over ``batches``."""
    with torch.no_grad():
        x = torch.cat(batches)
        a = reference[0](x).transpose(0, 1).reshape(4, -1).double()
        b = model[0](x).transpose(0, 1).reshape(4, -1).double()
    return (base_mean.double() + b.mean(1) - a.mean(1),
            (base_var.double() + b.var(1) - a.var(1)).clamp_min(0))


def test_shift_method_adds_the_quantization_shift_to_the_reference_statistics():
    torch.manual_seed(3)
    reference, model = _conv_bn_pair(torch.tensor([4.0, 1.0, 0.25, 1e-30]), 0.1,
                                     running_mean=torch.tensor([1.0, -2.0, 0.5, 0.0]))
    with torch.no_grad():
        # stale statistics from an earlier re-estimation: they must not be the base
        model[1].running_mean.add_(3.0)
        model[1].running_var.mul_(5.0)
    batches = [torch.randn(8, 2, 6, 6) for _ in range(3)]
    original_mean = reference[1].running_mean.clone()
    original_var = reference[1].running_var.clone()
    hfp8.recalibrate_batchnorm(model, batches, method="shift", reference=reference, quiet=True)
    expected_mean, expected_var = _expected_shift(reference, model, batches, original_mean,
                                                  original_var)
    torch.testing.assert_close(model[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), expected_var, rtol=1e-5, atol=1e-6)
    # the reference is left exactly as it was
    assert torch.equal(reference[1].running_mean, torch.tensor([1.0, -2.0, 0.5, 0.0]))


def test_shift_method_run_twice_does_not_add_the_shift_twice():
    torch.manual_seed(4)
    reference, model = _conv_bn_pair(torch.full((4,), 2.0), 0.2)
    batches = [torch.randn(8, 2, 6, 6) for _ in range(2)]
    hfp8.recalibrate_batchnorm(model, batches, method="shift", reference=reference, quiet=True)
    once = (model[1].running_mean.clone(), model[1].running_var.clone())
    assert (once[0] - reference[1].running_mean).abs().max() > 0.05  # there is a shift to add
    hfp8.recalibrate_batchnorm(model, batches, method="shift", reference=reference, quiet=True)
    torch.testing.assert_close(model[1].running_mean, once[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, once[1], rtol=1e-5, atol=1e-6)


def test_num_batches_limits_the_pass():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    report = hfp8.recalibrate_batchnorm(model, [torch.randn(4, 3)] * 10, num_batches=3, quiet=True)
    assert (report["batches"], report["samples"]) == (3, 12)


def test_models_without_batchnorm_and_errors():
    assert hfp8.recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(2, 2)],
                                      quiet=True)["batchnorm_layers"] == 0
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="more than one value per channel"):
        hfp8.recalibrate_batchnorm(model, [torch.randn(1, 3)], quiet=True)
    with pytest.raises(ValueError, match="reference"):
        hfp8.recalibrate_batchnorm(model, [torch.randn(4, 3)], method="shift", quiet=True)
    with pytest.raises(ValueError, match="method"):
        hfp8.recalibrate_batchnorm(model, [torch.randn(4, 3)], method="ema", quiet=True)


def test_measure_every_measures_the_shift_on_every_kth_batch_only():
    # the shift of batches 0, 2 and 4, computed directly; the model still runs all five
    torch.manual_seed(5)
    reference, model = _conv_bn_pair(torch.full((4,), 3.0), 0.1)
    batches = [torch.randn(n, 2, 6, 6) + index for index, n in enumerate((8, 5, 6, 7, 3))]
    seen = {"model": [], "reference": []}
    model[0].register_forward_hook(lambda m, a, o: seen["model"].append(a[0].shape[0]))
    reference[0].register_forward_hook(lambda m, a, o: seen["reference"].append(a[0].shape[0]))
    report = hfp8.recalibrate_batchnorm(model, batches, method="shift", reference=reference,
                                        measure_every=2, quiet=True)
    assert seen == {"model": [8, 5, 6, 7, 3], "reference": [8, 6, 3]}
    assert (report["batches"], report["samples"]) == (5, 29)
    assert (report["measured_batches"], report["measured_samples"]) == (3, 17)
    expected_mean, expected_var = _expected_shift(reference, model, batches[::2],
                                                  reference[1].running_mean, reference[1].running_var)
    torch.testing.assert_close(model[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), expected_var, rtol=1e-5, atol=1e-6)


def test_measure_every_must_be_a_positive_int():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="measure_every"):
            hfp8.recalibrate_batchnorm(model, [torch.randn(4, 3)], measure_every=bad, quiet=True)
