"""The graph edits for onnxruntime's QDQ transforms, each shown necessary and sufficient.

The "unedited" graphs are what torch's exporter gives before hfp8.ptq.onnx_graph runs. These
tests reproduce onnxruntime's behaviour on them (onnxruntime 1.32); if a later onnxruntime
computes them right, the first assertion of each test says so, and the edit may be dropped.
"""

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import hfp8
from hfp8.ptq import onnx_graph, onnx_replay
from hfp8.ptq.export import _to_onnx, capture, deployment_form
from hfp8.ptq.verify import passed


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


def _graphs(act):
    torch.manual_seed(0)
    model = ActivationThenView(act).eval()
    batches = [torch.randn(8, 3, 10, 10) * 2 for _ in range(3)]
    qmodel = hfp8.quantize_model(model, batches, quiet=True)
    assert set(hfp8.ptq.quantizers.quantized_layers(qmodel)) == {"conv2", "fc1"}
    deployed = deployment_form(qmodel)
    raw = _to_onnx(capture(deployed, (batches[0],), {}), 19)
    onnx_graph.tag_merged_pairs(raw, ["conv2", "fc1"])
    return qmodel, raw, batches


def _difference(model, session_options, qmodel, x):
    session = onnxruntime.InferenceSession(model.SerializeToString(), session_options)
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        return float(np.abs(actual - qmodel(x).numpy()).max())


def test_a_relu_before_a_reshape_and_quantize_is_moved_past_the_pair(tmp_path):
    qmodel, raw, batches = _graphs(nn.ReLU())
    x = batches[1]
    off = onnxruntime.SessionOptions()
    off.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    # the unedited graph is right without optimizations and wrong in a default session
    assert _difference(raw, off, qmodel, x) < 1e-4
    assert _difference(raw, onnxruntime.SessionOptions(), qmodel, x) > 1e-2
    fixed = type(raw)()
    fixed.CopyFrom(raw)
    assert onnx_graph.move_relu_past_qdq(fixed) == 2  # before conv2 and before fc1's Reshape
    assert _difference(fixed, onnxruntime.SessionOptions(), qmodel, x) < 1e-4
    # and the exported file, verified the full way
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def test_a_clip_before_quantize_is_written_as_max_and_min(tmp_path):
    qmodel, raw, batches = _graphs(nn.ReLU6())
    assert any(n.op_type == "Clip" for n in raw.graph.node)
    with pytest.raises(Exception, match="Unexpected data type for QuantizeLinear input y_zero_point"):
        onnx_replay.session(raw)  # a default session does not even load it
    fixed = type(raw)()
    fixed.CopyFrom(raw)
    assert onnx_graph.clip_as_max_min(fixed) == 2
    assert not any(n.op_type == "Clip" for n in fixed.graph.node)
    assert _difference(fixed, onnxruntime.SessionOptions(), qmodel, batches[1]) < 1e-4
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", batches[0])
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", batches))


def test_relu_after_the_pair_is_the_same_function_on_every_grid_value_and_tie():
    """relu(fq(x)) == fq(relu(x)) for the sign-symmetric E4M3 at any bias: the identity the
    move rests on, checked on all grid points, ties and negative zero."""
    for bias in (-3, 7, 12):
        fmt = hfp8.E4M3.with_bias(bias)
        x = hfp8.ptq.verify.probe_values(fmt)
        x = torch.cat([x, -x, torch.tensor([0.0, -0.0])])
        left = torch.relu(hfp8.fake_quantize(x, fmt))
        right = hfp8.fake_quantize(torch.relu(x), fmt)
        same = (left == right) | (left.isnan() & right.isnan())
        assert bool(same.all()), x[~same]
