"""HFP8 training: forward and backward roundings checked against torch's own float8 casts."""

import pytest
import torch
from torch import nn

import hfp8
from hfp8.ptq.quantizers import quantized_layers
from hfp8.training import TrainingConfig, finetune, prepare_training
from hfp8.training.rounding import GradientRounder
from hfp8.training.scaling import DelayedBias
from tests.small_models import calibration_batches, trained


def _cast(x, dtype, bias, base):
    """Round through torch's float8 dtype at scale 2^(base - bias), saturating (clamp first)."""
    scale = 2.0 ** (base - bias)
    limit = torch.finfo(dtype).max
    return (x / scale).clamp(-limit, limit).to(dtype).float() * scale


def _three_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_forward_is_ptq_fake_quantization_at_the_recorded_biases():
    model = _three_linear()
    x = torch.randn(32, 12)
    tmodel, _ = prepare_training(model, x)
    assert list(quantized_layers(tmodel)) == ["2"]  # first and last stay float
    layer = tmodel[2]
    captured = {}
    # the value before its rounding: the ReLU's output
    tmodel[1].register_forward_hook(lambda module, args, y: captured.update(x=y.detach()))
    out = tmodel(x)
    hidden = captured["x"]
    w_bias, x_bias = int(layer.weight_exponent_bias), int(layer.input_exponent_bias)
    weight = _cast(layer.parametrizations.weight.original.detach(), torch.float8_e4m3fn, w_bias, 7)
    expected = model[4](torch.relu(nn.functional.linear(
        _cast(hidden, torch.float8_e4m3fn, x_bias, 7), weight, layer.bias)))
    assert torch.equal(out, expected)


def test_gradients_flowing_back_lie_on_the_e5m2_grid_of_their_recorded_bias():
    model = _three_linear()
    x = torch.randn(32, 12)
    tmodel, training = prepare_training(model, x)
    layer = tmodel[2]
    seen = {}

    layer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))

    def keep_gradient(module, args, y):  # the ReLU before it: its output gets what the input passes back
        y.register_hook(lambda gradient: seen.setdefault("input_gradient", gradient))
    tmodel[1].register_forward_hook(keep_gradient)
    layer.register_forward_hook(lambda module, args, y: seen.update(y=y.detach()))
    out = tmodel(x)
    upstream = torch.randn_like(out) * 1e-3
    out.backward(upstream)
    streams = training.gradient_streams
    # out of the layer's input: on the E5M2 grid of its recorded bias (torch's float8_e5m2)
    input_gradient = seen["input_gradient"]
    assert torch.equal(input_gradient, _cast(input_gradient, torch.float8_e5m2,
                                             streams["2.input"].bias, 15))
    # into its output: the weight gradient is what the layer computes from that rounded gradient
    # and its rounded input; both rebuilt here through torch's float8 casts
    with torch.no_grad():
        at_output = (upstream @ tmodel[4].weight) * (seen["y"] > 0).float()
        rounded_at_output = _cast(at_output, torch.float8_e5m2, streams["2.output"].bias, 15)
        x_q = _cast(seen["x"].detach(), torch.float8_e4m3fn, int(layer.input_exponent_bias), 7)
    master = layer.parametrizations.weight.original
    torch.testing.assert_close(master.grad, rounded_at_output.t() @ x_q, rtol=1e-6, atol=1e-12)
    assert not torch.equal(rounded_at_output, at_output)  # the rounding did something


def test_gradient_rounder_output_is_on_the_grid_torch_casts_to():
    gradient = torch.randn(1000) * 1e-4
    stream = DelayedBias(hfp8.E5M2, history=4)
    rounded = GradientRounder(stream, False, None)(gradient)
    assert torch.equal(rounded, _cast(gradient, torch.float8_e5m2, stream.bias, 15))
    assert not stream.overflowed
    big = GradientRounder(stream, False, None)(gradient * 1e6)  # beyond the delayed choice
    assert stream.overflowed and torch.isfinite(big).all()


def test_stochastic_gradient_rounding_is_unbiased():
    """Mean of 4000 seeded draws of each value within 5 standard errors of the value; only the
    two neighbouring grid points appear."""
    values = torch.linspace(1.01, 1.99, 50) * 2.0 ** -8  # one binade: E5M2 step 2^-10 there
    stream = DelayedBias(hfp8.E5M2, history=1)
    rounder = GradientRounder(stream, True, torch.Generator().manual_seed(0))
    draws = torch.stack([rounder(values) for _ in range(4000)])
    assert hfp8.E5M2.with_bias(stream.bias).smallest_normal <= 2.0 ** -8  # a normal binade
    step = 2.0 ** -10
    low = torch.floor(values / step) * step
    fraction = (values - low) / step
    standard_error = step * torch.sqrt(fraction * (1 - fraction) / 4000)
    assert ((draws.mean(0) - values).abs() <= 5 * standard_error + 1e-12).all()
    assert ((draws == low) | (draws == low + step)).all()


def test_a_planted_huge_gradient_step_is_skipped_and_parameters_stay_finite():
    model = _three_linear()
    x = torch.randn(32, 12)
    tmodel, training = prepare_training(model, x)
    optimizer = torch.optim.SGD(tmodel.parameters(), lr=0.1)
    for scale in (1.0, 1.0, 1e36, float("nan"), 1.0):
        optimizer.zero_grad()
        (tmodel(x).square().mean() * scale).backward()
        training.step(optimizer)
        for parameter in tmodel.parameters():
            assert torch.isfinite(parameter).all()
    assert training.skipped == 2 and training.steps == 3
    assert sum(training.overflows.values()) >= 1


def test_a_short_finetune_lowers_the_distillation_loss_and_exports(tmp_path):
    from hfp8.export.verify import passed

    model = trained("mobilenet_like")
    batches = calibration_batches(6)
    # planted: rounding to nearest and no BatchNorm re-estimation leave a loss to remove
    config = hfp8.QuantConfig(float_budget=0.0, weight_rounding="nearest", bn_recalibration="none")
    qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
    qmodel.train()  # a caller's model in train mode: finetune must leave it (and its BN) alone
    before = {key: value.clone() for key, value in qmodel.state_dict().items()}
    tuned = finetune(qmodel, model, batches, epochs=4, lr=3e-5, quiet=True)
    assert qmodel.training and all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())
    qmodel.eval()
    report = tuned.hfp8_report.training
    # 1088 samples the fine-tune never saw: on 96 the KL change was within sampling noise
    # (measured on one machine: 1.19x on 96 samples, 0.77x on 1088 at lr 1e-4, which over-fits
    # the 192 fine-tuning samples; 0.59x at 3e-5)
    held_out = calibration_batches(40)[6:]

    def kl_to_teacher(student):  # written here from the definition, not the library's loss
        with torch.no_grad():
            return sum(float((model(x).softmax(1) * (model(x).log_softmax(1) - student(x).log_softmax(1)))
                             .sum(1).mean()) for x in held_out)
    assert kl_to_teacher(tuned) < 0.8 * kl_to_teacher(qmodel)
    assert report["loss_after"] < report["loss_before"], report  # on the fine-tuning batches
    assert report["steps"] + report["skipped_steps"] == 20  # 5 of the 6 batches: the 4th held out
    assert report["held_out"]["kept"] == "fine-tuned", report["held_out"]
    hfp8.export_onnx(tuned, tmp_path / "t.onnx", batches[0])
    assert passed(hfp8.verify_onnx(tuned, tmp_path / "t.onnx", batches[:2]))
    manifest = hfp8.manifest(tuned)
    assert manifest["training"]["steps"] == report["steps"]


def test_training_config_validation():
    with pytest.raises(ValueError, match="gradient_rounding"):
        TrainingConfig(gradient_rounding="up")
    with pytest.raises(ValueError, match="history"):
        TrainingConfig(history=0)
    with pytest.raises(ValueError, match="needs example_batch"):
        prepare_training(_three_linear())


def test_a_snapshot_mid_training_is_what_finishing_would_return_and_training_can_go_on():
    from torch.nn.utils import parametrize

    from hfp8.training import deployable_snapshot, finish_training
    from hfp8.training.distill import distillation_loss

    model = trained("mobilenet_like")
    batches = calibration_batches(3)
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    student, training = prepare_training(qmodel)
    student.eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)

    def step(x):
        loss = distillation_loss(model(x), student(x))
        optimizer.zero_grad()
        loss.backward()
        return training.step(optimizer)

    for x in batches + batches:
        step(x)
    assert training.steps >= 1  # (the first steps may be skipped while delayed biases settle)
    snapshot = deployable_snapshot(training, qmodel, batches)
    assert any(not torch.equal(qmodel.state_dict()[k], v) for k, v in snapshot.state_dict().items())
    assert any(parametrize.is_parametrized(m) for m in student.modules())  # still training
    finished = finish_training(training, batches)
    state = finished.state_dict()
    assert set(state) == set(snapshot.state_dict())
    assert all(torch.equal(state[k], v) for k, v in snapshot.state_dict().items())
    assert torch.equal(finished(batches[0]), snapshot(batches[0]))


def test_recurrent_layer_trains_with_rounded_weights_and_finishes_on_the_grid():
    """A two-layer bidirectional LSTM: each of its 8 weight matrices is rounded in the forward
    pass (torch's float8 cast is the reference), gets a gradient, and ends on its grid."""
    from hfp8.ptq.quantizers import weight_bias_buffer
    from hfp8.training import finish_training
    from tests.small_models import digits

    model = trained("lstm")
    x, y = digits()[0][:64], digits()[1][:64]
    tmodel, training = prepare_training(model, x)
    layer = tmodel.rnn
    names = [n for n, _ in model.rnn.named_parameters() if n.startswith("weight_")]
    for name in names:
        master = getattr(layer.parametrizations, name).original
        bias = int(getattr(layer, weight_bias_buffer(name)))
        assert torch.equal(getattr(layer, name),
                           _cast(master.detach(), torch.float8_e4m3fn, bias, 7))
    optimizer = torch.optim.SGD(tmodel.parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(tmodel(x), y)
    loss.backward()
    for name in names:
        gradient = getattr(layer.parametrizations, name).original.grad
        # the head reads the last step only: there the second layer's backward direction has
        # taken its first step, from h_0 = 0, so its W_hh gets a zero gradient
        assert gradient is not None and (name == "weight_hh_l1_reverse") == (gradient.abs().sum() == 0)
    optimizer.step()
    finished = finish_training(training)
    for name in names:
        weight = finished.rnn.get_parameter(name).detach()
        bias = int(getattr(finished.rnn, weight_bias_buffer(name)))
        assert torch.equal(weight, _cast(weight, torch.float8_e4m3fn, bias, 7))
