"""Recurrent models exported and verified in a default onnxruntime session: the ONNX LSTM/GRU
operator fed by FP8 weight initializers (hidden state float, the default), and the unrolled
graph when the hidden state is rounded."""

import collections
import warnings

import onnx
import pytest
import torch

import hfp8
from hfp8.export.verify import passed
from tests.small_models import calibration_batches, digits, trained


def _quantized(name, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hfp8.quantize_model(trained(name), calibration_batches(3), hfp8.QuantConfig(
            keep_first_and_last=False, float_budget=0, **config), quiet=True)


def _dequantized_weights(model: onnx.ModelProto) -> set[str]:
    """Names of FLOAT8E4M3FN initializers read by a DequantizeLinear."""
    fp8 = {t.name for t in model.graph.initializer
           if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    return {n.input[0] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in fp8}


def _reaches(model: onnx.ModelProto, start: set[str], op_type: str) -> bool:
    """Does a value in ``start`` flow into a node of ``op_type``?"""
    readers = collections.defaultdict(list)
    for node in model.graph.node:
        for value in node.input:
            readers[value].append(node)
    todo, seen = list(start), set()
    while todo:
        value = todo.pop()
        for node in readers[value]:
            if node.op_type == op_type:
                return True
            if node.name not in seen:
                seen.add(node.name)
                todo.extend(node.output)
    return False


def _verify(qmodel, path, name):
    test_x = digits()[2][:128]
    report = hfp8.verify_onnx(qmodel, path, list(test_x.split(64)), reference=trained(name))
    assert report["bit_exact"], report["pairs"]
    layer = report["layers"]["rnn"]
    assert layer["checked"] and layer["within_bound"], layer
    assert all(r["checked"] and r["within_bound"] for r in report["layers"].values())
    assert report["whole_model"]["passed"] and passed(report)
    return report


@pytest.mark.parametrize("name,operator", [("lstm", "LSTM"), ("gru", "GRU")])
def test_bidirectional_two_layer_model_exports_as_the_onnx_operator_and_verifies(
        tmp_path, name, operator):
    qmodel = _quantized(name)
    path = tmp_path / f"{name}.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops[operator] == 2  # one per layer, both directions in each
    weights = _dequantized_weights(model)
    # front, head and the 8 recurrent matrices (ih, hh x 2 layers x 2 directions), 1 byte each
    assert len(weights) == 10
    assert _reaches(model, weights, operator)
    report = _verify(qmodel, path, name)
    assert "rnn" in report["pairs"]


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_rounded_hidden_state_exports_unrolled_and_verifies(tmp_path, name):
    qmodel = _quantized(name, quantize_recurrent_state=True)
    path = tmp_path / f"{name}.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert not ops["LSTM"] and not ops["GRU"] and not ops["RNN"]
    report = _verify(qmodel, path, name)
    assert report["pairs"]["rnn.recurrent0.hidden"]["values"] > 0


@pytest.mark.parametrize("rounded", [False, True], ids=["float-state", "rounded-state"])
def test_an_lstm_reading_the_model_input_replays_with_that_input(tmp_path, rounded):
    """The layer's piece reads the model input twice (its Q/DQ pair, and h_0's batch size from
    the input's shape): replayed with one graph input."""
    from tests.ptq.test_recurrent import VoiceEncoderLike

    torch.manual_seed(0)
    model = VoiceEncoderLike().eval()
    batches = [torch.randn(6, 10, 8) for _ in range(3)]
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(
        keep_first_and_last=False, float_budget=0, quantize_recurrent_state=rounded), quiet=True)
    hfp8.export_onnx(qmodel, tmp_path / "v.onnx", batches[0])
    report = hfp8.verify_onnx(qmodel, tmp_path / "v.onnx", batches[1:], reference=model)
    assert report["layers"]["lstm"]["checked"] and report["layers"]["lstm"]["within_bound"]
    assert passed(report)


def test_a_packed_example_is_refused_in_one_line(tmp_path):
    from torch.nn.utils.rnn import pack_sequence

    model = torch.nn.Sequential(torch.nn.LSTM(4, 6)).eval()
    packed = pack_sequence([torch.randn(n, 4) for n in (5, 3)], enforce_sorted=False)
    qmodel = hfp8.quantize_model(model, [packed] * 2, hfp8.QuantConfig(keep_first_and_last=False),
                                 quiet=True)
    with pytest.raises(hfp8.ExportError, match="PackedSequence.*padded tensor"):
        hfp8.export_onnx(qmodel, tmp_path / "p.onnx", packed)
    assert not (tmp_path / "p.onnx").exists()


class ConvToGRU(torch.nn.Module):
    """A CRNN's shape: convs (in-place ReLU) to height 1, squeeze and permute in forward, a
    bidirectional GRU, a head (the exporter tags the squeeze/permute with the GRU's scope)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(True),
            torch.nn.Conv2d(8, 12, (4, 1)), torch.nn.BatchNorm2d(12), torch.nn.ReLU(True))
        self.rnn = torch.nn.GRU(12, 10, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(20, 5)

    def forward(self, images):
        x = self.blocks(images).squeeze(2).permute(0, 2, 1)
        x, _ = self.rnn(x)
        return self.head(x)


class TwoStackedLSTMs(torch.nn.Module):
    """Two LSTM modules in a row (the exporter shares their zero h_0 between them)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(30, 8)
        self.rnn1 = torch.nn.LSTM(8, 12, batch_first=True)
        self.rnn2 = torch.nn.LSTM(12, 12, batch_first=True)
        self.output = torch.nn.Linear(32, 30)

    def forward(self, ids):
        embedded = self.embedding(ids)
        first, _ = self.rnn1(embedded)
        second, _ = self.rnn2(first)
        return self.output(torch.cat([embedded, first, second], -1))


@pytest.mark.parametrize("make,batches", [
    (ConvToGRU, lambda g: [torch.randn(6, 1, 4, 16, generator=g) for _ in range(3)]),
    (TwoStackedLSTMs, lambda g: [torch.randint(0, 30, (6, 9), generator=g) for _ in range(3)]),
], ids=["conv-squeeze-permute-gru", "two-stacked-lstms"])
def test_every_recurrent_layer_of_a_real_model_shape_is_replayed(tmp_path, make, batches):
    torch.manual_seed(0)
    model = make().eval()
    data = batches(torch.Generator().manual_seed(1))
    qmodel = hfp8.quantize_model(model, data, hfp8.QuantConfig(keep_first_and_last=False,
                                                                float_budget=0), quiet=True)
    hfp8.export_onnx(qmodel, tmp_path / "m.onnx", data[0])
    report = hfp8.verify_onnx(qmodel, tmp_path / "m.onnx", data[1:], reference=model)
    for name in ("rnn", "rnn1", "rnn2"):
        if name in report["layers"]:
            assert report["layers"][name]["checked"], report["layers"][name]
            assert report["layers"][name]["within_bound"], report["layers"][name]
    assert passed(report)
