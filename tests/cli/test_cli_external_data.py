"""--external-data: the command line writes an ONNX file's weights to a second file beside it
(what a model past protobuf's 2 GiB needs), named before any work starts and placed together
with the command's other outputs, or not at all."""

from __future__ import annotations

import json
import stat

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.cli.test_cli import ARCH, FLAGS, _assert_input_error, quantized_example, run

EXPORT = ["export", "q.pt", "--arch", "recorded", "--quiet"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_example(tmp_path_factory.mktemp("external") / "demo")


def _outputs(path, x: torch.Tensor) -> np.ndarray:
    """The file's output in a default onnxruntime session (it reads the weights file itself)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _locations(path) -> set[str]:
    """The weights files the graph of ``path`` names."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def test_export_writes_the_weights_beside_the_file_and_computes_the_same(quantized):
    before = set(quantized.iterdir())
    run(*EXPORT, "-o", "one.onnx", "--no-verify", cwd=quantized, check_code=0)
    result = run(*EXPORT, "-o", "two.onnx", "--external-data", "--json", cwd=quantized,
                 check_code=0)
    report = json.loads(result.stdout)
    assert report["verification"]["bit_exact"] is True
    assert report["external_data"] == "two.onnx.data"
    one, two, data = (quantized / name for name in ("one.onnx", "two.onnx", "two.onnx.data"))
    assert set(quantized.iterdir()) - before == {one, two, data}  # no staging folder left
    # the graph names its weights file by its final name, not by the staged one
    assert _locations(two) == {"two.onnx.data"} and _locations(one) == set()
    assert two.stat().st_size < data.stat().st_size < one.stat().st_size
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(one.stat().st_mode)  # readable alike
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(_outputs(two, x), _outputs(one, x))
    # the other commands read the pair (the same outputs as one file: checked above)
    evaluation = json.loads(run("evaluate", "two.onnx", "--data", "test", "--json", "--quiet",
                                cwd=quantized, check_code=0).stdout)
    assert evaluation["samples"] == 500 and 0.8 < evaluation["top1"] <= 1
    inspected = json.loads(run("inspect", "two.onnx", "--json", cwd=quantized,
                               check_code=0).stdout)
    assert inspected["fp8_weight_tensors"] == 3


def test_quantize_with_onnx_and_external_data_writes_three_files(quantized):
    result = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "q2.pt",
                 "--onnx", "q2.onnx", "--external-data", "--quiet", cwd=quantized, check_code=0)
    assert "wrote q2.onnx.data" in result.stdout and "verification OK" in result.stdout
    assert _locations(quantized / "q2.onnx") == {"q2.onnx.data"}


def test_an_existing_weights_file_is_kept_and_nothing_is_written(quantized):
    kept = quantized / "three.onnx.data"
    kept.write_text("keep me")
    result = run(*EXPORT, "-o", "three.onnx", "--external-data", cwd=quantized)
    _assert_input_error(result, "three.onnx.data", "--overwrite",
                        leftovers=[quantized / "three.onnx"])
    assert kept.read_text() == "keep me"


def test_external_data_without_an_onnx_file_is_a_usage_error(quantized):
    result = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "q4.pt",
                 "--external-data", cwd=quantized)
    _assert_input_error(result, "--external-data", "--onnx", leftovers=[quantized / "q4.pt"])


def test_a_model_past_the_limit_without_the_flag_is_refused_naming_it(quantized, monkeypatch,
                                                                      capsys):
    """In process, with the limit lowered so that the example's 0.1 MB file passes it."""
    from hfp8.cli import main
    from hfp8.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    code = main(["export", str(quantized / "q.pt"), "--arch", "recorded", "-o",
                 str(quantized / "big.onnx"), "--quiet", "--no-verify"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "past what one file holds" in error and "--external-data" in error
    assert not (quantized / "big.onnx").exists()


def test_a_failed_verification_places_neither_file_nor_leaves_the_staging(quantized,
                                                                         monkeypatch):
    import hfp8
    from hfp8.cli import main

    def failing_verification(*args, **kwargs):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(hfp8, "verify_onnx", failing_verification)
    before = set(quantized.iterdir())
    code = main(["export", str(quantized / "q.pt"), "--arch", "recorded", "-o",
                 str(quantized / "four.onnx"), "--external-data", "--quiet"])
    assert code == 1  # an internal error
    assert set(quantized.iterdir()) == before
