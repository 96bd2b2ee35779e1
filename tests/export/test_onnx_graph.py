"""The graph edits for onnxruntime's QDQ transforms, each shown necessary and sufficient, and
every edit shown to keep what each graph output computes.

The "unedited" graphs are what torch's exporter gives before hfp8.export.onnx_graph runs. These
tests reproduce onnxruntime's behaviour on them (onnxruntime 1.32); if a later onnxruntime
computes them right, the first assertion of each test says so, and the edit may be dropped.
The random-graph version of these checks is tests/export/test_onnx_fuzz.py.
"""

import copy
import dataclasses
import random

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hfp8
from hfp8.export import onnx_fp8_form, onnx_graph, onnx_replay
from hfp8.export.deployment_form import deployment_form
from hfp8.export.onnx_export import _to_onnx, capture
from hfp8.export.verify import passed
from tests.exact_graphs import FAST, _dyadic_parameters

OFF = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
DEFAULT = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


class ActivationThenView(nn.Module):
    """conv -> act -> conv -> act -> view -> linear -> linear: the second linear's input is the
    activation through a Reshape, the case onnxruntime's QDQ propagation moves."""

    def __init__(self, act):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.act = act
        self.fc1, self.fc2 = nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc2(self.fc1(y.view(y.shape[0], -1)))


class VggBlocks(nn.Module):
    """conv -> relu -> maxpool, twice, then a Linear: Relu -> MaxPool -> QuantizeLinear."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c0(x)), 2)
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(x)).flatten(1))


def _raw(qmodel, example):
    """torch's exported graph, Q/DQ pairs tagged, before any edit."""
    raw = _to_onnx(capture(deployment_form(qmodel), (example,), {}), 19)
    inputs = [name for name, layer in hfp8.ptq.quantizers.quantized_layers(qmodel).items()
              if hfp8.ptq.quantizers.layer_state(layer).input_format is not None]
    assert onnx_graph.tag_merged_pairs(raw, inputs) == []
    return raw


def _edited(raw, *edits):
    model = onnx.ModelProto()
    model.CopyFrom(raw)
    for edit in edits:
        edit(model)
    return model


def _outputs(model, level, x):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _difference(model, level, qmodel, x):
    with torch.no_grad():
        expected = qmodel(x)
    return float(np.abs(_outputs(model, level, x)[0] - expected.numpy()).max())


def _quantized(model, batches, config=None):
    torch.manual_seed(0)
    return hfp8.quantize_model(model.eval(), batches, config or hfp8.QuantConfig(), quiet=True)


def test_a_relu_before_a_reshape_and_quantize_is_written_as_max(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 10, 10) * 2 for _ in range(3)]
    qmodel = _quantized(ActivationThenView(nn.ReLU()), batches)
    raw, x = _raw(qmodel, batches[0]), batches[1]
    # the unedited graph is right without optimizations and wrong in a default session
    assert _difference(raw, OFF, qmodel, x) < 1e-4
    assert _difference(raw, DEFAULT, qmodel, x) > 1e-2
    fixed = _edited(raw)
    assert onnx_fp8_form.clamps_as_max_min(fixed) == 2  # before conv2 and before fc1's Reshape
    assert not any(n.op_type == "Relu" for n in fixed.graph.node)
    assert _difference(fixed, DEFAULT, qmodel, x) < 1e-4
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def test_a_relu_through_maxpool_before_quantize_is_written_as_max(tmp_path):
    """Issue 19's VGG block: QDQ propagation copies the pair up through the MaxPool, then
    ReluQuantRewrite deletes the Relu. Both rules named: disabling either one is enough."""
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    qmodel = _quantized(VggBlocks(), batches)
    raw, x = _raw(qmodel, batches[0]), batches[1]
    assert _difference(raw, OFF, qmodel, x) < 1e-4
    assert _difference(raw, DEFAULT, qmodel, x) > 1e-2
    for rule in ("ReluQuantRewrite", "QDQPropagationTransformer"):
        session = onnxruntime.InferenceSession(raw.SerializeToString(), disabled_optimizers=[rule])
        with torch.no_grad():
            expected = qmodel(x).numpy()
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - expected).max() < 1e-4, rule
    fixed = _edited(raw)
    assert onnx_fp8_form.clamps_as_max_min(fixed) == 2  # c0's and c1's, upstream of a pair
    assert _difference(fixed, DEFAULT, qmodel, x) < 1e-4
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def test_a_clip_before_quantize_is_written_as_max_and_min(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 10, 10) * 2 for _ in range(3)]
    qmodel = _quantized(ActivationThenView(nn.ReLU6()), batches)
    raw = _raw(qmodel, batches[0])
    assert any(n.op_type == "Clip" for n in raw.graph.node)
    with pytest.raises(Exception, match="Unexpected data type for QuantizeLinear input y_zero_point"):
        onnx_replay.session(raw)  # a default session does not even load it
    fixed = _edited(raw)
    assert onnx_fp8_form.clamps_as_max_min(fixed) == 2
    assert not any(n.op_type == "Clip" for n in fixed.graph.node)
    assert _difference(fixed, DEFAULT, qmodel, batches[1]) < 1e-4
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def _coarse_scale_chain():
    """Three quantized 1x1 convs, the first with weights up to ~50 on inputs of ~+-3000: its
    int32 bias step ``s_input * s_weight`` in onnxruntime is about 1, coarser than its bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(100)
    batches = [torch.randn(4, 3, 5, 5) * 1000 for _ in range(3)]
    return model, batches


def test_a_bias_is_added_after_the_conv_so_onnxruntime_cannot_round_it_to_int32():
    """WeightBiasQuantization rounds the bias to multiples of s_input * s_weight. On a zero
    input every sum is exact (the output is the bias), so PyTorch and a right runtime agree
    bit for bit."""
    model, batches = _coarse_scale_chain()
    qmodel = _quantized(model, batches, dataclasses.replace(FAST, keep_first_and_last=False))
    raw = _raw(qmodel, batches[0])
    zero = torch.zeros(1, 3, 5, 5)
    with torch.no_grad():
        expected = qmodel(zero).numpy()
    assert np.array_equal(_outputs(raw, OFF, zero)[0], expected)
    assert not np.array_equal(_outputs(raw, DEFAULT, zero)[0], expected)
    fixed = _edited(raw)
    assert onnx_fp8_form.bias_as_add(fixed) == 3
    assert np.array_equal(_outputs(fixed, DEFAULT, zero)[0], expected)


def test_a_float_weight_behind_a_quantized_input_is_not_rounded_to_int8(tmp_path):
    """Activations in FP8, weights float: WeightBiasQuantization would round each such weight
    to int8 per tensor; with bias or without (a zero bias keeps the Add in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, bias=False), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 3)).eval()
    batches = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    config = dataclasses.replace(FAST, weight_format=None)
    qmodel = _quantized(model, batches, config)
    raw, x = _raw(qmodel, batches[0]), batches[1]
    assert _difference(raw, OFF, qmodel, x) < 1e-5
    assert _difference(raw, DEFAULT, qmodel, x) > 1e-3
    fixed = _edited(raw)
    assert onnx_fp8_form.bias_as_add(fixed) == 4  # three biases and one zero bias
    assert _difference(fixed, DEFAULT, qmodel, x) < 1e-5
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def test_relu_after_the_pair_is_the_same_function_on_every_grid_value_and_tie():
    """relu(fq(x)) == fq(relu(x)) and max(x, 0) == relu(x) for the sign-symmetric E4M3 at any
    bias, on all grid points, ties and negative zero: why moving or rewriting a Relu next to
    a pair keeps the function."""
    for bias in (-3, 7, 12):
        fmt = hfp8.E4M3.with_bias(bias)
        x = hfp8.export.verify.probe_values(fmt)
        x = torch.cat([x, -x, torch.tensor([0.0, -0.0])])
        left = torch.relu(hfp8.fake_quantize(x, fmt))
        right = hfp8.fake_quantize(torch.relu(x), fmt)
        same = (left == right) | (left.isnan() & right.isnan())
        assert bool(same.all()), x[~same]


# -- every edit keeps what every graph output computes ---------------------------------------
class ReluIsAnOutput(nn.Module):
    """f = relu(c1(c0(x))) is returned and read by c2 (issue 19: text-detection U-Nets)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2, self.c3 = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                              nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        f = torch.relu(self.c1(self.c0(x)))
        return self.c3(torch.relu(self.c2(f))), f


class ReluReadTwice(nn.Module):
    """One Relu read by two quantized layers, and returned."""

    def __init__(self):
        super().__init__()
        self.c0, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        f = torch.relu(self.c0(x))
        return self.a(f) + self.b(f), f


class ReluOfTheInput(nn.Module):
    """A Relu of the graph input feeds a quantized layer; that layer's output (its bias moved
    to an Add) is returned and read again."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c0(torch.relu(x))
        return self.c1(y), y


class InputIsAnOutput(nn.Module):
    """The graph input is returned as it is, and quantized layers read it."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c1(torch.relu(self.c0(x))), x


class OutputThroughTranspose(nn.Module):
    """A returned feature map also transposed into a quantized layer (fuzz seed 281)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = torch.relu(self.c0(x))
        return self.c1(f.transpose(2, 3)), f


EDITS = {"name_quantization_nodes": onnx_graph.name_quantization_nodes,
         "clamps_as_max_min": onnx_fp8_form.clamps_as_max_min,
         "bias_as_add": onnx_fp8_form.bias_as_add, "outputs_as_copies": onnx_fp8_form.outputs_as_copies,
         "strip_metadata": onnx_graph.strip_metadata}


def _dyadic_quantized(structure):
    model = structure().eval()
    _dyadic_parameters(model, random.Random(0))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(-3, 4, (3, 3, 6, 6), generator=generator).float() for _ in range(2)]
    return _quantized(model, batches, FAST), batches


def test_a_returned_value_read_upstream_of_a_pair_gets_its_own_copy():
    """QDQ propagation moves the transposed layer's pair onto the edge leaving the Relu, which
    is also a graph output: a default session returns that output rounded to FP8."""
    qmodel, batches = _dyadic_quantized(OutputThroughTranspose)
    raw, x = _raw(qmodel, batches[0]), batches[1]
    others = _edited(raw, onnx_fp8_form.clamps_as_max_min, onnx_fp8_form.bias_as_add)
    with torch.no_grad():
        expected = [t.numpy() for t in qmodel(x)]
    assert np.array_equal(_outputs(others, OFF, x)[1], expected[1])
    assert not np.array_equal(_outputs(others, DEFAULT, x)[1], expected[1])
    fixed = _edited(others)
    assert onnx_fp8_form.outputs_as_copies(fixed) == 1
    assert all(np.array_equal(a, e) for a, e in zip(_outputs(fixed, DEFAULT, x), expected))


@pytest.mark.parametrize("structure", [ReluIsAnOutput, ReluReadTwice, ReluOfTheInput,
                                       InputIsAnOutput, OutputThroughTranspose])
@pytest.mark.parametrize("edit", [*EDITS, "all, as export_onnx"])
def test_an_edit_never_changes_what_a_graph_output_computes(structure, edit, tmp_path):
    """Dyadic weights and integer inputs make every sum exact, so the edited graph must give
    the unedited one's outputs bit for bit, under the same names, without optimizations; the
    file export_onnx writes (every edit) gives them in a default session too."""
    qmodel, batches = _dyadic_quantized(structure)
    raw, x = _raw(qmodel, batches[0]), batches[1]
    if edit in EDITS:
        edited = _edited(raw, EDITS[edit])
    else:
        edited = hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert [o.name for o in edited.graph.output] == [o.name for o in raw.graph.output]
    with torch.no_grad():
        expected = [t.numpy() for t in qmodel(x)]
        exact = [t.numpy() for t in copy.deepcopy(qmodel).double()(x.double())]
    assert all(np.array_equal(e, t) for e, t in zip(expected, exact))  # the premise: exact sums
    before = _outputs(raw, OFF, x)
    assert all(np.array_equal(b, e) for b, e in zip(before, expected))
    for level in (OFF,) if edit in EDITS else (OFF, DEFAULT):
        after = _outputs(edited, level, x)
        assert all(np.array_equal(a, e) for a, e in zip(after, expected)), (edit, level)
