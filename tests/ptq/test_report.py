"""QuantReport: the one owner of what was done to a quantized model."""

import pytest

import hfp8
from hfp8.ptq.report import QuantReport, report_of
from tests.small_models import calibration_batches, trained


def _qmodel():
    model = trained("mobilenet_like")
    return model, hfp8.quantize_model(model, calibration_batches(2),
                                      hfp8.QuantConfig(float_budget=0.0), quiet=True)


def test_the_pipeline_hangs_a_quant_report_and_the_manifest_is_built_from_it():
    _, qmodel = _qmodel()
    report = report_of(qmodel)
    assert isinstance(report, QuantReport) and report is qmodel.hfp8_report
    report.metadata = {"architecture": "x:y"}
    manifest = hfp8.manifest(qmodel)
    assert manifest["metadata"] == {"architecture": "x:y"}
    assert manifest["config"] == hfp8.QuantConfig(float_budget=0.0).to_dict()
    assert manifest == report.to_manifest(qmodel)


def test_a_saved_file_rebuilds_the_same_manifest(tmp_path):
    model, qmodel = _qmodel()
    hfp8.save_quantized(qmodel, tmp_path / "q.pt")
    loaded = hfp8.load_quantized(tmp_path / "q.pt", model)
    assert isinstance(report_of(loaded), QuantReport)
    assert hfp8.manifest(loaded) == hfp8.manifest(qmodel)


def test_dict_style_access_of_0_2_still_works_for_field_names_only():
    _, qmodel = _qmodel()
    qmodel.hfp8_report["metadata"] = {"a": 1}
    assert qmodel.hfp8_report.metadata == {"a": 1} == qmodel.hfp8_report["metadata"]
    assert qmodel.hfp8_report.get("training") is None
    assert qmodel.hfp8_report.get("no such field", 7) == 7
    with pytest.raises(KeyError):
        qmodel.hfp8_report["no such field"] = 1


def test_recalibrating_batchnorm_of_a_quantized_model_records_it_and_of_a_float_model_does_not():
    model, qmodel = _qmodel()
    result = hfp8.recalibrate_batchnorm(qmodel, calibration_batches(2), quiet=True)
    assert report_of(qmodel).batchnorm is result and result["method"] == "full"
    hfp8.recalibrate_batchnorm(model, calibration_batches(2), quiet=True)
    assert not hasattr(model, "hfp8_report")


def test_a_model_the_pipeline_did_not_make_is_refused_in_one_line():
    model, _ = _qmodel()
    with pytest.raises(ValueError, match="not produced by hfp8.quantize_model"):
        report_of(model)
