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


def test_a_voice_encoder_shaped_lstm_with_its_hidden_state_rounded(tmp_path):
    """LSTM + Linear from the command line: nothing to quantize by default (exit 2, saying how),
    then --quantize-first-last --round-recurrent-state: quantized, exported unrolled, verified."""
    from tests.ptq.test_recurrent import VoiceEncoderLike

    torch.manual_seed(0)
    torch.save(VoiceEncoderLike().state_dict(), tmp_path / "voice.pt")
    (tmp_path / "frames").mkdir()
    for index in range(16):
        np.save(tmp_path / "frames" / f"{index:02d}.npy",
                np.random.default_rng(index).standard_normal((10, 8)).astype(np.float32))
    arch = ["--arch", "tests.ptq.test_recurrent:VoiceEncoderLike"]
    nothing = run("quantize", tmp_path / "voice.pt", *arch, "--calib", tmp_path / "frames", "-o",
                  tmp_path / "q.pt", "--quiet", cwd=ROOT)
    assert nothing.returncode == 2 and "--quantize-first-last" in nothing.stderr, nothing.stderr
    assert not (tmp_path / "q.pt").exists()
    result = run("quantize", tmp_path / "voice.pt", *arch, "--calib", tmp_path / "frames",
                 "--quantize-first-last", "--round-recurrent-state", "-o", tmp_path / "q.pt",
                 "--onnx", tmp_path / "q.onnx", "--quiet", cwd=ROOT, check_code=0)
    assert "verification OK" in result.stdout
    assert "lstm.recurrent0.hidden" in result.stdout and "1 of 1 recurrent hidden states" in \
        result.stdout
    assert "1 recurrent: as close to their float64 run as PyTorch" in result.stdout
