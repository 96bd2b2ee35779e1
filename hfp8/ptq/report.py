"""QuantReport: the one owner of what was done to a quantized model.

The pipeline builds it (:func:`hfp8.quantize_model`), training records its part
(:func:`hfp8.training.finetune`, :func:`hfp8.training.finish_training`), BatchNorm
re-estimation its part (:func:`recalibrate_batchnorm`), and a saved file rebuilds it
(:meth:`QuantReport.from_manifest`). Functions below the pipeline return their part; only the
functions named here write it. It hangs on the model as ``qmodel.hfp8_report``
(``REPORT_ATTRIBUTE``) and becomes the manifest with :meth:`QuantReport.to_manifest`.

Dict-style access (``qmodel.hfp8_report["training"]``) still works for code written against
0.2, for the field names only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from hfp8._report import REPORT_ATTRIBUTE
from hfp8.calibration.batchnorm import reestimate_batchnorm
from hfp8.ptq.manifest import build_manifest
from hfp8.ptq.operand_sites import owners_closed

__all__ = ["QuantReport", "report_of", "manifest", "recalibrate_batchnorm", "REPORT_ATTRIBUTE"]


@dataclass
class QuantReport:
    """What was done to a quantized model (JSON-ready values only).

    Attributes:
        config: the :class:`hfp8.QuantConfig` as a dict (``QuantConfig.to_dict``).
        kept_float: layer name -> why it stayed float.
        sites_kept_float: attention site -> why it stayed float.
        observers: point name -> observer summary (saturated and flushed fractions, SQNR in dB,
            max |x|), or a warning.
        weights: layer name -> what rounding did to its weight (flushed fraction, SQNR in dB).
        sensitivity: layer name -> predicted noise-to-signal ratio, SQNR, cost, kept float.
        batchnorm: the BatchNorm re-estimation report, or None.
        calibration_samples: samples the calibration pass saw.
        graph: first and last layers by position in the data flow, layers the probe never ran.
        training: what HFP8 training did, or None.
        metadata: free-form JSON of the caller (the CLI: architecture, preprocessing, input).
    """

    config: dict
    kept_float: dict = field(default_factory=dict)
    sites_kept_float: dict = field(default_factory=dict)
    observers: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    batchnorm: dict | None = None
    calibration_samples: int | None = 0
    graph: dict | None = None
    training: dict | None = None
    metadata: dict | None = None

    def to_manifest(self, qmodel: nn.Module) -> dict:
        """The manifest of ``qmodel`` (this report plus its layers' formats and biases); see
        :func:`hfp8.manifest`."""
        return build_manifest(qmodel, self)

    @classmethod
    def from_manifest(cls, data: dict, kept_float: dict) -> QuantReport:
        """The report of a model rebuilt from a saved manifest ``data`` (``kept_float``: the
        layers the rebuild left float, with their reasons)."""
        observers = {layer["name"]: layer.get("observer") for layer in data["layers"]
                     if layer["status"] == "quantized"}
        for site in data.get("attention") or []:
            for operand, entry in (site.get("operands") or {}).items():
                observers[f"{site['name']}.{operand}"] = (entry or {}).get("observer")
        return cls(
            config=data["config"], kept_float=kept_float,
            sites_kept_float={s["name"]: s.get("reason") for s in data.get("attention") or []
                              if s["status"] == "float"},
            observers=observers,
            weights={layer["name"]: layer.get("weight") for layer in data["layers"]
                     if layer["status"] == "quantized"},
            sensitivity={entry["name"]: {k: v for k, v in entry.items() if k != "name"}
                         for entry in data.get("sensitivity") or []},
            batchnorm=data.get("batchnorm"), calibration_samples=data.get("calibration_samples"),
            graph=data.get("graph"), training=data.get("training"), metadata=data.get("metadata"))

    # dict-style access, for code written against 0.2 (field names only)
    def _field(self, key: str) -> str:
        if key not in _FIELDS:
            raise KeyError(key)
        return key

    def __getitem__(self, key: str):
        return getattr(self, self._field(key))

    def __setitem__(self, key: str, value) -> None:
        setattr(self, self._field(key), value)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in _FIELDS else default


_FIELDS = frozenset(f.name for f in dataclasses.fields(QuantReport))


def report_of(qmodel: nn.Module) -> QuantReport:
    """``qmodel``'s report; a clear error for a model that :func:`hfp8.quantize_model` did not
    make."""
    report = getattr(qmodel, REPORT_ATTRIBUTE, None)
    if not isinstance(report, QuantReport):
        raise ValueError("this model was not produced by hfp8.quantize_model (no hfp8 report)")
    return report


def manifest(qmodel: nn.Module) -> dict:
    """JSON-ready description of a model returned by :func:`hfp8.quantize_model`.

    Keys: ``hfp8_ptq_version``, ``manifest_version``, ``config``, ``calibration_samples``,
    ``batchnorm`` (re-estimation report or None), ``graph`` (first and last layers found by
    position in the data flow, layers the probe batch did not run), ``metadata`` (free-form JSON
    the caller put in ``qmodel.hfp8_report.metadata``; the CLI records architecture,
    preprocessing and input shape there), ``layers``: one entry per Conv/Linear layer in
    registration order with ``name``, ``type`` (the model's own class), ``status``
    ("quantized" or "float"), ``reason`` (why float), ``weight_format``/
    ``weight_exponent_bias`` (an int, or a list per output channel), ``weight`` (flushed
    fraction and SQNR of the rounding), ``input_format``/``input_exponent_bias`` and
    ``observer`` (saturated and flushed fractions, SQNR, max |x| of the calibration inputs); and
    ``attention``: one entry per attention site (``kind`` matmul or sdpa, ``format``, and per
    operand its ``exponent_bias`` and ``observer``); ``sensitivity``: per layer considered by
    the float budget, ``nsr`` and ``sqnr_db`` (predicted output noise-to-signal ratio and SQNR
    with only this layer quantized), ``cost`` (weights or MACs) and ``float`` (kept float);
    ``training``: None, or what HFP8 training did (steps, skipped steps, formats, losses).
    """
    return report_of(qmodel).to_manifest(qmodel)


@owners_closed()
def recalibrate_batchnorm(model: nn.Module, calibration, num_batches: int | None = None, *,
                          method: str = "full", reference: nn.Module | None = None,
                          quiet: bool = False, measure_every: int = 1) -> dict:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` in place (see
    :func:`hfp8.calibration.batchnorm.reestimate_batchnorm` for the methods and guarantees) and
    return its report; on a model from :func:`hfp8.quantize_model` the report also replaces
    the one in its manifest."""
    result = reestimate_batchnorm(model, calibration, num_batches, method=method,
                                  reference=reference, quiet=quiet, measure_every=measure_every)
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if isinstance(report, QuantReport):
        report.batchnorm = result
    return result
