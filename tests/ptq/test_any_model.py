"""Models of structures we did not write: quantize, export and verify each stand-in."""

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hfp8
from hfp8.export.verify import passed
from hfp8.ptq.attention import attention_by_definition
from hfp8.ptq.evaluation import compare_outputs
from hfp8.ptq.operand_sites import operand_sites
from hfp8.ptq.quantizers import quantized_layers
from tests.structures import (
    PyramidHeads,
    SamePadNet,
    TinyEncoder,
    TupleHeads,
    token_batches,
)


def _images(shape, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def _e4m3_at(x, bias):
    """Rounding through torch's own float8_e4m3fn at scale 2^(7 - bias) (independent path)."""
    scale = 2.0 ** (7 - bias)
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _quantize_export_verify(model, calibration, tmp_path, example=None):
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    path = tmp_path / "model.onnx"
    graph = hfp8.export_onnx(qmodel, path, calibration[0] if example is None else example)
    report = hfp8.verify_onnx(qmodel, path, calibration, reference=model)
    assert report["bit_exact"], {k: v for k, v in report["pairs"].items() if not v["bit_exact"]}
    assert all(entry["checked"] for entry in report["layers"].values()), report["layers"]
    assert report["layers_exact"], report["layers"]
    assert report["whole_model"]["passed"], report["whole_model"]
    assert passed(report)
    return qmodel, graph, report


def _kept(qmodel):
    return {layer["name"]: layer["reason"] for layer in hfp8.manifest(qmodel)["layers"]
            if layer["status"] == "float"}


def test_conv_subclass_with_its_own_same_padding_forward(tmp_path):
    torch.manual_seed(0)
    model = SamePadNet().eval()
    qmodel, graph, _ = _quantize_export_verify(model, _images((4, 3, 15, 15)), tmp_path)
    assert set(quantized_layers(qmodel)) == {"depthwise", "project"}
    assert set(_kept(qmodel)) == {"stem", "fc"}
    layer = qmodel.depthwise
    assert type(layer) is type(model.depthwise)  # its own forward still runs
    # Its output is the subclass's forward on the rounded input and weight, computed here
    # through torch's float8 cast, not through our code.
    x = torch.randn(2, 8, 7, 7)
    weight = layer.weight.detach()
    assert torch.equal(_e4m3_at(weight, int(layer.weight_exponent_bias)), weight)  # on the grid
    expected = SamePadConv2d_forward(layer, _e4m3_at(x, int(layer.input_exponent_bias)), weight)
    assert torch.equal(layer(x), expected)
    types = [n.op_type for n in graph.graph.node]
    assert types.count("QuantizeLinear") == 2 and types.count("Conv") == 3


def SamePadConv2d_forward(layer, x, weight):  # noqa: N802 - mirrors the class it stands for
    height, width = x.shape[-2:]
    pad_h = max((math.ceil(height / layer.stride[0]) - 1) * layer.stride[0] + 3 - height, 0)
    pad_w = max((math.ceil(width / layer.stride[1]) - 1) * layer.stride[1] + 3 - width, 0)
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return F.conv2d(x, weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)


def test_prelu_transpose_view_and_a_tuple_of_heads(tmp_path):
    torch.manual_seed(0)
    model = TupleHeads().eval()
    qmodel, graph, report = _quantize_export_verify(model, _images((6, 3, 14, 14)), tmp_path)
    # every head writes a model output: all three stay float, whatever the registration order
    assert set(_kept(qmodel)) == {"conv1", "marks", "boxes", "scores"}
    assert set(quantized_layers(qmodel)) == {"conv2", "fc"}
    assert [o.name for o in graph.graph.output] and len(report["outputs"]) == 3
    assert "PRelu" in {n.op_type for n in graph.graph.node}


def test_interpolate_permute_view_and_a_dict_of_outputs(tmp_path):
    torch.manual_seed(0)
    model = PyramidHeads().eval()
    qmodel, _, report = _quantize_export_verify(model, _images((4, 3, 16, 16)), tmp_path)
    assert set(_kept(qmodel)) == {"down1.0", "cls.0", "cls.1", "box.0", "box.1"}
    assert set(report["outputs"]) == {"scores", "boxes"}
    comparison = compare_outputs(model, qmodel, _images((4, 3, 16, 16), seed=1))
    assert set(comparison["outputs"]) == {"scores", "boxes"}
    assert all(o["cosine"] > 0.99 for o in comparison["outputs"].values())


def test_bert_like_encoder_with_dict_inputs_and_attention(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batches = token_batches()
    qmodel, graph, report = _quantize_export_verify(model, batches, tmp_path)
    # the two inputs travel as named graph inputs: the mask was not dropped
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    sites = operand_sites(qmodel)
    assert set(sites) == {"blocks.0.matmul0", "blocks.0.matmul1", "blocks.1.sdpa0"}
    pairs = report["pairs"]
    for name in ("blocks.0.matmul0.left", "blocks.0.matmul1.right", "blocks.1.sdpa0.probs",
                 "blocks.1.sdpa0.key"):
        assert pairs[name]["bit_exact"] and pairs[name]["values"] > 0
    assert set(_kept(qmodel)) == {"blocks.0.query", "blocks.0.key", "blocks.0.value",
                                  "blocks.1.down", "pool"}
    text = hfp8.format_manifest(hfp8.manifest(qmodel))
    assert "3 of 3 attention products quantized" in text


def test_the_attention_mask_reaches_the_model_and_changes_its_output():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batches = token_batches()
    qmodel = hfp8.quantize_model(model, batches, quiet=True)
    batch = batches[0]
    unmasked = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    with torch.no_grad():
        masked_out = qmodel(**batch)["pooled"]
        unmasked_out = qmodel(**unmasked)["pooled"]
    padded_rows = batch["attention_mask"].min(1).values == 0
    assert padded_rows.any()
    # rows with padding change when the mask is dropped; rows without padding do not
    assert not torch.allclose(masked_out[padded_rows], unmasked_out[padded_rows], atol=1e-3)
    assert torch.equal(masked_out[~padded_rows], unmasked_out[~padded_rows])
    # and the calibration saw the masked attention: the probabilities of masked keys are 0,
    # so the observer of blocks.1's probs saw zeros for them
    summary = hfp8.manifest(qmodel)["attention"]
    probs = next(s for s in summary if s["name"] == "blocks.1.sdpa0")["operands"]["probs"]["observer"]
    assert probs["zero_fraction"] > 0


def test_attention_operands_lie_on_the_e4m3_grid_of_their_bias():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    qmodel = hfp8.quantize_model(model, token_batches(), quiet=True)
    owner, site = operand_sites(qmodel)["blocks.1.sdpa0"]
    seen = {}
    site.tap = lambda site, operand, x: seen.setdefault(operand, x.detach().clone())
    with torch.no_grad():
        qmodel(**token_batches(1, seed=5)[0])
    site.tap = None
    for operand, x in seen.items():
        bias = int(getattr(owner, site.bias_buffer(operand)))
        rounded = _e4m3_at(x, bias)
        assert torch.equal(hfp8.fake_quantize(x, hfp8.E4M3.with_bias(bias)), rounded), operand
    assert set(seen) == {"query", "key", "probs", "value"}


@pytest.mark.parametrize("case", ["float_mask", "bool_mask", "causal", "gqa", "scale"])
def test_attention_by_definition_matches_torch(case):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    kwargs = {}
    if case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 6)
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(5, 6) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif case == "causal":
        k, v = k[:, :, :5], v[:, :, :5]
        kwargs["is_causal"] = True
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    else:
        kwargs["scale"] = 0.3
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(attention_by_definition(q, k, v, **kwargs), expected,
                               rtol=1e-5, atol=1e-6)


def test_matmul_with_a_weight_parameter_is_not_an_attention_site():
    class WeightMatmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))
            self.head = nn.Linear(8, 2)
            self.stem = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.stem(x) @ self.weight)

    with pytest.warns(UserWarning, match="no layer was quantized"):  # stem and head: first, last
        qmodel = hfp8.quantize_model(WeightMatmul(), _images((4, 8)), quiet=True)
    assert operand_sites(qmodel) == {} and hfp8.manifest(qmodel)["attention"] == []


def test_attention_can_be_left_float_and_sites_matched_by_pattern():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    off = hfp8.quantize_model(model, token_batches(), hfp8.QuantConfig(quantize_attention=False),
                              quiet=True)
    assert operand_sites(off) == {}
    assert all(s["status"] == "float" for s in hfp8.manifest(off)["attention"])
    some = hfp8.quantize_model(model, token_batches(), hfp8.QuantConfig(exclude=("*.sdpa*",)),
                               quiet=True)
    assert set(operand_sites(some)) == {"blocks.0.matmul0", "blocks.0.matmul1"}


def test_labelled_batches_pass_inputs_and_say_what_was_left_out():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    labelled = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"1 item\(s\) beyond the inputs .* int64 tensor of "
                                         r"shape \(5,\).* not passed \(taken for targets\)"):
        qmodel = hfp8.quantize_model(model, labelled, quiet=True)
    assert hfp8.manifest(qmodel)["calibration_samples"] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hfp8.quantize_model(model, [x for x, _ in labelled], quiet=True)


def test_a_model_with_nothing_to_quantize_warns_and_says_how_to_change_it():
    model = nn.Sequential(nn.Linear(4, 3))  # first and last at once
    with pytest.warns(UserWarning, match=r"no layer was quantized: 0: first layer.*"
                                         r"keep_first_and_last=False\), or include="):
        hfp8.quantize_model(model, _images((4, 4)), quiet=True)
    with warnings.catch_warnings():  # and the way it names works
        warnings.simplefilter("error")
        qmodel = hfp8.quantize_model(model, _images((4, 4)),
                                     hfp8.QuantConfig(keep_first_and_last=False), quiet=True)
    assert list(quantized_layers(qmodel)) == ["0"]


def test_computed_weights_are_left_float_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
                          nn.Linear(8, 8), nn.Linear(8, 2))
    qmodel = hfp8.quantize_model(model, _images((4, 4)), quiet=True)
    assert "computed in forward" in _kept(qmodel)["1"]
    assert set(quantized_layers(qmodel)) == {"2"}


def test_exported_graph_carries_no_local_paths_and_is_deterministic(tmp_path):
    torch.manual_seed(0)
    model = TupleHeads().eval()
    qmodel = hfp8.quantize_model(model, _images((4, 3, 14, 14)), quiet=True)
    hfp8.export_onnx(qmodel, tmp_path / "a.onnx", _images((4, 3, 14, 14))[0])
    hfp8.export_onnx(qmodel, tmp_path / "b.onnx", _images((2, 3, 14, 14), seed=3)[0])
    data = (tmp_path / "a.onnx").read_bytes()
    assert data == (tmp_path / "b.onnx").read_bytes()
    assert __file__.encode() not in data and b"stack_trace" not in data
    graph = onnx.load(tmp_path / "a.onnx")
    for batch in (1, 5):  # the batch dimension stays free
        x = torch.randn(batch, 3, 14, 14)
        session = hfp8.export.onnx_replay.session(graph)
        outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = qmodel(x)
        for actual, wanted in zip(outputs, expected):
            assert actual.shape == tuple(wanted.shape)
            assert np.abs(actual - wanted.numpy()).max() < 1e-3
