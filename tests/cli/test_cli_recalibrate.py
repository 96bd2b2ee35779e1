"""recalibrate-bn cannot silently wreck a model (issue 20, item 3), and the BN mode has one name,
--bn-recalibration, with one default (shift) in quantize and recalibrate-bn."""

from __future__ import annotations

import json
import re

import pytest

from tests.cli.test_cli import ARCH, FLAGS, _assert_input_error, quantized_example, run


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_example(tmp_path_factory.mktemp("recal") / "demo")


def _recalibrate(folder, *extra, output="r.pt"):
    return run("recalibrate-bn", "q.pt", "--arch", "recorded", "--calib", "calibration",
               "--reference", "model.pt", "-o", output, "--quiet", *extra, cwd=folder)


def test_full_re_estimation_that_hurts_is_refused_and_force_writes_it(quantized):
    """On the example's 128 calibration images "full" statistics from 96 samples put the
    outputs further from the float model's on the 32 held out (measured 33.1 -> 22.4 dB)."""
    result = _recalibrate(quantized, "--bn-recalibration", "full")
    _assert_input_error(result, "worse", "held-out output SQNR", "--force",
                        leftovers=[quantized / "r.pt"])
    before, after = map(float, re.findall(r"(-?[\d.]+) dB", result.stderr)[:2])
    assert after < before
    forced = _recalibrate(quantized, "--bn-recalibration", "full", "--force")
    assert forced.returncode == 0 and "(worse; written because of --force)" in forced.stdout
    assert (quantized / "r.pt").exists()


def test_the_default_is_shift_and_it_is_checked(quantized):
    result = json.loads(_recalibrate(quantized, "--json", output="s.pt").stdout)
    assert result["batchnorm"]["method"] == "shift"
    assert result["batchnorm"]["samples"] == 96  # 3 of 4 batches; every 4th held out
    held = result["held_out"]
    assert held["samples"] == 32 and not held["worse"]


def test_recalibrate_bn_needs_the_float_model(quantized):
    result = run("recalibrate-bn", "q.pt", "--arch", "recorded", "--calib", "calibration",
                 "-o", "n.pt", "--quiet", cwd=quantized)
    _assert_input_error(result, "needs --reference", leftovers=[quantized / "n.pt"])


def test_one_batch_cannot_be_checked_unless_forced(quantized):
    result = _recalibrate(quantized, "--batch-size", "128", output="one.pt")
    _assert_input_error(result, "at least 2", "--force", leftovers=[quantized / "one.pt"])


def test_the_old_spellings_still_work_and_say_so(quantized):
    old = _recalibrate(quantized, "--method", "shift", output="o.pt")
    assert old.returncode == 0, old.stderr
    assert "--method shift is the old spelling of --bn-recalibration shift" in old.stderr
    quantize = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "n.pt",
                   "--no-bn-recalibration", "--json", "--quiet", cwd=quantized, check_code=0)
    assert "--no-bn-recalibration is the old spelling of --bn-recalibration none" in quantize.stderr
    assert json.loads(quantize.stdout)["manifest"]["config"]["bn_recalibration"] == "none"
    clash = run("quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, "-o", "c.pt",
                "--bn-recalibration", "full", "--bn-method", "shift", "--quiet", cwd=quantized)
    assert clash.returncode == 2 and "disagree" in clash.stderr
