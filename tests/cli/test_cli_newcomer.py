"""A newcomer's first hour (issue 20, item 5): each rough edge found by following README."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import ARCH, FLAGS, quantized_example, run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return quantized_example(tmp_path_factory.mktemp("newcomer") / "demo")


def test_arch_finds_a_module_in_the_current_folder(demo):
    (demo / "mymodels.py").write_text("from hfp8.examples import fashion_cnn as Net\n")
    result = run("evaluate", "model.pt", "--arch", "mymodels:Net", "--data", "test", *FLAGS,
                 "--quiet", cwd=demo, check_code=0)
    assert "top-1 accuracy 0.9200" in result.stdout


def test_images_smaller_than_resize_are_said_to_be_enlarged(demo):
    result = run("evaluate", "model.pt", *ARCH, "--data", "test", "--channels", "1", "--mean",
                 "0", "--std", "1", "--quiet", cwd=demo, check_code=0)
    assert "64 of the first 64 images" in result.stderr
    assert "smaller than --resize 256 (median short side 28 px)" in result.stderr
    quantized = json.loads(run("quantize", "model.pt", *ARCH, "--calib", "calibration",
                               "--channels", "1", "--mean", "0", "--std", "1", "-o", "big.pt",
                               "--json", "--quiet", cwd=demo, check_code=0).stdout)
    assert quantized["manifest"]["metadata"]["upscaled_images"] == {
        "checked": 64, "smaller_than_resize": 64}


def test_inspect_shows_what_the_file_records(demo):
    text = run("inspect", "q.pt", "--quiet", cwd=demo, check_code=0).stdout
    assert "architecture: hfp8.examples:fashion_cnn" in text
    assert "preprocessing: channels 1" in text and '"shape": [1, 28, 28]' in text


def test_export_says_what_each_long_phase_does(demo):
    result = run("export", "q.pt", "--arch", "recorded", "-o", "q.onnx", cwd=demo, check_code=0)
    phases = [line for line in result.stderr.splitlines() if line.startswith("hfp8-ptq export:")]
    assert [p.split(": ", 1)[1].split(" (")[0].split(" with ")[0] for p in phases] == [
        "exporting to ONNX", "verifying the ONNX file in onnxruntime"]
    quiet = run("export", "q.pt", "--arch", "recorded", "-o", "q2.onnx", "--quiet", cwd=demo,
                check_code=0)
    assert "hfp8-ptq export:" not in quiet.stderr


def test_help_says_what_flags_do_where_they_do_it():
    evaluate = " ".join(run("evaluate", "--help", check_code=0).stdout.split())
    assert "It also builds --reference" in evaluate
    assert "random verification inputs" not in evaluate  # evaluate verifies nothing
    export = " ".join(run("export", "--help", check_code=0).stdout.split())
    assert "seed for choosing --num-samples and for random verification inputs" in export
    quantize = " ".join(run("quantize", "--help", check_code=0).stdout.split())
    assert "default 2 here; SampleConfig's default 0" in quantize
    for command in ("inspect", "example"):  # nothing to hide: not offered, still accepted
        assert "--quiet" not in run(command, "--help", check_code=0).stdout
