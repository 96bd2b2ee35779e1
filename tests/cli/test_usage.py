"""Command-line mistakes found before torch loads, and --device."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# main() in a fresh interpreter; prints the exit code and whether torch, onnx and TorchDynamo
# (about 1 s more than torch alone) were ever imported
PROBE = """
import json, sys
from hfp8.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def _probe(*args, cwd):
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                            text=True, cwd=cwd, timeout=300, check=False)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture
def files(tmp_path):
    (tmp_path / "calibration").mkdir()
    (tmp_path / "model.pt").write_bytes(b"not read before the checks")
    (tmp_path / "exists.pt").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["quantize", "missing.pt", "--calib", "calibration", "-o", "q.pt"],
     "missing.pt: no such file"),
    (["quantize", "model.pt", "--calib", "nowhere", "-o", "q.pt"],
     "sample folder nowhere does not exist"),
    (["quantize", "model.pt", "--calib", "model.pt", "-o", "q.pt"],
     "sample path model.pt is a file, not a folder"),
    (["quantize", "model.pt", "--calib", "calibration", "-o", "exists.pt"],
     "output exists.pt already exists; pass --overwrite to replace it"),
    (["quantize", "model.pt", "--calib", "calibration", "-o", "calibration/q.pt"],
     "inside the sample folder"),
    (["quantize", "model.pt", "--calib", "calibration", "-o", "q.pt", "--onnx", "q.pt"],
     "--onnx and -o name the same file"),
    (["export", "calibration", "-o", "q.onnx"], "calibration is not a file"),
    (["finetune", "model.pt", "--calib", "calibration", "--reference", "missing.pt", "-o",
      "t.pt"], "missing.pt: no such file"),
    (["evaluate", "model.pt", "--data", "nowhere"], "sample folder nowhere does not exist"),
], ids=["missing-model", "missing-folder", "folder-is-a-file", "output-exists",
        "output-inside-samples", "onnx-same-as-output", "model-is-a-folder",
        "missing-reference", "missing-data"])
def test_path_mistakes_are_reported_before_torch_is_imported(files, args, message):
    outcome, stderr = _probe(*args, cwd=files)
    assert outcome == {"code": 2, "torch": False, "onnx": False, "dynamo": False}, stderr
    assert message in stderr and stderr.count("\n") == 1, stderr


def test_inspect_of_a_quantized_file_does_not_import_onnx_or_torchdynamo(tmp_path):
    """Only commands that export or read ONNX import onnx (the verification helpers too); only
    building a quantized model imports TorchDynamo (to make it guard on hooks)."""
    import torch

    import hfp8

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
                                torch.nn.Linear(4, 2))
    qmodel = hfp8.quantize_model(model, [torch.randn(8, 4)], quiet=True)
    hfp8.save_quantized(qmodel, tmp_path / "q.hfp8.pt")
    outcome, stderr = _probe("inspect", "q.hfp8.pt", cwd=tmp_path)
    assert outcome == {"code": 0, "torch": True, "onnx": False, "dynamo": False}, stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_a_gpu_is_a_one_line_usage_error(files):
    outcome, stderr = _probe("quantize", "model.pt", "--calib", "calibration", "-o", "q.pt",
                             "--device", "cuda", cwd=files)
    assert outcome["code"] == 2, stderr
    assert "--device cuda: torch sees no CUDA device" in stderr and stderr.count("\n") == 1


def test_device_is_offered_where_a_model_runs_and_not_by_export():
    from hfp8.cli import build_parser

    parser = build_parser()
    for command in ("quantize", "recalibrate-bn", "evaluate", "finetune"):
        args = parser.parse_args([command, "m.pt", *{
            "quantize": ["--calib", "c", "-o", "o"], "recalibrate-bn": ["--calib", "c", "-o", "o"],
            "evaluate": ["--data", "d"],
            "finetune": ["--calib", "c", "--reference", "r", "-o", "o"]}[command]])
        assert args.device == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "q.pt", "-o", "q.onnx", "--device", "cpu"])
