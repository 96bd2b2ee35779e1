"""The quantized model verification runs beside the file (hfp8.export.verify_models): the
caller's, tapped in place and put back as it was; a copy only off the CPU or float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfp8
from hfp8.examples import CharTransformer
from hfp8.export import onnx_replay
from hfp8.export.verify import passed
from hfp8.ptq.operand_sites import operand_sites
from hfp8.ptq.quantizers import layer_state, quantized_layers


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    batches = [torch.randn(8, 16) for _ in range(2)]
    config = hfp8.QuantConfig(keep_first_and_last=False)
    return model.eval(), hfp8.quantize_model(model, batches, config, quiet=True), batches


def _char_lm():
    """A small causal Transformer (attention sites with taps of their own), untrained."""
    torch.manual_seed(0)
    model = CharTransformer(20, width=32).eval()
    batches = [torch.randint(20, (4, 16)) for _ in range(2)]
    return model, hfp8.quantize_model(model, batches, quiet=True), batches


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each stand-in quantized and exported once for the module: name -> (float model,
    quantized model, batches, file). Tests put back whatever they change."""
    folder = tmp_path_factory.mktemp("verify_models")
    made = {}
    for name, make in (("mlp", _mlp), ("transformer", _char_lm)):
        model, qmodel, batches = make()
        hfp8.export_onnx(qmodel, folder / f"{name}.onnx", batches[0])
        made[name] = (model, qmodel, batches, folder / f"{name}.onnx")
    return made


def _taps(qmodel) -> list:
    return [layer_state(layer).tap for layer in quantized_layers(qmodel).values()] + \
        [site.tap for _, site in operand_sites(qmodel).values()]


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_verification_taps_the_model_in_place_and_puts_it_back(exported, name):
    model, qmodel, batches, path = exported[name]
    qmodel.train()  # a caller's model in train mode, one part of it in eval mode: each
    next(iter(qmodel.children())).eval()  # module's flag comes back as it was
    modes = [module.training for module in qmodel.modules()]
    before = {key: value.clone() for key, value in qmodel.state_dict().items()}
    taps = _taps(qmodel)
    assert passed(hfp8.verify_onnx(qmodel, path, batches, reference=model))
    assert [module.training for module in qmodel.modules()] == modes
    assert _taps(qmodel) == taps and all(tap is None for tap in taps)
    assert all(torch.equal(before[key], value) for key, value in qmodel.state_dict().items())
    qmodel.eval()


def test_an_interrupted_verification_puts_the_model_back(exported, monkeypatch):
    _, qmodel, batches, path = exported["transformer"]

    def failing_run(*args, **kwargs):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(onnx_replay, "run", failing_run)
    with pytest.raises(RuntimeError, match="crashed"):
        hfp8.verify_onnx(qmodel, path, batches)
    assert all(tap is None for tap in _taps(qmodel)) and not qmodel.training


def test_a_model_not_in_float32_on_the_cpu_is_verified_on_a_copy(exported):
    model, qmodel, batches, path = exported["mlp"]
    qmodel.double()
    try:
        assert passed(hfp8.verify_onnx(qmodel, path, batches, reference=model))
        assert all(t.dtype == torch.float64 for t in qmodel.parameters())  # left as it was
    finally:
        qmodel.float()


def test_a_model_on_the_cpu_in_float32_is_verified_itself_not_a_copy(exported, monkeypatch):
    from hfp8.export import verify

    model, qmodel, batches, path = exported["mlp"]
    seen = []
    original = verify._verify
    monkeypatch.setattr(verify, "_verify", lambda tapped, *rest: seen.append(tapped) or
                        original(tapped, *rest))
    assert passed(hfp8.verify_onnx(qmodel, path, batches, reference=model))
    assert seen == [qmodel] and seen[0] is qmodel
