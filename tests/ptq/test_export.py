import hashlib
import math

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import hfp8
from hfp8 import FloatFormat
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
    report = hfp8.verify_onnx(qmodel, path, list(test_x.split(100)))
    # Every Q/DQ pair bit-exact on every captured input and on the probe values (ties,
    # subnormals, saturation, +-Inf, NaN).
    assert report["bit_exact"], {k: v for k, v in report["pairs"].items() if not v["bit_exact"]}
    assert report["top1_agreement"] == 1.0
    # Outputs: float32 summation order differs between the two runtimes (~1e-7 relative). Where
    # such a difference lands a value on the other side of a rounding tie of a later Q node, one
    # activation moves by one E4M3 step (2^-4 relative), so the bound is a few steps' worth
    # after averaging, not 1e-6. Without Q/DQ nodes in between it is summation noise alone.
    assert report["max_rel_diff"] < 1e-2
    assert report["samples"] == 200
    assert hfp8.ptq.verify.passed(report) and report["output_sqnr_db"] > 40


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
    quantized = [name for name, m in qmodel.named_modules()
                 if isinstance(m, hfp8.ptq.layers._QuantizedLayer)]
    for name in quantized:
        codes = initializers[f"{name}.weight_fp8"]
        assert codes.data_type == onnx.TensorProto.FLOAT8E4M3FN
        dq = nodes[f"{name}.weight_dequantize"]
        assert dq.input[0] == codes.name
        scale = onnx.numpy_helper.to_array(initializers[dq.input[1]])
        layer = qmodel.get_submodule(name)
        assert np.array_equal(scale, np.ldexp(1.0, 7 - layer.weight_exponent_bias.numpy()).astype(np.float32))
        assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
        q = nodes[f"{name}.input_quantize"]
        assert q.op_type == "QuantizeLinear"
        assert onnx.numpy_helper.to_array(initializers[q.input[1]]) == \
            np.float32(2.0 ** (7 - int(layer.input_exponent_bias)))
        # weights decode to the PyTorch weights exactly
        raw = np.frombuffer(codes.raw_data, dtype=np.uint8).reshape(codes.dims)
        decoded = hfp8.decode(torch.from_numpy(raw.copy()), hfp8.E4M3).numpy()
        assert np.array_equal(decoded * scale.reshape(-1, *[1] * (decoded.ndim - 1)),
                              layer.weight.detach().numpy())
    # layers kept in float have no Q/DQ and float weights
    first = "0.0"
    assert f"{first}.input_quantize" not in nodes
    assert initializers[f"{first}.weight"].data_type == onnx.TensorProto.FLOAT
    # BatchNorm stays a BatchNormalization node (never folded into quantized weights)
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())


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
    for batch in (1, 7):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            expected = qmodel(x).numpy()
        assert _run(tmp_path / "a.onnx", x).shape == (batch, 10)
        np.testing.assert_allclose(_run(tmp_path / "a.onnx", x), expected, rtol=1e-4, atol=1e-4)


def test_ieee_e4m3_and_e5m2_export_with_exact_pairs(tmp_path):
    ieee = FloatFormat(4, 3, 7, "ieee")
    for fmt in (ieee, hfp8.E5M2):
        qmodel = _quantized("cnn", weight_format=fmt, activation_format=fmt)
        path = tmp_path / f"{fmt.name}.onnx"
        model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
        report = hfp8.verify_onnx(qmodel, path, [digits()[2][:100]])
        assert report["bit_exact"] and report["top1_agreement"] == 1.0
        expected_type = onnx.TensorProto.FLOAT8E5M2 if fmt == hfp8.E5M2 else onnx.TensorProto.FLOAT8E4M3FN
        assert any(t.data_type == expected_type for t in model.graph.initializer)
        if fmt == ieee:  # clamp to +-240 s before Q, as Max/Min
            assert any(n.name.endswith("input_clip") for n in model.graph.node)


def test_formats_without_an_onnx_type_are_refused_with_the_alternative(tmp_path):
    none_layout = FloatFormat(4, 3, 7, "none")
    qmodel = _quantized("mlp", activation_format=none_layout)
    with pytest.raises(hfp8.ExportError, match="use specials='fn'"):
        hfp8.export_onnx(qmodel, tmp_path / "x.onnx", calibration_batches(1)[0])
    qmodel = _quantized("mlp", weight_format=FloatFormat(3, 4))
    with pytest.raises(hfp8.ExportError, match="E4M3 .'fn' or 'ieee'. and E5M2"):
        hfp8.export_onnx(qmodel, tmp_path / "x.onnx", calibration_batches(1)[0])
    assert not (tmp_path / "x.onnx").exists()


def test_unsupported_operations_are_named(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.linear(x), 1)

    with pytest.raises(hfp8.ExportError, match="cumsum"):
        hfp8.export_onnx(Odd(), tmp_path / "x.onnx", torch.randn(2, 4))
    with pytest.raises(hfp8.ExportError, match="GRU"):
        hfp8.export_onnx(nn.Sequential(nn.GRU(4, 4)), tmp_path / "x.onnx", torch.randn(2, 3, 4))
    with pytest.raises(hfp8.ExportError, match="opset"):
        hfp8.export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", torch.randn(1, 2), opset=17)
    with pytest.raises(hfp8.ExportError, match="float32"):
        hfp8.export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx", torch.randn(1, 2).double())
    assert not (tmp_path / "x.onnx").exists()


def test_export_does_not_touch_the_model(tmp_path):
    qmodel = _quantized("cnn").train()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    hfp8.export_onnx(qmodel, tmp_path / "q.onnx", calibration_batches(1)[0])
    assert qmodel.training
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())


def test_manifest_travels_in_the_metadata(tmp_path):
    import json

    qmodel = _quantized("cnn")
    model = hfp8.export_onnx(qmodel, tmp_path / "q.onnx", calibration_batches(1)[0])
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["hfp8_ptq_manifest"]) == json.loads(json.dumps(hfp8.manifest(qmodel)))


def test_probe_values_cover_ties_subnormals_and_overflow():
    probes = hfp8.ptq.verify.probe_values(hfp8.E4M3)
    finite = probes[torch.isfinite(probes)]
    assert (finite == 2.0**-10).any()  # half the smallest subnormal: a tie to zero
    assert (finite == 464.0).any()  # the tie between 448 and the (NaN) code above
    assert (finite > 448 * 1.4).any() and torch.isnan(probes).any() and torch.isinf(probes).any()
    assert math.isclose(float(finite[finite > 0].min()), 2.0**-9 / 3, rel_tol=1e-6)


def test_verification_fails_on_a_tampered_file(tmp_path):
    qmodel = _quantized("cnn")
    path = tmp_path / "q.onnx"
    model = hfp8.export_onnx(qmodel, path, calibration_batches(1)[0])
    samples = [digits()[2][:100]]
    assert hfp8.ptq.verify.passed(hfp8.verify_onnx(qmodel, path, samples))

    # 1. a float part of the graph goes wrong (as onnxruntime's Relu fusion once made it)
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    for node in broken.graph.node:
        if node.op_type == "Max":  # a Relu written as Max(x, 0): make it the identity
            node.op_type, node.input[1:] = "Identity", []
    onnx.save(broken, tmp_path / "relu.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "relu.onnx", samples)
    assert report["bit_exact"] and not hfp8.ptq.verify.passed(report)

    # 2. a Q/DQ pair rounds differently (its scale doubled)
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    scale = next(t for t in broken.graph.initializer if t.name == "1.0.input_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 2, scale.name))
    onnx.save(broken, tmp_path / "scale.onnx")
    report = hfp8.verify_onnx(qmodel, tmp_path / "scale.onnx", samples)
    assert not report["pairs"]["1.0"]["bit_exact"] and not hfp8.ptq.verify.passed(report)
