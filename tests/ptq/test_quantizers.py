"""A quantized layer's input rounding: eager values and gradient, and what tracers see."""

import numpy as np
import pytest
import torch
from torch import nn

import hfp8
from hfp8.ptq.quantizers import quantized_layers
from tests.reference import ml_dtypes_round_saturating, same_float32_bits

OPERATOR = "hfp8::quantize_dequantize"
EVERY_LAYER = hfp8.QuantConfig(keep_first_and_last=False)


def _quantized_linear(input_bias: int) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 8))
    torch.manual_seed(0)
    qmodel = hfp8.quantize_model(model, [torch.randn(16, 64)], EVERY_LAYER, quiet=True)
    layer = qmodel[0]
    layer.input_exponent_bias.fill_(input_bias)
    return qmodel


def _what_the_layer_sees(qmodel: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = qmodel[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        qmodel(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("bias", [3, 7, 12])
def test_eager_layer_input_is_ml_dtypes_e4m3_at_the_layers_bias_bit_for_bit(bias):
    qmodel = _quantized_linear(bias)
    x = torch.randn(32, 64) * 2.0 ** torch.randint(-14, 10, (32, 64))
    x[0, :4] = torch.tensor([-0.0, -1e-30, 1e9, float("nan")])  # signed zero, tiny, saturate, NaN
    with torch.no_grad():
        seen = _what_the_layer_sees(qmodel, x).numpy()
    reference = ml_dtypes_round_saturating(x.numpy(), hfp8.E4M3.with_bias(bias))
    assert same_float32_bits(seen, reference)  # NaN stays NaN (its payload may differ)
    assert np.signbit(seen[0, 0]) and np.signbit(seen[0, 1])


def test_eager_gradient_passes_the_rounding_straight_through():
    qmodel = _quantized_linear(7)
    x = torch.randn(4, 64, requires_grad=True)
    qmodel(x).sum().backward()
    weight = qmodel[0].weight.detach()
    assert torch.equal(x.grad, torch.ones(4, 8) @ weight)  # identity through the rounding


def test_traced_model_keeps_one_rounding_operator_per_quantized_layer():
    # torch.jit.trace (the legacy ONNX exporter's tracer) must record the operator, not the
    # block loop of the eager rounding with this input's sizes baked in
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    qmodel = hfp8.quantize_model(model, [torch.randn(16, 64)], EVERY_LAYER, quiet=True)
    with torch.no_grad():
        traced = torch.jit.trace(qmodel, torch.randn(4, 64))
    assert str(traced.inlined_graph).count(OPERATOR) == len(quantized_layers(qmodel)) == 2
    x = torch.randn(6, 64)  # another batch size: nothing baked in
    with torch.no_grad():
        assert torch.equal(traced(x), qmodel(x))


def test_exported_program_keeps_one_rounding_operator_per_quantized_layer():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    qmodel = hfp8.quantize_model(model, [torch.randn(16, 64)], EVERY_LAYER, quiet=True)
    program = torch.export.export(qmodel, (torch.randn(4, 64),))
    targets = [str(node.target) for node in program.graph.nodes]
    assert sum("quantize_dequantize" in target for target in targets) == 2
