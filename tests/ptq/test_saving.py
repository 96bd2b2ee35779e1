import json
import math
import os

import pytest
import torch

import hfp8
from tests.small_models import calibration_batches, make_cnn, trained


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_save_load_gives_identical_outputs(tmp_path, granularity):
    model = trained("resnet")
    config = hfp8.QuantConfig(weight_granularity=granularity)
    qmodel = hfp8.quantize_model(model, calibration_batches(3), config, quiet=True)
    path = tmp_path / "q.pt"
    hfp8.save_quantized(qmodel, path)
    # a fresh, untrained instance of the architecture is all loading needs
    loaded = hfp8.load_quantized(path, _fresh("resnet"))
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert hfp8.manifest(loaded) == hfp8.manifest(qmodel)
    # the file loads with weights_only=True: no pickled code runs
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"hfp8_ptq_manifest", "state_dict"}


def _fresh(name):
    from tests.small_models import FACTORIES
    return FACTORIES[name]()


def test_manifest_contents(tmp_path):
    model = trained("cnn")
    # round to nearest, so that the saved weights can be checked against torch's own cast
    config = hfp8.QuantConfig(weight_rounding="nearest", float_budget=0.0)
    qmodel = hfp8.quantize_model(model, calibration_batches(3), config, quiet=True)
    data = hfp8.save_quantized(qmodel, tmp_path / "q.pt")
    assert data == hfp8.read_manifest(tmp_path / "q.pt")
    json.dumps(data)  # plain JSON
    assert data["hfp8_ptq_version"] == hfp8.__version__
    assert data["calibration_samples"] == 96
    assert data["config"] == config.to_dict()
    assert hfp8.QuantConfig.from_dict(data["config"]) == config
    assert data["batchnorm"]["batchnorm_layers"] == 4
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["0.0"]["status"] == "float" and "first" in layers["0.0"]["reason"]
    conv = layers["1.0"]
    assert conv["status"] == "quantized"
    assert conv["weight_format"] == {"exponent_bits": 4, "mantissa_bits": 3, "exponent_bias": 7,
                                     "specials": "fn"}
    # The recorded biases, checked against the float model and torch's own float8 cast: the saved
    # weight is the float weight cast to float8_e4m3fn at scale 2^(7 - bias), and the bias is the
    # documented mse choice.
    weight_bias = conv["weight_exponent_bias"]
    float_weight = model.get_submodule("1.0").weight.detach()
    assert weight_bias == hfp8.select_exponent_bias(float_weight, hfp8.E4M3, "mse")
    scale = 2.0 ** (7 - weight_bias)
    # (torch's cast does not saturate: clamp first, as the saturating format does)
    expected = (float_weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    saved = torch.load(tmp_path / "q.pt", weights_only=True)["state_dict"]["1.0.weight"]
    assert torch.equal(saved, expected)
    # mse searches upward from the widest bias that does not saturate the calibration max:
    # the largest b with 448 * 2^(7 - b) >= amax.
    observer = conv["observer"]
    widest = 7 + math.floor(math.log2(448 / observer["amax"]))
    assert widest <= conv["input_exponent_bias"] <= widest + 8  # DEFAULT_SEARCH_RADIUS
    assert 0 <= observer["saturated_fraction"] <= 1 and observer["sqnr_db"] > 20
    assert observer["values_seen"] == 96 * 16 * 8 * 8
    text = hfp8.format_manifest(data)
    assert "1.0" in text and "first layer: reads the model input" in text and "BN re-estimation: shift" in text
    assert f"{sum(layer['status'] == 'quantized' for layer in data['layers'])} of 5 layers quantized" in text


def test_manifest_records_a_later_batchnorm_re_estimation(tmp_path):
    model = trained("cnn")
    qmodel = hfp8.quantize_model(model, calibration_batches(2), quiet=True)
    hfp8.recalibrate_batchnorm(qmodel, calibration_batches(3), method="full", quiet=True)
    data = hfp8.save_quantized(qmodel, tmp_path / "q.pt")
    assert (data["batchnorm"]["method"], data["batchnorm"]["samples"]) == ("full", 96)
    assert "BN re-estimation: full" in hfp8.format_manifest(data)


def test_loading_into_the_wrong_architecture_is_refused(tmp_path):
    qmodel = hfp8.quantize_model(trained("cnn"), calibration_batches(2), quiet=True)
    hfp8.save_quantized(qmodel, tmp_path / "q.pt")
    with pytest.raises(hfp8.QuantizedFileError, match="same architecture|do not fit"):
        hfp8.load_quantized(tmp_path / "q.pt", _fresh("resnet"))


def test_damaged_weights_are_detected(tmp_path):
    qmodel = hfp8.quantize_model(trained("cnn"), calibration_batches(2), quiet=True)
    path = tmp_path / "q.pt"
    hfp8.save_quantized(qmodel, path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["1.0.weight"][0, 0, 0, 0] += 1e-3
    torch.save(payload, path)
    with pytest.raises(hfp8.QuantizedFileError, match="not on the E4M3 grid"):
        hfp8.load_quantized(path, make_cnn())


def test_non_hfp8_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(make_cnn().state_dict(), plain)
    with pytest.raises(hfp8.QuantizedFileError, match="no manifest"):
        hfp8.load_quantized(plain, make_cnn())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(hfp8.QuantizedFileError, match="not a readable"):
        hfp8.read_manifest(junk)
    with pytest.raises(hfp8.QuantizedFileError, match="no such file"):
        hfp8.read_manifest(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not produced by hfp8.quantize_model"):
        hfp8.save_quantized(make_cnn(), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_saving_is_atomic(tmp_path, monkeypatch):
    qmodel = hfp8.quantize_model(trained("cnn"), calibration_batches(2), quiet=True)
    path = tmp_path / "q.pt"
    path.write_bytes(b"precious")

    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):  # writes half, then the disk is full
        stream = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            stream.write(b"half")
            stream.close()
            raise OSError(28, "No space left on device", str(file))
        return stream

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(OSError, match="No space left on device"):
        hfp8.save_quantized(qmodel, path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["q.pt"]  # no temporary file left behind
    monkeypatch.undo()
    hfp8.save_quantized(qmodel, path)
    assert hfp8.read_manifest(path)["layers"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not left private by mkstemp
