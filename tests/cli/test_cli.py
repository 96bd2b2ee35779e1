"""The command line, run through subprocess exactly as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hfp8.examples import fashion_cnn

EXE = str(Path(sys.executable).with_name("hfp8-ptq"))
FLAGS = ["--channels", "1", "--mean", "0", "--std", "1", "--resize", "0", "--crop", "0"]
ARCH = ["--arch", "hfp8.examples:fashion_cnn"]


def run(*args, cwd=None, check_code=None):
    result = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                            timeout=600)
    if check_code is not None:
        assert result.returncode == check_code, (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "demo"
    result = run("example", folder, check_code=0)
    assert "hfp8-ptq quantize model.pt" in result.stdout
    return folder


@pytest.fixture(scope="module")
def quantized(example):
    """quantize -> ONNX export in one run, exactly as README's quick start."""
    result = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o",
                 "model.hfp8.pt", "--onnx", "model.onnx", "--quiet", cwd=example, check_code=0)
    assert "verification OK" in result.stdout
    return example, result


def quantized_example(folder):
    """``hfp8-ptq example`` into ``folder``, then the built-in model quantized to ``q.pt`` there
    (the README's first step, default flags)."""
    run("example", folder, check_code=0)
    run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "q.pt", "--quiet",
        cwd=folder, check_code=0)
    return folder


def test_quick_start_quantize_export_evaluate(quantized):
    folder, result = quantized
    assert "first layer: reads the model input" in result.stdout  # the manifest table
    float_run = run("evaluate", "model.pt", *ARCH, "--data", "test", *FLAGS, "--quiet",
                    cwd=folder, check_code=0)
    onnx_run = run("evaluate", "model.onnx", "--data", "test", "--quiet", cwd=folder, check_code=0)
    q_run = run("evaluate", "model.hfp8.pt", "--arch", "recorded", "--data", "test", "--quiet",
                cwd=folder, check_code=0)
    accuracy = {name: float(r.stdout.split("top-1 accuracy ")[1].split()[0])
                for name, r in (("float", float_run), ("onnx", onnx_run), ("q", q_run))}
    assert accuracy["float"] > 0.85
    assert accuracy["onnx"] == accuracy["q"]  # the file computes what the PyTorch model does
    assert accuracy["q"] >= accuracy["float"] - 0.02  # 500 images: 10 images
    import onnxruntime

    onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def test_json_reports_parse(quantized):
    folder, _ = quantized
    inspect = json.loads(run("inspect", "model.hfp8.pt", "--json", cwd=folder, check_code=0).stdout)
    assert inspect["metadata"]["architecture"] == "hfp8.examples:fashion_cnn"
    assert inspect["metadata"]["input"] == {"shape": [1, 28, 28], "dtype": "float32"}
    assert sum(layer["status"] == "quantized" for layer in inspect["layers"]) == 3
    onnx_info = json.loads(run("inspect", "model.onnx", "--json", cwd=folder, check_code=0).stdout)
    assert onnx_info["quantize_linear"] == 3 and onnx_info["fp8_weight_tensors"] == 3
    evaluation = json.loads(run("evaluate", "model.onnx", "--data", "test", "--json", "--quiet",
                                cwd=folder, check_code=0).stdout)
    assert evaluation["samples"] == 500 and 0.8 < evaluation["top1"] <= 1
    # --arch recorded: the float reference is built with the architecture model.hfp8.pt records
    fidelity = json.loads(run("evaluate", "model.hfp8.pt", "--arch", "recorded", "--data",
                              "calibration", "--reference", "model.pt", "--json", "--quiet",
                              cwd=folder, check_code=0).stdout)
    assert fidelity["top1_agreement"] > 0.9 and fidelity["sqnr_db"] > 15
    exported = json.loads(run("export", "model.hfp8.pt", "--arch", "recorded", "-o", "again.onnx",
                              "--json", "--quiet", cwd=folder, check_code=0).stdout)
    assert exported["verification"]["bit_exact"] is True
    quantized_json = json.loads(run("quantize", "model.pt", *ARCH, "--calib", "calibration",
                                    *FLAGS, "-o", "q2.pt", "--per-channel", "--bias-method", "max",
                                    "--json", "--quiet", cwd=folder, check_code=0).stdout)
    assert quantized_json["manifest"]["config"]["weight_granularity"] == "per_channel"
    recalibrated = json.loads(run("recalibrate-bn", "q2.pt", *ARCH, "--calib", "calibration",
                                  "--reference", "model.pt", "-o", "q3.pt", "--json", "--quiet",
                                  cwd=folder, check_code=0).stdout)
    assert recalibrated["batchnorm"]["batchnorm_layers"] == 4
    assert recalibrated["batchnorm"]["method"] == "shift"  # the default, as in quantize


def _assert_input_error(result, *words, leftovers=()):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    for path in leftovers:
        assert not Path(path).exists(), path


@pytest.fixture(scope="module")
def bad_inputs(example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.pt").write_text("not a model")
    torch.save(fashion_cnn(), folder / "pickled.pt")
    broken = fashion_cnn()
    broken.load_state_dict(torch.load(example / "model.pt", weights_only=True))
    with torch.no_grad():
        broken[1][0].weight[0, 0, 0, 0] = float("nan")
    torch.save(broken.state_dict(), folder / "nan.pt")
    (folder / "empty").mkdir()
    mixed = folder / "mixed"
    mixed.mkdir()
    for i, name in enumerate(sorted((example / "calibration").iterdir())[:8]):
        Image.open(name).save(mixed / f"good-{i}.jpg")
    (mixed / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "branchy_cnn.py").write_text(  # Python control flow on data: not capturable
        "from torch import nn\n\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GELU(),\n"
        "                                  nn.Conv2d(4, 4, 3), nn.Flatten())\n"
        "        self.head = nn.Linear(4 * 24 * 24, 10)\n\n"
        "    def forward(self, x):\n"
        "        y = self.body(x)\n"
        "        if y.mean() > 0:\n"
        "            y = 2 * y\n"
        "        return self.head(y)\n\n\n"
        "def branchy_cnn():\n"
        "    return Branchy()\n")
    sys.path.insert(0, str(folder))
    try:
        from branchy_cnn import branchy_cnn
        torch.save(branchy_cnn().state_dict(), folder / "branchy.pt")
    finally:
        sys.path.remove(str(folder))
    (folder / "damaged.onnx").write_bytes(b"\x08\x07" + bytes(range(200)))
    rgb = folder / "rgb"
    rgb.mkdir()
    for i in range(4):
        Image.new("RGB", (28, 28), (i * 40, 10, 200)).save(rgb / f"{i}.png")
    return folder


def _quantize(example, *args):
    return run("quantize", *args, "--quiet", cwd=example)


def test_missing_and_non_model_files(example, bad_inputs):
    out = bad_inputs / "out.pt"
    _assert_input_error(_quantize(example, "nope.pt", *ARCH, "--calib", "calibration", *FLAGS,
                                  "-o", out), "nope.pt", "no such file", leftovers=[out])
    _assert_input_error(_quantize(example, bad_inputs / "notes.pt", *ARCH, "--calib",
                                  "calibration", *FLAGS, "-o", out), "not a PyTorch model file",
                        leftovers=[out])


def test_pickled_module_needs_trust(example, bad_inputs):
    out = bad_inputs / "out.pt"
    result = _quantize(example, bad_inputs / "pickled.pt", "--calib", "calibration", *FLAGS,
                       "-o", out)
    _assert_input_error(result, "pickled", "--trust-pickle", "state_dict", leftovers=[out])
    trusted = _quantize(example, bad_inputs / "pickled.pt", "--trust-pickle", "--calib",
                        "calibration", *FLAGS, "-o", out)
    assert trusted.returncode == 0, trusted.stderr
    out.unlink()


def test_state_dict_without_or_with_the_wrong_arch(example, bad_inputs):
    out = bad_inputs / "out.pt"
    _assert_input_error(_quantize(example, "model.pt", "--calib", "calibration", *FLAGS, "-o", out),
                        "--arch", leftovers=[out])
    _assert_input_error(_quantize(example, "model.pt", "--arch", "hfp8.models:mobilenet_v2",
                                  "--calib", "calibration", *FLAGS, "-o", out),
                        "does not fit", leftovers=[out])
    _assert_input_error(_quantize(example, "model.pt", "--arch", "no_such_pkg:net", "--calib",
                                  "calibration", *FLAGS, "-o", out), "cannot import",
                        leftovers=[out])


def test_sample_folder_problems(example, bad_inputs):
    out = bad_inputs / "out.pt"
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", bad_inputs / "empty",
                                  *FLAGS, "-o", out), "empty", leftovers=[out])
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", bad_inputs / "missing",
                                  *FLAGS, "-o", out), "missing", leftovers=[out])
    # one corrupt JPEG among good ones: skipped with a warning...
    result = _quantize(example, "model.pt", *ARCH, "--calib", bad_inputs / "mixed", *FLAGS,
                       "-o", out)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "corrupt.jpg" in result.stderr
    assert "Traceback" not in result.stderr
    out.unlink()
    # ...or a hard error with --strict
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", bad_inputs / "mixed",
                                  *FLAGS, "-o", out, "--strict"), "corrupt.jpg", leftovers=[out])


def test_wrong_channel_count(example, bad_inputs):
    out = bad_inputs / "out.pt"
    result = _quantize(example, "model.pt", *ARCH, "--calib", bad_inputs / "rgb", "--resize", "0",
                       "--crop", "0", "-o", out)
    _assert_input_error(result, "rejects samples", "(3, 28, 28)", leftovers=[out])


def test_output_path_problems(example, bad_inputs):
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                                  "-o", "model.pt", "--overwrite"), "also an input")
    assert (example / "model.pt").stat().st_size > 0
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                                  "-o", "/proc/out.pt"), "cannot write", leftovers=["/proc/out.pt"])
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                                  "-o", bad_inputs / "no" / "out.pt"), "does not exist")
    existing = bad_inputs / "existing.pt"
    existing.write_text("keep me")
    _assert_input_error(_quantize(example, "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                                  "-o", existing), "--overwrite")
    assert existing.read_text() == "keep me"


def test_nan_weights(example, bad_inputs):
    out = bad_inputs / "out.pt"
    _assert_input_error(_quantize(example, bad_inputs / "nan.pt", *ARCH, "--calib", "calibration",
                                  *FLAGS, "-o", out), "NaN", leftovers=[out])


def test_usage_errors_exit_2_and_help_has_examples():
    assert run("quantize").returncode == 2
    assert run("frobnicate").returncode == 2
    for command in ("quantize", "recalibrate-bn", "export", "evaluate", "inspect", "example"):
        help_text = run(command, "--help", check_code=0).stdout
        assert "examples:" in help_text and "hfp8-ptq " + command in help_text


def test_inspect_refuses_other_files(bad_inputs):
    _assert_input_error(run("inspect", bad_inputs / "notes.pt"), "neither")


def test_example_refuses_a_non_empty_folder(example):
    _assert_input_error(run("example", example), "not an empty folder")


def test_unexportable_model_with_onnx_fails_before_calibration_and_writes_nothing(example,
                                                                                 bad_inputs):
    out, onnx_out = bad_inputs / "branchy.hfp8.pt", bad_inputs / "branchy.onnx"
    for path in (out, onnx_out):
        path.write_text("keep me")
    before = set(bad_inputs.iterdir())
    result = _quantize(example, bad_inputs / "branchy.pt", "--arch",
                       f"{bad_inputs / 'branchy_cnn.py'}:branchy_cnn", "--calib", "calibration",
                       *FLAGS, "-o", out, "--onnx", onnx_out, "--overwrite")
    _assert_input_error(result, "cannot be exported", "data-dependent", "without --onnx")
    assert out.read_text() == "keep me" and onnx_out.read_text() == "keep me"
    assert set(bad_inputs.iterdir()) == before  # no temporary file left either


def test_damaged_onnx_file_is_an_input_error(example, bad_inputs):
    damaged = bad_inputs / "damaged.onnx"
    _assert_input_error(run("inspect", damaged), "not a readable ONNX file")
    _assert_input_error(run("evaluate", damaged, "--data", example / "test", "--quiet"),
                        "not a readable ONNX file")


def test_json_is_strict_and_debug_shows_the_traceback(example, bad_inputs):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    same = run("evaluate", "model.pt", *ARCH, "--reference", "model.pt", "--data", "calibration",
               *FLAGS, "--json", "--quiet", cwd=example, check_code=0)
    report = json.loads(same.stdout, parse_constant=refuse)
    assert report["top1_agreement"] == 1.0 and report["sqnr_db"] is None  # infinite: null
    debug = run("inspect", bad_inputs / "notes.pt", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_quantize_with_onnx_writes_both_files_or_neither(example, bad_inputs, monkeypatch):
    """In process, so that verification can be made to fail after both files were written."""
    import hfp8
    from hfp8.cli import main

    out, onnx_out = bad_inputs / "staged.hfp8.pt", bad_inputs / "staged.onnx"
    for path in (out, onnx_out):
        path.write_text("keep me")
    before = set(bad_inputs.iterdir())

    def failing_verification(*args, **kwargs):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(hfp8, "verify_onnx", failing_verification)
    code = main(["quantize", str(example / "model.pt"), *ARCH, "--calib",
                 str(example / "calibration"), *FLAGS, "-o", str(out), "--onnx", str(onnx_out),
                 "--overwrite", "--quiet"])
    assert code == 1  # an internal error
    assert out.read_text() == "keep me" and onnx_out.read_text() == "keep me"
    assert set(bad_inputs.iterdir()) == before


def test_unexportable_model_is_refused_before_calibration(example, bad_inputs, monkeypatch):
    import hfp8
    from hfp8.cli import main

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the export check")

    monkeypatch.setattr(hfp8, "quantize_model", no_calibration)
    code = main(["quantize", str(bad_inputs / "branchy.pt"), "--arch",
                 f"{bad_inputs / 'branchy_cnn.py'}:branchy_cnn", "--calib", str(example / "calibration"),
                 *FLAGS, "-o", str(bad_inputs / "g.pt"), "--onnx", str(bad_inputs / "g.onnx"),
                 "--quiet"])
    assert code == 2
    assert not (bad_inputs / "g.pt").exists() and not (bad_inputs / "g.onnx").exists()


def test_finetune_float_budget_and_plot_through_the_command_line(quantized):
    folder, _ = quantized
    budget = json.loads(run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                            "-o", "budget.pt", "--float-budget", "0.5", "--json", "--quiet",
                            cwd=folder, check_code=0).stdout)
    reasons = [layer["reason"] or "" for layer in budget["manifest"]["layers"]]
    assert any(reason.startswith("sensitive: predicted output SQNR") for reason in reasons), reasons
    plotted = run("inspect", "budget.pt", "--plot", "layers.png", "--quiet", cwd=folder, check_code=0)
    assert (folder / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plotted.stdout
    tuned = json.loads(run("finetune", "model.hfp8.pt", "--arch", "recorded", "--calib",
                           "calibration", "--reference", "model.pt", "-o", "tuned.pt", "--steps",
                           "3", "--json", "--quiet", cwd=folder, check_code=0).stdout)
    training = tuned["training"]
    assert training["steps"] + training["skipped_steps"] == 3
    assert training["loss_before"] > 0 and training["loss_after"] > 0
    exported = run("export", "tuned.pt", "--arch", "recorded", "-o", "tuned.onnx", "--quiet",
                   cwd=folder, check_code=0)
    assert "verification OK" in exported.stdout


@pytest.mark.parametrize("flags, words", [
    (["--lr", "-1"], ["lr"]),
    (["--steps", "0"], ["steps"]),
    (["--steps", "2", "--epochs", "1"], ["--steps or --epochs"]),
], ids=["negative_lr", "zero_steps", "steps_and_epochs"])
def test_finetune_bad_values_are_one_line_errors(quantized, flags, words):
    folder, _ = quantized
    result = run("finetune", "model.hfp8.pt", "--arch", "recorded", "--calib", "calibration",
                 "--reference", "model.pt", "-o", "never.pt", *flags, cwd=folder)
    _assert_input_error(result, *words, leftovers=[folder / "never.pt"])


def test_float_budget_out_of_range_is_a_usage_error(quantized):
    folder, _ = quantized
    result = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "never.pt",
                 "--float-budget", "2", cwd=folder)
    _assert_input_error(result, "float", leftovers=[folder / "never.pt"])


def test_bn_shift_stride_through_the_command_line(quantized):
    folder, default = quantized  # 128 samples in batches of 32: the shift measured on 0 and 2
    assert "from 128 samples (the shift measured on 64 of them" in default.stdout
    result = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "never.pt",
                 "--bn-shift-stride", "0", cwd=folder)
    _assert_input_error(result, "bn_shift_stride", leftovers=[folder / "never.pt"])
    every = json.loads(run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS,
                           "-o", "every.pt", "--bn-shift-stride", "1", "--batch-size", "32",
                           "--json", "--quiet", cwd=folder, check_code=0).stdout)
    batchnorm = every["manifest"]["batchnorm"]
    assert batchnorm["measured_samples"] == batchnorm["samples"] == 128
