"""QuantConfig: what to quantize, in which formats, and how to choose exponent biases."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hfp8._report import REPORT_ATTRIBUTE
from hfp8.calibration.batchnorm import BN_MODES
from hfp8.numerics.bias_selection import BIAS_METHODS
from hfp8.numerics.formats import E4M3, FloatFormat

__all__ = ["QuantConfig", "BIAS_METHODS", "GRANULARITIES", "BN_MODES", "WEIGHT_ROUNDINGS",
           "BUDGET_UNITS", "REPORT_ATTRIBUTE"]

GRANULARITIES = ("per_tensor", "per_channel")
WEIGHT_ROUNDINGS = ("compensated", "nearest")
BUDGET_UNITS = ("weights", "macs")


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`hfp8.quantize_model` quantizes a model.

    Attributes:
        weight_format: format of Conv/Linear weights; ``None`` keeps weights in float.
        activation_format: format of each quantized layer's input; ``None`` keeps inputs float.
        weight_granularity: ``"per_tensor"`` (default: one bias per weight tensor) or
            ``"per_channel"`` (one bias per output channel). The exponent already adapts to each
            value's magnitude, so per-channel biases matter far less than INT8 per-channel
            scales: on MobileNetV2 both give the same fidelity (see README).
        weight_bias_method / activation_bias_method: ``"mse"``, ``"max"`` (see
            :func:`hfp8.select_exponent_bias`) or ``"fixed"`` (the format's own bias).
        keep_first_and_last: keep the first and last layers in full precision, as the HFP8 paper
            does, decided by position in the data flow: every Conv/Linear whose input depends on
            no other Conv/Linear (it reads the model inputs) and every one that writes a model
            output (every head); see :mod:`hfp8.ptq.graph_probe`.
        quantize_attention: also round both operands of the attention products (activation x
            activation ``matmul``/``@``/``bmm`` and ``scaled_dot_product_attention``'s query,
            key, softmax probabilities and value). Softmax, LayerNorm and GELU stay float.
        exclude: fnmatch patterns of layer or attention-site names kept in full precision.
        include: fnmatch patterns of names quantized even if they are a first or last layer. A
            name may not match both lists; every pattern must match some layer or site.
        num_calibration_batches: use at most this many batches per calibration pass
            (``None``: all of them).
        bn_recalibration: ``"shift"`` (default: add the shift that quantization causes, measured
            on the calibration data, to the model's own statistics; robust with few samples),
            ``"full"`` (replace statistics by those of the calibration data, as in the paper) or
            ``"none"``.
        weight_rounding: ``"compensated"`` (default: error-compensating rounding onto the same
            FP8 grid under each layer's input second moments, see
            :mod:`hfp8.ptq.weight_rounding`) or ``"nearest"`` (each weight on its own).
        float_budget: keep the layers whose quantization harms the output most in float, most
            harmful per unit of cost first, while their cost stays within this fraction of
            all quantized layers' cost (0 turns it off); see :mod:`hfp8.ptq.sensitivity`.
        budget_unit: ``"weights"`` (default) or ``"macs"`` (multiply-accumulates per sample).
        target_sqnr_db: with a budget, stop keeping layers float once the predicted output SQNR
            reaches this (``None``: spend the budget).
        analysis_batches: calibration batches (the first ones) used for the input second
            moments and the sensitivity estimate.
        bn_shift_stride: with ``bn_recalibration="shift"``, the shift is measured on batch 0
            and every ``bn_shift_stride``-th batch after it, where the float reference runs
            beside the quantized model; input ranges are still observed on every batch. The
            shift is a difference of two models on the same samples, so half of them estimate it
            about as well (see README) at about half the reference's cost; 1 measures on all.
    """

    weight_format: FloatFormat | None = E4M3
    activation_format: FloatFormat | None = E4M3
    weight_granularity: str = "per_tensor"
    weight_bias_method: str = "mse"
    activation_bias_method: str = "mse"
    keep_first_and_last: bool = True
    quantize_attention: bool = True
    quantize_recurrent_state: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)
    include: tuple[str, ...] = field(default_factory=tuple)
    num_calibration_batches: int | None = None
    bn_recalibration: str = "shift"
    weight_rounding: str = "compensated"
    float_budget: float = 0.01
    budget_unit: str = "weights"
    target_sqnr_db: float | None = None
    analysis_batches: int = 2
    bn_shift_stride: int = 2

    def __post_init__(self) -> None:
        for name in ("weight_format", "activation_format"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, FloatFormat):
                raise TypeError(f"{name} must be a FloatFormat or None, got {value!r}")
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        _check_choice("weight_bias_method", self.weight_bias_method, BIAS_METHODS)
        _check_choice("activation_bias_method", self.activation_bias_method, BIAS_METHODS)
        _check_choice("bn_recalibration", self.bn_recalibration, BN_MODES)
        _check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        _check_choice("budget_unit", self.budget_unit, BUDGET_UNITS)
        if isinstance(self.float_budget, bool) or not isinstance(self.float_budget, (int, float)) \
                or not 0 <= self.float_budget <= 1:
            raise ValueError(f"float_budget must be a fraction in [0, 1], got {self.float_budget!r}")
        object.__setattr__(self, "float_budget", float(self.float_budget))
        if self.target_sqnr_db is not None and (isinstance(self.target_sqnr_db, bool) or not
                                                isinstance(self.target_sqnr_db, (int, float))):
            raise TypeError(f"target_sqnr_db must be a number or None, got {self.target_sqnr_db!r}")
        for name in ("analysis_batches", "bn_shift_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("exclude", "include"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                patterns = (patterns,)
            patterns = tuple(patterns)
            if not all(isinstance(p, str) and p for p in patterns):
                raise TypeError(f"{name} must be a sequence of non-empty name patterns")
            object.__setattr__(self, name, patterns)
        for name in ("keep_first_and_last", "quantize_attention", "quantize_recurrent_state"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        batches = self.num_calibration_batches
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                    or batches < 1):
            raise ValueError(f"num_calibration_batches must be a positive int or None, got {batches!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict; formats as their fields."""
        data = asdict(self)
        for name in ("weight_format", "activation_format"):
            fmt = getattr(self, name)
            data[name] = None if fmt is None else format_to_dict(fmt)
        data["exclude"], data["include"] = list(self.exclude), list(self.include)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a QuantConfig is read from a dict, got {type(data).__name__}")
        values = dict(data)
        for name in ("weight_format", "activation_format"):
            values[name] = format_from_dict(values.get(name))
        return cls(**values)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def format_to_dict(fmt: FloatFormat) -> dict:
    return {"exponent_bits": fmt.exponent_bits, "mantissa_bits": fmt.mantissa_bits,
            "exponent_bias": fmt.exponent_bias, "specials": fmt.specials}


def format_from_dict(data: dict | None) -> FloatFormat | None:
    return None if data is None else FloatFormat(**data)
