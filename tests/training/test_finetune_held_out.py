"""Fine-tuning never returns a model worse on held-out data than the one it started from
(issue 20, item 2)."""

import json

import torch

import hfp8
from hfp8.training import finetune
from tests.small_models import calibration_batches, trained


def _ptq():
    model = trained("mobilenet_like")
    batches = calibration_batches(6)
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    return model, qmodel, batches


def test_a_fine_tune_that_hurts_returns_the_input_model_unchanged():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, epochs=1, lr=0.3, quiet=True)  # lr far too large
    held = tuned.hfp8_report["training"]["held_out"]
    assert held["checked"] and held["kept"] == "input"
    assert held["loss_after"] >= held["loss_before"]
    original = qmodel.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in tuned.state_dict().items())
    assert tuned is not qmodel


def test_validation_batches_are_judged_and_every_training_batch_is_used():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, epochs=1, lr=3e-5, quiet=True,
                     validation=calibration_batches(12)[8:])
    record = tuned.hfp8_report["training"]
    assert record["steps"] + record["skipped_steps"] == 6
    assert record["held_out"]["checked"]


def test_without_a_hold_out_nothing_is_checked_and_the_report_says_so():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, steps=2, lr=3e-5, quiet=True, hold_out=False)
    assert tuned.hfp8_report["training"]["held_out"] == {"checked": False}


def test_the_command_line_says_which_model_it_wrote(tmp_path):
    from tests.test_cli import run

    folder = tmp_path / "demo"
    run("example", folder, check_code=0)
    run("quantize", "model.pt", "--arch", "hfp8.examples:fashion_cnn", "--calib", "calibration",
        "--channels", "1", "--mean", "0", "--std", "1", "--resize", "0", "--crop", "0", "-o",
        "q.pt", "--quiet", cwd=folder, check_code=0)
    result = run("finetune", "q.pt", "--arch", "recorded", "--calib", "calibration",
                 "--reference", "model.pt", "-o", "bad.pt", "--lr", "0.3", "--json", "--quiet",
                 cwd=folder, check_code=0)
    held = json.loads(result.stdout)["training"]["held_out"]
    assert held["kept"] == "input"
    before = torch.load(folder / "q.pt", weights_only=True)
    after = torch.load(folder / "bad.pt", weights_only=True)
    state = {k: v for k, v in before.items() if torch.is_tensor(v)}
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    text = run("finetune", "q.pt", "--arch", "recorded", "--calib", "calibration", "--reference",
               "model.pt", "-o", "bad2.pt", "--lr", "0.3", "--quiet", cwd=folder,
               check_code=0).stdout
    assert "no held-out gain" in text and "the input model is written unchanged" in text
