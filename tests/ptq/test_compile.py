"""torch.compile of a quantized model: rounding traced into the graph, the same values."""

import copy

import torch

import hfp8
from hfp8.data.model_io import output_leaves
from hfp8.export.layer_replay import paired_test
from hfp8.export.verify import _per_sample_errors
from tests.small_models import calibration_batches, trained
from tests.structures import TinyEncoder, token_batches


def _recording_backend(targets: list):
    """A backend that runs the captured graph eagerly and records every node's target."""
    def backend(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module
    return backend


def _quantized_encoder():
    batches = token_batches(count=3)
    return hfp8.quantize_model(TinyEncoder().eval(), batches, quiet=True), batches


def test_compiled_cnn_rounds_in_the_graph_with_the_eager_values_bit_for_bit():
    qmodel = hfp8.quantize_model(trained("mobilenet_like"), calibration_batches(), quiet=True)
    x = calibration_batches(1, 16)[0]
    targets = []
    compiled = torch.compile(qmodel, backend=_recording_backend(targets), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), qmodel(x))
    assert targets and not any("quantize_dequantize" in target for target in targets)
    assert any("bitwise_and" in target for target in targets)  # the traced rounding is there


def test_a_float_model_compiled_first_does_not_lend_its_graph_to_the_quantized_copy():
    # same class, same shapes: without guards on hooks torch reuses the float graph and the
    # compiled "quantized" model skips its input rounding
    model = trained("mobilenet_like")
    qmodel = hfp8.quantize_model(model, calibration_batches(), quiet=True)
    x = calibration_batches(1, 16)[0]
    targets = []
    backend = _recording_backend(targets)  # one backend: torch's cache is per backend
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
        assert targets and not any("bitwise_and" in target for target in targets)
        compiled = torch.compile(qmodel, backend=backend)
        assert torch.equal(compiled(x), qmodel(x))
    assert any("bitwise_and" in target for target in targets)


FLOAT_FIRST = """
import torch, hfp8
from tests.small_models import trained, calibration_batches
model = trained("mobilenet_like")
x = calibration_batches(1, 16)[0]
with torch.no_grad():
    compiled_float = torch.compile(model, backend="eager")
    compiled_float(x)  # compiled before this process has any quantized layer
    qmodel = hfp8.quantize_model(model, calibration_batches(), quiet=True)
    print(torch.equal(torch.compile(qmodel, backend="eager")(x), qmodel(x)),
          torch.equal(compiled_float(x), model(x)))
"""


def test_a_float_model_compiled_before_any_quantized_layer_exists_does_not_lend_its_graph():
    """TorchDynamo guards on hooks from the first quantized layer on; a graph compiled before
    that, without those guards, must not serve the quantized copy (a fresh process: in this one
    earlier tests have quantized already). The float model's own compiled run stays right."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", FLOAT_FIRST], capture_output=True, text=True,
                            cwd=root, timeout=600, check=False)
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


@torch.no_grad()
def test_compiled_encoder_rounds_attention_operands_in_the_graph_bit_for_bit():
    qmodel, batches = _quantized_encoder()
    targets = []
    compiled = torch.compile(qmodel, backend=_recording_backend(targets))
    for batch in batches:
        expected, actual = qmodel(**batch), compiled(**batch)
        for (_, want), (_, got) in zip(output_leaves(expected), output_leaves(actual)):
            assert torch.equal(got, want)
    assert not any("quantize_dequantize" in target for target in targets)
    # every site rounds: 8 linear inputs + 4 products' operands in the explicit block, 4 sdpa
    # operands, the pooler: one bitwise_and per rounding
    rounding = sum("bitwise_and" in target for target in targets)
    assert rounding == len(hfp8.ptq.quantizers.quantized_layers(qmodel)) + 4 + 4


def _errors(outputs, truths) -> list[float]:
    """Per sample, the deviation verify_onnx's whole-model check uses, over every call."""
    errors = []
    for output, truth in zip(outputs, truths):
        leaves, wanted = output_leaves(output), output_leaves(truth)
        size = wanted[0][1].shape[0]
        errors.extend(_per_sample_errors([o for _, o in leaves], [t for _, t in wanted], size))
    return errors


@torch.no_grad()
def test_inductor_compiled_model_is_as_close_to_the_float64_run_as_eager_float32():
    qmodel, batches = _quantized_encoder()
    exact = copy.deepcopy(qmodel).double()
    compiled = torch.compile(qmodel)
    eager, fused, truth = [], [], []
    for batch in batches:
        eager.append(qmodel(**batch))
        fused.append(compiled(**batch))
        truth.append(exact(**batch))
    test = paired_test(_errors(fused, truth), _errors(eager, truth))
    assert test["passed"], test
    assert test["candidate_mean"] > 0  # a real comparison: float32 runs are not exact


def test_training_under_compile_keeps_the_straight_through_gradient():
    qmodel = hfp8.quantize_model(trained("mlp"), calibration_batches(), quiet=True)
    x = calibration_batches(1, 8)[0].requires_grad_(True)
    compiled = torch.compile(qmodel, backend="aot_eager")
    compiled(x).square().sum().backward()
    fused_gradient = x.grad.clone()
    x.grad = None
    qmodel(x).square().sum().backward()
    assert torch.equal(fused_gradient, x.grad)
