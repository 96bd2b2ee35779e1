"""A causal language model through the command line: token-id files in, quantize with an
exported and verified prefill graph, evaluate --perplexity against the float model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.cli.test_cli import run
from tests.small_models import char_text, char_windows, trained_char_lm

ROOT = Path(__file__).resolve().parents[2]


def test_quantize_export_and_perplexity_of_a_character_lm(tmp_path):
    torch.save(trained_char_lm().state_dict(), tmp_path / "lm.pt")
    (tmp_path / "lm_arch.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom tests.small_models import CharLM\n\n"
        f"def char_lm():\n    return CharLM({len(char_text()[1])})\n")
    for split, count, seed in (("calib", 64, 3), ("test", 48, 4)):
        (tmp_path / split).mkdir()
        windows = char_windows("train" if split == "calib" else "test", count, 40, seed=seed)
        for index, window in enumerate(windows):
            np.save(tmp_path / split / f"{index:03d}.npy", window.numpy())  # int64 token ids
    result = run("quantize", "lm.pt", "--arch", "lm_arch:char_lm", "--calib", "calib", "-o",
                 "lm.hfp8.pt", "--onnx", "lm.onnx", "--quiet", cwd=tmp_path, check_code=0)
    assert "verification OK" in result.stdout
    report = json.loads(run("evaluate", "lm.hfp8.pt", "--arch", "lm_arch:char_lm", "--data",
                            "test", "--perplexity", "--reference", "lm.pt", "--json", "--quiet",
                            cwd=tmp_path, check_code=0).stdout)
    assert report["tokens"] == 48 * 39 and abs(report["relative_change"]) <= 0.02, report
    onnx = json.loads(run("evaluate", "lm.onnx", "--data", "test", "--perplexity", "--json",
                          "--quiet", cwd=tmp_path, check_code=0).stdout)
    # the file runs on the same token files (how close it computes is what quantize's
    # verification judged above)
    assert onnx["tokens"] == report["tokens"] and np.isfinite(onnx["perplexity"])
    # a float image folder is not token data: one line, exit 2
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "images" / "a.npy", np.zeros((3, 8, 8), dtype=np.float32))
    refused = run("evaluate", "lm.pt", "--arch", "lm_arch:char_lm", "--data", "images",
                  "--perplexity", "--quiet", cwd=tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
