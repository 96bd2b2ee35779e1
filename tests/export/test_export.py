import hashlib
import math
import stat

import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import hfp8
from hfp8 import FloatFormat
from hfp8.export.verify import passed
from hfp8.ptq.quantizers import quantized_layers
from tests.small_models import calibration_batches, digits, trained

MODELS = ["mlp", "resnet", "mobilenet_like"]


def _quantized(name, granularity="per_channel", **config):
    config = hfp8.QuantConfig(weight_granularity=granularity, **config)
    return hfp8.quantize_model(trained(name), calibration_batches(3), config, quiet=True)


def _run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_reproduces_the_quantized_model(tmp_path, name, granularity):
    qmodel = _quantized(name, granularity)
    path = tmp_path / "q.onnx"
    hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    test_x = digits()[2][:200]
    report = hfp8.verify_onnx(qmodel, path, list(test_x.split(100)), reference=trained(name))
    # Every Q/DQ pair bit-exact on every captured input and on the probe values (ties,
    # subnormals, saturation, +-Inf, NaN).
    assert report["bit_exact"], {k: v for k, v in report["pairs"].items() if not v["bit_exact"]}
    assert set(report["pairs"]) == {n for n, m in quantized_layers(qmodel).items()}
    # Every quantized layer, replayed from the file on PyTorch's input: within the float32
    # summation-order bound.
    assert all(r["checked"] and r["within_bound"] for r in report["layers"].values())
    # The whole model: no further from the float64 run than PyTorch's float32 run.
    assert report["whole_model"]["passed"] and report["samples"] == 200
    assert passed(report)


def test_float_model_export_matches_to_summation_noise(tmp_path):
    model = trained("resnet")
    path = tmp_path / "f.onnx"
    hfp8.export_onnx(model, path, calibration_batches(1)[0])
    x = digits()[2]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(path, x) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_graph_structure_weights_are_fp8_initializers_behind_dequantize(tmp_path):
    qmodel = _quantized("mobilenet_like")
    path = tmp_path / "q.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    graph = model.graph
    assert model.opset_import[0].version == 19
    assert {o.domain for o in model.opset_import} == {""}  # standard ops only
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    quantized = list(quantized_layers(qmodel))
    assert quantized
    for name in quantized:
        codes = initializers[f"{name}.weight_fp8"]
        assert codes.data_type == onnx.TensorProto.FLOAT8E4M3FN
        dq = nodes[f"{name}.weight"]
        assert dq.input[0] == codes.name
        scale = onnx.numpy_helper.to_array(initializers[dq.input[1]])
        layer = qmodel.get_submodule(name)
        assert np.array_equal(scale, np.ldexp(1.0, 7 - layer.weight_exponent_bias.numpy()).astype(np.float32))
        assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
        q = nodes[f"{name}.quantize"]
        assert q.op_type == "QuantizeLinear" and nodes[f"{name}.dequantize"].input[0] == q.output[0]
        assert onnx.numpy_helper.to_array(initializers[q.input[1]]) == \
            np.float32(2.0 ** (7 - int(layer.input_exponent_bias)))
        # weights decode to the PyTorch weights exactly (ml_dtypes reads the bytes)
        raw = np.frombuffer(codes.raw_data, dtype=ml_dtypes.float8_e4m3fn).reshape(codes.dims)
        decoded = raw.astype(np.float32)
        assert np.array_equal(decoded * scale.reshape(-1, *[1] * (decoded.ndim - 1)),
                              layer.weight.detach().numpy())
    # layers kept in float have no Q/DQ and float weights
    first = "0.0"
    assert f"{first}.quantize" not in nodes
    assert initializers[f"{first}.weight"].data_type == onnx.TensorProto.FLOAT
    # no QuantizeLinear on weights: every Q reads an activation
    assert all(n.input[0] not in initializers for n in graph.node if n.op_type == "QuantizeLinear")
    # BatchNorm is never folded into quantized weights (they decode exactly, above); it may be
    # folded into the float first convolution only
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) >= \
        sum(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()) - 1


def test_file_is_small_deterministic_and_batch_is_dynamic(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    batches = [torch.randn(8, 64) for _ in range(2)]
    config = hfp8.QuantConfig(keep_first_and_last=False)
    qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
    hfp8.export_onnx(model, tmp_path / "float.onnx", batches[0])
    hfp8.export_onnx(qmodel, tmp_path / "a.onnx", batches[0])
    hfp8.export_onnx(qmodel, tmp_path / "b.onnx", batches[1])
    sizes = {p: (tmp_path / p).stat().st_size for p in ("float.onnx", "a.onnx")}
    assert sizes["a.onnx"] <= 0.3 * sizes["float.onnx"], sizes
    digest = lambda p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()  # noqa: E731
    assert digest("a.onnx") == digest("b.onnx")
    for batch in (1, 7):  # the batch dimension is free
        assert _run(tmp_path / "a.onnx", torch.randn(batch, 64)).shape == (batch, 10)
    assert passed(hfp8.verify_onnx(qmodel, tmp_path / "a.onnx",
                                                   [torch.randn(7, 64), torch.randn(1, 64)]))


def test_ieee_e4m3_and_e5m2_export_with_exact_pairs(tmp_path):
    ieee = FloatFormat(4, 3, 7, "ieee")
    for fmt in (ieee, hfp8.E5M2):
        qmodel = _quantized("cnn", weight_format=fmt, activation_format=fmt)
        path = tmp_path / f"{fmt.name}.onnx"
        model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
        report = hfp8.verify_onnx(qmodel, path, [digits()[2][:100]])
        assert report["bit_exact"] and passed(report)
        expected_type = onnx.TensorProto.FLOAT8E5M2 if fmt == hfp8.E5M2 else onnx.TensorProto.FLOAT8E4M3FN
        assert any(t.data_type == expected_type for t in model.graph.initializer)
        if fmt == ieee:  # clamp to +-240 s before Q (as Where)
            assert {n.op_type for n in model.graph.node if n.name.endswith(".clip_high")} == {"Where"}


def test_formats_without_an_onnx_type_are_refused_with_the_alternative(tmp_path):
    none_layout = FloatFormat(4, 3, 7, "none")
    qmodel = _quantized("mlp", activation_format=none_layout)
    with pytest.raises(hfp8.ExportError, match="use specials='fn'"):
        hfp8.export_onnx(qmodel, tmp_path / "x.onnx", calibration_batches(1)[0])
    qmodel = _quantized("mlp", weight_format=FloatFormat(3, 4))
    with pytest.raises(hfp8.ExportError, match="E4M3 .'fn' or 'ieee'. and E5M2"):
        hfp8.export_onnx(qmodel, tmp_path / "x.onnx", calibration_batches(1)[0])
    assert not (tmp_path / "x.onnx").exists()


def test_models_torch_export_cannot_capture_get_its_reason(tmp_path):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            y = self.linear(x)
            if y.sum() > 0:  # Python control flow on a value: nothing to capture it as a graph
                return y
            return -y

    with pytest.raises(hfp8.ExportError, match="torch.export cannot capture this model: "
                                               "GuardOnDataDependentSymNode"):
        hfp8.export_onnx(DataDependent(), tmp_path / "x.onnx", torch.randn(2, 4))
    with pytest.raises(hfp8.ExportError, match="opset"):
        hfp8.export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", torch.randn(1, 2), opset=17)
    with pytest.raises(hfp8.ExportError, match="targets"):
        hfp8.export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", (torch.randn(1, 2), torch.ones(1)))
    assert not (tmp_path / "x.onnx").exists()


def test_operations_our_old_translator_lacked_now_export(tmp_path):
    class Odd(nn.Module):  # cumsum and a GRU: torch's exporter knows them
        def __init__(self):
            super().__init__()
            self.linear, self.gru = nn.Linear(4, 4), nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.gru(torch.cumsum(self.linear(x), 1))[0]

    model = Odd().eval()
    x = torch.randn(2, 3, 4)
    hfp8.export_onnx(model, tmp_path / "odd.onnx", x)
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "odd.onnx"))
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(actual - expected).max() < 1e-5


def test_export_does_not_touch_the_model(tmp_path):
    qmodel = _quantized("cnn").train()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    parameters = dict(qmodel.named_parameters())  # the export's copy shares the weights
    hfp8.export_onnx(qmodel, tmp_path / "q.onnx", calibration_batches(1)[0])
    assert qmodel.training
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())
    after = dict(qmodel.named_parameters())
    assert after.keys() == parameters.keys()
    assert all(after[k] is parameters[k] and type(after[k]) is nn.Parameter for k in after)


def test_manifest_travels_in_the_metadata(tmp_path):
    import json

    qmodel = _quantized("cnn")
    model = hfp8.export_onnx(qmodel, tmp_path / "q.onnx", calibration_batches(1)[0])
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["hfp8_ptq_manifest"]) == json.loads(json.dumps(hfp8.manifest(qmodel)))


def test_probe_values_cover_ties_subnormals_and_overflow():
    probes = hfp8.export.verify.probe_values(hfp8.E4M3)
    finite = probes[torch.isfinite(probes)]
    assert (finite == 2.0**-10).any()  # half the smallest subnormal: a tie to zero
    assert (finite == 464.0).any()  # the tie between 448 and the (NaN) code above
    assert (finite > 448 * 1.4).any() and torch.isnan(probes).any() and torch.isinf(probes).any()
    assert math.isclose(float(finite[finite > 0].min()), 2.0**-9 / 3, rel_tol=1e-6)


def _with_doubled_scale(model, layer):
    """A copy of ``model`` whose input QuantizeLinear of ``layer`` has twice its scale."""
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    quantize = next(n for n in broken.graph.node if n.name == f"{layer}.quantize")
    scale = next(t for t in broken.graph.initializer if t.name == quantize.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 2, scale.name))
    return broken


def _with_flipped_weight_code(model, layer):
    """A copy of ``model`` with one exponent bit of ``layer``'s first FP8 weight code flipped."""
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    codes = next(t for t in broken.graph.initializer if t.name == f"{layer}.weight_fp8")
    raw = bytearray(codes.raw_data)
    raw[0] ^= 0x08
    codes.raw_data = bytes(raw)
    return broken


def test_verification_fails_on_a_tampered_file(tmp_path):
    qmodel = _quantized("cnn")
    path = tmp_path / "q.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    samples = [digits()[2][:100]]
    assert passed(hfp8.verify_onnx(qmodel, path, samples))

    # 1. a float part of the graph goes wrong (as onnxruntime's Relu fusion makes it): every
    # Relu becomes the identity. Pairs stay exact; layer replay and the whole model catch it.
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    for node in broken.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Identity"
    onnx.save(broken, tmp_path / "relu.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "relu.onnx", samples)
    assert report["bit_exact"] and not report["whole_model"]["passed"]
    assert not passed(report)

    # 2. a Q/DQ pair rounds differently (its scale doubled)
    onnx.save(_with_doubled_scale(model, "1.0"), tmp_path / "scale.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "scale.onnx", samples)
    assert not report["pairs"]["1.0"]["bit_exact"] and not passed(report)

    # 3. a weight code flipped: pairs exact, the layer replay catches it
    onnx.save(_with_flipped_weight_code(model, "1.0"), tmp_path / "weight.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "weight.onnx", samples)
    assert report["bit_exact"] and not report["layers"]["1.0"]["within_bound"]
    # the layers are replayed side by side in one session: each on its own nodes only
    assert all(r["within_bound"] for name, r in report["layers"].items() if name != "1.0")
    assert not passed(report)


def test_verification_checks_a_bounded_share_of_large_tensors_and_still_catches_tampering(
        tmp_path, monkeypatch):
    """With the per-point and per-layer bounds far below the tensors' sizes: each point sends
    at most PAIR_VALUES values per batch (plus its probes) through its pair, each layer is
    replayed on at most REPLAY_VALUES input values (whole rows), and a doubled scale and a
    flipped weight code are still caught."""
    from hfp8.export import verify
    monkeypatch.setattr(verify, "PAIR_VALUES", 300)
    monkeypatch.setattr(verify, "REPLAY_VALUES", 3000)
    replayed = {}
    original = verify.replay_layers
    monkeypatch.setattr(verify, "replay_layers", lambda index, qmodel, captured, *rest: (
        replayed.update({n: tuple(x.shape) for n, x in captured.items()}),
        original(index, qmodel, captured, *rest))[1])
    qmodel = _quantized("cnn")
    path = tmp_path / "q.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    samples = [digits()[2][:40], digits()[2][40:80]]
    report = hfp8.verify_onnx(qmodel, path, samples)
    assert passed(report)
    probes = len(verify.probe_values(hfp8.E4M3))
    assert all(probes < r["values"] <= probes + 2 * 300 for r in report["pairs"].values())
    assert replayed and all(
        shape[0] >= 1 and (math.prod(shape) <= 3000 or shape[0] == 1) and shape[0] < 40
        for shape in replayed.values()), replayed

    onnx.save(_with_doubled_scale(model, "1.0"), tmp_path / "scale.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "scale.onnx", samples)
    assert not report["pairs"]["1.0"]["bit_exact"]

    onnx.save(_with_flipped_weight_code(model, "1.0"), tmp_path / "weight.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "weight.onnx", samples)
    assert not report["layers"]["1.0"]["within_bound"]


def test_verification_reads_each_node_of_the_file_once_whatever_the_number_of_layers(
        tmp_path, monkeypatch):
    # cutting one piece per layer and per pair from an index built once: the work is linear
    # in the file (scanning the whole file per layer made a 1,000-layer model quadratic)
    from hfp8.export import onnx_replay
    qmodel = _quantized("resnet")
    path = tmp_path / "q.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    calls = []
    original = onnx_replay.node_scopes
    monkeypatch.setattr(onnx_replay, "node_scopes", lambda node: calls.append(1) or original(node))
    report = hfp8.verify_onnx(qmodel, path, [digits()[2][:50]])
    assert passed(report)
    assert len(report["layers"]) > 3 and 0 < len(calls) <= len(model.graph.node)


def _mlp_qmodel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    batches = [torch.randn(8, 64) for _ in range(2)]
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(keep_first_and_last=False),
                                 quiet=True)
    return model, qmodel, batches


def test_a_model_past_the_size_limit_keeps_its_weights_in_a_data_file_beside_it(tmp_path):
    """The >2 GiB path, at a threshold small enough for a test: two files placed together,
    the same outputs as the single file in a default session, and verification passes."""
    from hfp8.export.onnx_export import external_data_path

    model, qmodel, batches = _mlp_qmodel()
    single, split = tmp_path / "one" / "q.onnx", tmp_path / "two" / "q.onnx"
    single.parent.mkdir(), split.parent.mkdir()
    hfp8.export_onnx(qmodel, single, batches[0])
    hfp8.export_onnx(qmodel, split, batches[0], external_data_bytes=1000)
    assert sorted(p.name for p in split.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert external_data_path(split).stat().st_size > 60_000 > split.stat().st_size
    # both files readable as any new file here is (onnx creates the weights file 0600)
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"")
    for path in (split, external_data_path(split)):
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(fresh.stat().st_mode)
    assert [p.name for p in single.parent.iterdir()] == ["q.onnx"]
    x = torch.randn(5, 64)
    np.testing.assert_array_equal(_run(split, x), _run(single, x))
    loaded = onnx.load(str(split))  # reads the data file back
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} \
        == {t.name: onnx.numpy_helper.to_array(t).tobytes()
            for t in onnx.load(str(single)).graph.initializer}
    from hfp8.export.verify import passed

    assert passed(hfp8.verify_onnx(qmodel, split, batches, reference=model))


def test_refusing_a_data_file_is_an_export_error_that_writes_nothing(tmp_path, monkeypatch):
    """The command line refuses a second file (external_data_bytes=None); the model is made to
    look past the limit by lowering it."""
    from hfp8.export import onnx_export

    _, qmodel, batches = _mlp_qmodel()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    with pytest.raises(hfp8.ExportError, match="past what one file holds"):
        hfp8.export_onnx(qmodel, tmp_path / "big.onnx", batches[0], external_data_bytes=None)
    assert list(tmp_path.iterdir()) == []


def test_pieces_copying_the_same_nodes_run_side_by_side_each_on_its_own_input(tmp_path):
    from hfp8.export import onnx_replay
    qmodel = _quantized("cnn")
    model = hfp8.export_onnx(qmodel, tmp_path / "q.onnx", calibration_batches(1)[0])
    pair = onnx_replay.pair_model(model, "1.0")
    layer = onnx_replay.layer_model(model, "2.0")
    pieces = onnx_replay.Pieces({"a": pair, "b": pair, "layer": layer})
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1000, generator=generator).mul(s).numpy() for s in (1.0, 100.0))
    x = torch.randn(2, 32, 7, 7, generator=generator).numpy()  # layer 2.0: depthwise on 32
    out = pieces.run({"a": [a], "b": [b], "layer": [x]})
    for key, piece, value in (("a", pair, a), ("b", pair, b), ("layer", layer, x)):
        alone = onnx_replay.session(piece).run(None, {piece.graph.input[0].name: value})[0]
        assert np.array_equal(out[key][0], alone), key
    assert not np.array_equal(out["a"][0], out["b"][0])
