"""TrainingConfig: the formats and rules of HFP8 training (Sun et al., 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hfp8.numerics.formats import E4M3, E5M2, FloatFormat

__all__ = ["TrainingConfig", "GRADIENT_ROUNDINGS"]

GRADIENT_ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class TrainingConfig:
    """How :func:`hfp8.training.prepare_training` trains a model.

    Attributes:
        forward_format: weights and layer inputs in the forward pass (HFP8: 1-4-3). ``None``
            keeps them float.
        backward_format: the gradients flowing back into each quantized layer's output and out
            of its input (HFP8: 1-5-2). ``None`` keeps them float. Weight gradients are what
            the layer's backward computes from those rounded operands, kept in float32 for the
            optimizer, as the paper's FP8 GEMMs with wider accumulation give them; master
            weights stay float32 in the optimizer.
        gradient_rounding: ``"nearest"`` or ``"stochastic"`` (unbiased; seeded by ``seed``).
        history: gradient and input exponent biases are chosen per tensor and per step from the
            largest magnitude of the last ``history`` steps (delayed, as loss scaling is); the
            weight's from the current weight. A step whose gradients overflow that choice, or
            hold NaN/Inf, is skipped and counted; the next step's choice sees the new maximum.
        gradient_margin: gradient biases leave ``2^gradient_margin`` of headroom over that
            maximum (1-5-2 has range to spare; headroom keeps growing gradients from
            overflowing and skipping steps).
        weight_bias_method: ``"mse"`` or ``"max"`` for the weight bias each step.
        keep_first_and_last, exclude, include, quantize_attention: which layers and attention
            products train in HFP8 when preparing a float model (as
            :class:`hfp8.QuantConfig`; the paper keeps the first and last layers in higher
            precision). The softmax input always stays float.
    """

    forward_format: FloatFormat | None = E4M3
    backward_format: FloatFormat | None = E5M2
    gradient_rounding: str = "nearest"
    seed: int = 0
    history: int = 16
    gradient_margin: int = 2
    weight_bias_method: str = "mse"
    keep_first_and_last: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    include: tuple[str, ...] = field(default_factory=tuple)
    quantize_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("forward_format", "backward_format"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, FloatFormat):
                raise TypeError(f"{name} must be a FloatFormat or None, got {value!r}")
        if self.gradient_rounding not in GRADIENT_ROUNDINGS:
            raise ValueError(f"gradient_rounding must be one of {GRADIENT_ROUNDINGS}, got "
                             f"{self.gradient_rounding!r}")
        if self.weight_bias_method not in ("mse", "max"):
            raise ValueError(f"weight_bias_method must be 'mse' or 'max', got {self.weight_bias_method!r}")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"history must be a positive int, got {self.history!r}")
        if isinstance(self.gradient_margin, bool) or not isinstance(self.gradient_margin, int) \
                or not 0 <= self.gradient_margin <= 16:
            raise ValueError(f"gradient_margin must be an int in 0..16, got {self.gradient_margin!r}")
        for name in ("exclude", "include"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
