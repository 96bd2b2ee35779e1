"""Fine-tuning never returns a model worse on held-out data than the one it started from
(issue 20, item 2)."""

import functools
import json

import pytest
import torch

import hfp8
from hfp8.training import finetune
from tests.small_models import calibration_batches, trained


@functools.cache  # one PTQ model for the module: finetune never modifies its input (tested)
def _ptq():
    model = trained("mobilenet_like")
    batches = calibration_batches(6)
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(float_budget=0.0), quiet=True)
    return model, qmodel, batches


def test_a_fine_tune_that_hurts_returns_the_input_model_unchanged():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, epochs=1, lr=0.3, quiet=True)  # lr far too large
    held = tuned.hfp8_report.training["held_out"]
    assert held["checked"] and held["kept"] == "input"
    assert held["loss_after"] >= held["loss_before"]
    original = qmodel.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in tuned.state_dict().items())
    assert tuned is not qmodel


def test_validation_batches_are_judged_and_every_training_batch_is_used():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, epochs=1, lr=3e-5, quiet=True,
                     validation=calibration_batches(12)[8:])
    record = tuned.hfp8_report.training
    assert record["steps"] + record["skipped_steps"] == 6
    assert record["held_out"]["checked"]


def test_without_a_hold_out_nothing_is_checked_and_the_report_says_so():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, steps=2, lr=3e-5, quiet=True, hold_out=False)
    assert tuned.hfp8_report.training["held_out"] == {"checked": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The built-in example quantized with default flags (each test writes its own outputs)."""
    from tests.cli.test_cli import quantized_example

    return quantized_example(tmp_path_factory.mktemp("finetune") / "demo")


def test_the_command_line_says_which_model_it_wrote(demo):
    from tests.cli.test_cli import run

    folder = demo
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


def _kl_per_batch(teacher, student, batches):
    """KL(teacher || student) of the softmax, mean over samples, then over batches: written
    here from the definition, not the library's loss."""
    with torch.no_grad():
        return sum(float((teacher(x).softmax(1) * (teacher(x).log_softmax(1)
                                                    - student(x).log_softmax(1))).sum(1).mean())
                   for x in batches) / len(batches)


def test_the_best_epoch_is_kept_and_it_is_never_worse_than_the_input():
    model, qmodel, batches = _ptq()
    validation = calibration_batches(12)[8:]
    tuned = finetune(qmodel, model, batches, epochs=3, lr=1e-4, quiet=True,
                     validation=validation)
    held = tuned.hfp8_report.training["held_out"]
    assert [e["epoch"] for e in held["epochs"]] == [1, 2, 3]
    measured = _kl_per_batch(model, tuned, validation)
    start = _kl_per_batch(model, qmodel, validation)
    assert measured <= start
    best = min([start] + [e["loss"] for e in held["epochs"]])
    assert abs(measured - best) <= 1e-6 * best, (measured, held)
    kept = next((e["epoch"] for e in held["epochs"] if e["loss"] == best), 0)
    assert held["epoch"] == kept and held["kept"] == ("input" if kept == 0 else "fine-tuned")


def test_patience_stops_after_epochs_without_a_better_held_out_loss():
    model, qmodel, batches = _ptq()
    tuned = finetune(qmodel, model, batches, epochs=5, lr=0.3, quiet=True, patience=1)
    record = tuned.hfp8_report.training
    assert record["held_out"]["stopped_early"] and record["held_out"]["kept"] == "input"
    assert len(record["held_out"]["epochs"]) == 1
    assert record["steps"] + record["skipped_steps"] == 5  # one epoch of the 5 training batches


def test_schedule_and_patience_are_checked():
    model, qmodel, batches = _ptq()
    with pytest.raises(ValueError, match="schedule"):
        finetune(qmodel, model, batches, steps=1, schedule="linear", quiet=True)
    with pytest.raises(ValueError, match="patience"):
        finetune(qmodel, model, batches, steps=1, patience=0, quiet=True)


def test_the_command_line_passes_schedule_augmentation_and_patience(demo):
    from tests.cli.test_cli import run

    folder = demo
    common = ["finetune", "q.pt", "--arch", "recorded", "--calib", "calibration", "--reference",
              "model.pt", "--quiet"]
    result = run(*common, "-o", "t.pt", "--epochs", "2", "--lr-schedule", "constant",
                 "--json", cwd=folder, check_code=0)
    training = json.loads(result.stdout)["training"]
    assert training["schedule"] == "constant" and training["augmented"] is False
    assert [e["epoch"] for e in training["held_out"]["epochs"]] == [1, 2]
    augmented = run(*common, "-o", "t4.pt", "--steps", "2", "--augment", "--json", cwd=folder,
                    check_code=0)
    assert json.loads(augmented.stdout)["training"]["augmented"] is True
    error = run(*common, "-o", "t3.pt", "--patience", "0", cwd=folder, check_code=2).stderr
    assert error.strip() == "hfp8-ptq finetune: error: --patience must be at least 1", error


def test_the_command_line_names_the_epoch_it_kept_or_says_it_kept_none():
    """The two sentences of ``finetune``'s held-out line (one subprocess run would show only one
    of them; both are checked on the report they are made from)."""
    from hfp8.cli.finetune import _held_out_text

    kept = {"checked": True, "loss_before": 0.017, "loss_after": 0.01, "kept": "fine-tuned",
            "epoch": 2, "epochs": [{"loss": 0.02}, {"loss": 0.01}, {"loss": 0.012}],
            "stopped_early": True}
    assert _held_out_text(kept) == ("held-out distillation loss 0.017 -> 0.01 (epoch 2 of 3 "
                                    "kept, stopped early): the fine-tuned model is written")
    none = {"checked": True, "loss_before": 0.017, "kept": "input", "epoch": 0,
            "epochs": [{"loss": 0.02}], "loss_after": 0.017}
    assert _held_out_text(none) == ("no held-out gain (distillation loss 0.017; after each epoch "
                                    "0.02): the input model is written unchanged")
    assert _held_out_text({"checked": False}).startswith("held-out check: none")
