"""Hostile and faulty inputs (issue 12): no code runs from a file's metadata, non-finite data
never yields a model, a failed check never replaces good files, small files cannot claim huge
memory, and input problems are input errors (exit 2, one line), not internal ones.

Each test names the numbered item of the issue it covers; each failed on the code before it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hfp8
from hfp8.examples import fashion_cnn
from tests.cli.test_cli import ARCH, EXE, FLAGS, _assert_input_error, run

REPO = Path(__file__).resolve().parents[2]


def _md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "demo"
    run("example", folder, check_code=0)
    model = fashion_cnn()
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    calibration = sorted((folder / "calibration").iterdir())
    return folder, model, calibration


def _quantized_file(folder, model, name, metadata):
    """A quantized model file whose manifest records ``metadata`` (what an attacker controls)."""
    batches = [torch.rand(8, 1, 28, 28) for _ in range(2)]
    qmodel = hfp8.quantize_model(model, batches, quiet=True)
    qmodel.hfp8_report.metadata = metadata
    hfp8.save_quantized(qmodel, folder / name)
    return folder / name


# -- 1. a file is data, never code --------------------------------------------------------------
def test_1_an_architecture_recorded_in_a_file_never_runs_unasked(demo, tmp_path):
    folder, model, _ = demo
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    marker = tmp_path / "marker"
    (bundle / "helper.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "def build():\n    raise SystemExit(0)\n")
    spec = "bundle/helper.py:build"
    qfile = _quantized_file(tmp_path, model, "evil.hfp8.pt",
                            {"architecture": spec, "input": {"shape": [1, 28, 28], "dtype": "float32"}})
    for args in (["export", qfile, "-o", tmp_path / "x.onnx"],
                 ["evaluate", qfile, "--data", folder / "test"],
                 ["recalibrate-bn", qfile, "--calib", folder / "calibration", "--reference",
                  folder / "model.pt", "-o", tmp_path / "r.pt"]):
        result = run(*args, "--quiet", cwd=tmp_path)
        _assert_input_error(result, "records architecture 'bundle/helper.py:build'", "--arch",
                            leftovers=[tmp_path / "x.onnx", tmp_path / "r.pt"])
        assert not marker.exists()
    # named explicitly, the user consents; SystemExit from it is an error, not a silent exit 0
    result = run("export", qfile, "--arch", spec, "-o", tmp_path / "x.onnx", cwd=tmp_path)
    _assert_input_error(result, "SystemExit", leftovers=[tmp_path / "x.onnx"])
    assert marker.exists()


def test_1_recorded_preprocessing_is_held_to_the_same_limits(demo, tmp_path):
    folder, model, _ = demo
    qfile = _quantized_file(tmp_path, model, "big.hfp8.pt", {
        "architecture": "hfp8.examples:fashion_cnn",
        "preprocessing": {"resize": 30000, "crop": None, "mean": [0.0], "std": [1.0], "channels": 1}})
    start = time.monotonic()
    result = run("evaluate", qfile, *ARCH, "--data", folder / "test", "--quiet")
    _assert_input_error(result, "resize must be at most 8192")
    assert time.monotonic() - start < 60


# -- 2. non-finite values never become a model --------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(demo, tmp_path_factory):
    folder, _, calibration = demo
    root = tmp_path_factory.mktemp("poisoned")
    for kind, value in (("nan", np.nan), ("inf", np.inf), ("huge64", 1e300)):
        target = root / kind
        target.mkdir()
        for path in calibration[:32]:
            (target / path.name).write_bytes(path.read_bytes())
        sample = np.full((1, 28, 28), 0.5, dtype=np.float64 if kind == "huge64" else np.float32)
        sample[0, 3, 3] = value
        np.save(target / f"zz-{kind}.npy", sample)
    overflow = root / "overflow"  # finite in float32, but the model overflows to Inf
    overflow.mkdir()
    for path in calibration[:16]:
        (overflow / path.name).write_bytes(path.read_bytes())
    np.save(overflow / "big.npy", np.full((1, 28, 28), 3e38, dtype=np.float32))
    return root


@pytest.mark.parametrize("kind", ["nan", "inf", "huge64"])
def test_2_a_non_finite_sample_is_skipped_by_name_or_refused_with_strict(demo, poisoned, kind,
                                                                          tmp_path):
    folder, _, _ = demo
    out = tmp_path / "q.pt"
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", poisoned / kind, *FLAGS,
                 "-o", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"zz-{kind}.npy (holds NaN or Inf values)" in result.stderr
    state = torch.load(out, weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    manifest = hfp8.read_manifest(out)
    assert manifest["calibration_samples"] == 32
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", poisoned / kind, *FLAGS,
                 "-o", tmp_path / "strict.pt", "--strict", "--quiet")
    _assert_input_error(result, f"zz-{kind}.npy", "NaN or Inf", leftovers=[tmp_path / "strict.pt"])


def test_2_activations_that_overflow_stop_the_run_naming_the_layer(demo, poisoned, tmp_path):
    folder, _, _ = demo
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", poisoned / "overflow", *FLAGS,
                 "-o", tmp_path / "q.pt", "--quiet")
    _assert_input_error(result, "NaN or Inf", leftovers=[tmp_path / "q.pt"])
    assert "BatchNorm '" in result.stderr or "the input of '" in result.stderr


def test_2_a_tiny_std_is_refused(demo, tmp_path):
    folder, _, _ = demo
    flags = [f if f != "1" or i != FLAGS.index("--std") + 1 else "1e-45" for i, f in enumerate(FLAGS)]
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", folder / "calibration", *flags,
                 "-o", tmp_path / "q.pt", "--quiet")
    _assert_input_error(result, "std must be at least", leftovers=[tmp_path / "q.pt"])


@pytest.mark.parametrize("damage", ["nan_running_var", "weights_x1e30"])
def test_2_a_broken_input_model_is_refused_naming_the_layer(demo, tmp_path, damage):
    folder, model, _ = demo
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if damage == "nan_running_var":
        state["1.1.running_var"][0] = float("nan")
        words = ["BatchNorm '1.1'", "NaN or Inf running statistics"]
    else:
        state["1.0.weight"] *= 1e30
        words = ["NaN or Inf"]
    torch.save(state, tmp_path / "broken.pt")
    result = run("quantize", tmp_path / "broken.pt", *ARCH, "--calib", folder / "calibration",
                 *FLAGS, "-o", tmp_path / "q.pt", "--quiet")
    _assert_input_error(result, *words, leftovers=[tmp_path / "q.pt"])


# -- 3. a failed verification replaces nothing ---------------------------------------------------
def test_3_a_failed_verification_leaves_every_existing_file_as_it_was(demo, tmp_path, monkeypatch,
                                                                      capsys):
    from hfp8.cli import main
    from hfp8.export import verify

    folder, _, _ = demo
    out, onnx_out = tmp_path / "q.hfp8.pt", tmp_path / "q.onnx"
    out.write_text("good quantized model")
    onnx_out.write_text("good onnx")
    before = {p.name: _md5(p) for p in tmp_path.iterdir()}
    monkeypatch.setattr(verify, "passed", lambda report: False)
    code = main(["quantize", str(folder / "model.pt"), *ARCH, "--calib",
                 str(folder / "calibration"), *FLAGS, "-o", str(out), "--onnx", str(onnx_out),
                 "--overwrite", "--quiet"])
    assert code == 1
    assert "verification FAILED" in capsys.readouterr().err
    assert {p.name: _md5(p) for p in tmp_path.iterdir()} == before  # no temporary either


# -- 4. export leaves nothing behind on errors ---------------------------------------------------
def test_4_export_to_a_folder_name_or_a_failing_model_leaves_no_file(demo, tmp_path):
    folder, model, _ = demo
    qfile = _quantized_file(tmp_path, model, "q.hfp8.pt", {
        "architecture": "hfp8.examples:fashion_cnn", "input": {"shape": [1, 28, 28], "dtype": "float32"}})
    result = run("export", qfile, *ARCH, "-o", f"{tmp_path}/newfile.onnx/", cwd=tmp_path)
    _assert_input_error(result, "names a folder", leftovers=[tmp_path / "newfile.onnx"])
    result = run("export", qfile, *ARCH, "-o", tmp_path / "ok.onnx", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx", "q.hfp8.pt"]


# -- 5. small files, bounded memory --------------------------------------------------------------
PEAK = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(result.returncode)
print(result.stderr)
"""


def _peak_kib(*args, cwd=None):
    out = subprocess.run([sys.executable, "-c", PEAK, EXE, *map(str, args)], capture_output=True,
                         text=True, cwd=cwd, timeout=600)
    peak, code, stderr = out.stdout.split("\n", 2)
    return int(peak), int(code), stderr


def test_5_a_tiny_file_cannot_claim_gigabytes(demo, tmp_path):
    folder, _, calibration = demo
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    for target in (clean, bad):
        target.mkdir()
        for path in calibration[:4]:
            Image.open(path).convert("RGB").save(target / f"{path.stem}.png")
    Image.new("L", (1, 20000)).save(bad / "strip.png")  # 157 bytes: resized, 1.3 gigapixels
    assert (bad / "strip.png").stat().st_size < 1000
    torch.save(torch.zeros(1).expand(17000, 17000), bad / "expanded.pt")  # a few bytes of storage
    assert (bad / "expanded.pt").stat().st_size < 4000
    args = ["evaluate", "model.pt", *ARCH, "--reference", "model.pt", "--channels", "1",
            "--mean", "0", "--std", "1", "--quiet"]
    base, code, stderr = _peak_kib(*args, "--data", clean, cwd=folder)
    assert code == 0, stderr
    peak, code, stderr = _peak_kib(*args, "--data", bad, cwd=folder)
    assert code == 0, stderr
    assert "strip.png (image of 1x20000 pixels would be resized" in stderr
    assert "expanded.pt (ValueError: tensor of shape (17000, 17000) has more than" in stderr
    assert peak - base < 200 * 1024, (base, peak)  # was +5.4 GB and +1.4 GB


# -- 6. input problems are input errors, naming the file -----------------------------------------
def test_6_damaged_files_and_manifests_are_input_errors(demo, tmp_path):
    folder, model, _ = demo
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _assert_input_error(run("inspect", empty), str(empty), "not an ONNX model")
    qfile = _quantized_file(tmp_path, model, "q.hfp8.pt", {})
    payload = torch.load(qfile, weights_only=True)
    for name, manifest in (("nolayers", {**json.loads(payload["hfp8_ptq_manifest"]), "layers": None}),
                           ("list", [1, 2]),
                           ("strings", {**json.loads(payload["hfp8_ptq_manifest"]), "layers": "x"})):
        torch.save({**payload, "hfp8_ptq_manifest": json.dumps(manifest)}, tmp_path / f"{name}.pt")
        _assert_input_error(run("inspect", tmp_path / f"{name}.pt"), "damaged manifest")
    exported = tmp_path / "q.onnx"
    run("export", qfile, *ARCH, "-o", exported, "--no-verify", "--verify-data",
        folder / "calibration", *FLAGS, "--quiet", check_code=0)
    import onnx

    graph = onnx.load(exported)
    for prop in graph.metadata_props:
        prop.value = json.dumps({"manifest_version": 2, "layers": "x"})
    onnx.save(graph, tmp_path / "badmeta.onnx")
    _assert_input_error(run("inspect", tmp_path / "badmeta.onnx"), "badmeta.onnx", "damaged manifest")
    data = bytearray(exported.read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.onnx").write_bytes(bytes(data))
    result = run("evaluate", tmp_path / "flipped.onnx", "--data", folder / "test", "--quiet")
    assert result.returncode == 2 and "flipped.onnx" in result.stderr, result.stderr


def test_6_a_full_disk_is_an_input_error(demo, tmp_path, monkeypatch, capsys):
    from hfp8.cli import main

    folder, _, _ = demo
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    code = main(["quantize", str(folder / "model.pt"), *ARCH, "--calib", str(folder / "calibration"),
                 *FLAGS, "-o", str(tmp_path / "q.pt"), "--quiet"])
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- 7. no race replaces a file without --overwrite ----------------------------------------------
def test_7_two_runs_to_the_same_outputs_never_both_write(demo, tmp_path):
    folder, _, _ = demo
    command = [EXE, "quantize", str(folder / "model.pt"), *ARCH, "--calib",
               str(folder / "calibration"), *FLAGS, "-o", str(tmp_path / "q.pt"), "--quiet"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "already exists" in loser or "appeared while writing" in loser
    assert hfp8.read_manifest(tmp_path / "q.pt")["layers"]  # the winner's file, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


# -- 8. files are classified by their content ----------------------------------------------------
def test_8_legacy_state_dicts_load_and_garbage_is_not_onnx(demo, tmp_path):
    folder, model, _ = demo
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    run("quantize", tmp_path / "legacy.pt", *ARCH, "--calib", folder / "calibration", *FLAGS,
        "-o", tmp_path / "q.pt", "--quiet", check_code=0)
    (tmp_path / "garbage.pt").write_bytes(b"\x08" + os.urandom(300))
    result = run("quantize", tmp_path / "garbage.pt", *ARCH, "--calib", folder / "calibration",
                 *FLAGS, "-o", tmp_path / "g.pt", "--quiet")
    _assert_input_error(result, "is not a PyTorch model file")


# -- 9 and 10: names and special outputs ---------------------------------------------------------
def test_9_a_long_legal_output_name_works(demo, tmp_path):
    folder, _, _ = demo
    name = tmp_path / ("q" * 245 + ".hfp8.pt")
    assert len(name.name) == 253
    run("quantize", folder / "model.pt", *ARCH, "--calib", folder / "calibration", *FLAGS,
        "-o", name, "--quiet", check_code=0)
    assert hfp8.read_manifest(name)["layers"]


def test_10_fifos_and_outputs_inside_the_sample_folder_are_refused(demo, tmp_path):
    folder, _, _ = demo
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", folder / "calibration", *FLAGS,
                 "-o", fifo, "--overwrite", "--quiet")
    _assert_input_error(result, "not a regular file")
    assert fifo.is_fifo()
    samples = tmp_path / "samples"
    samples.mkdir()
    for path in sorted((folder / "calibration").iterdir())[:8]:
        (samples / path.name).write_bytes(path.read_bytes())
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", samples, *FLAGS,
                 "-o", samples / "q.png", "--quiet")
    _assert_input_error(result, "inside the sample folder", leftovers=[samples / "q.png"])


def test_10_weight_flushing_is_reported(demo):
    _, model, _ = demo
    broken = fashion_cnn()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():  # one outlier sets the bias; the small weights round to zero
        broken.get_submodule("2.0").weight[0, 0, 0, 0] = 1e4
    qmodel = hfp8.quantize_model(broken, [torch.rand(8, 1, 28, 28)], quiet=True)
    layer = next(entry for entry in hfp8.manifest(qmodel)["layers"] if entry["name"] == "2.0")
    flushed = layer["weight"]["flushed_fraction"]
    weight = broken.get_submodule("2.0").weight.detach()
    bias = layer["weight_exponent_bias"]
    # independent count: weights below half the smallest subnormal at that bias, through
    # torch's float8 cast at scale 2^(7 - bias)
    scale = 2.0 ** (7 - bias)
    zeroed = ((weight / scale).to(torch.float8_e4m3fn).float() == 0) & (weight != 0)
    assert flushed == int(zeroed.sum()) / int((weight != 0).sum())
    assert flushed > 0.1
    table = hfp8.format_manifest(hfp8.manifest(qmodel))
    assert "w flushed" in table and f"{100 * flushed:.3g}%" in table


def test_10_an_interrupt_while_starting_is_one_line(tmp_path):
    process = subprocess.Popen([EXE, "inspect", str(tmp_path / "x.pt")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # Signal once torch's shared library is being loaded: torch is still importing. (A fixed
    # sleep hits the interpreter's own start-up on a loaded machine, before any code of ours.)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
                break
        except OSError:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (130, 2), stderr  # 2: it had finished before the signal
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_10_a_folder_of_hidden_files_says_so(demo, tmp_path):
    folder, _, _ = demo
    (tmp_path / ".a.png").write_bytes(b"x")
    result = run("quantize", folder / "model.pt", *ARCH, "--calib", tmp_path, *FLAGS, "-o",
                 folder / "never.pt", "--quiet")
    _assert_input_error(result, "hidden")


# -- a newcomer's trial ---------------------------------------------------------------------------
def test_newcomer_help_and_messages(demo, tmp_path):
    folder, _, _ = demo
    top = run("--help", check_code=0).stdout
    assert "examples" in top and "hfp8-ptq example demo" in top
    recal = " ".join(run("recalibrate-bn", "--help", check_code=0).stdout.split())
    assert "folder of samples to measure on" in recal and "quantized model file to write" in recal
    assert "default: what the model was quantized with" in recal
    export = " ".join(run("export", "--help", check_code=0).stdout.split())
    assert "ONNX file to write" in export and "samples per batch" in export
    result = run("evaluate", folder / "model.pt", *ARCH, "--data", folder / "calibration", *FLAGS)
    _assert_input_error(result, "--reference")
    exported = tmp_path / "m.onnx"
    torch_model = fashion_cnn()
    hfp8.export_onnx(torch_model, exported, torch.rand(2, 1, 28, 28))
    _assert_input_error(run("export", exported, "-o", tmp_path / "x.onnx"),
                        "not an hfp8-ptq quantized model")
    # onnxruntime's shape complaint keeps its details (they were cut at the first line)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.new("RGB", (28, 28)).save(rgb / "a.png")
    result = run("evaluate", exported, "--data", rgb, "--reference", folder / "model.pt", *ARCH,
                 "--resize", "0", "--crop", "0")
    _assert_input_error(result, "Expected")


def test_newcomer_sample_config_takes_zero_for_skip_and_quantize_names_shape_problems():
    from hfp8.data import SampleConfig

    assert SampleConfig(resize=0, crop=0).resize is None
    model = fashion_cnn()
    with pytest.raises(ValueError, match=r"rejects the first calibration batch \(a float32 tensor "
                                         r"of shape \(2, 3, 28, 28\)\).*channels"):
        hfp8.quantize_model(model, [torch.rand(2, 3, 28, 28)], quiet=True)
