"""Sign-magnitude binary floating-point formats with an integer exponent bias.

A :class:`FloatFormat` is a value: 1 sign bit, ``exponent_bits`` exponent bits, ``mantissa_bits``
explicit mantissa bits and an integer ``exponent_bias`` ``b``. With exponent field ``E`` and
mantissa field ``M``:

* normal (``E >= 1``):    ``(-1)^s * 2^(E - b) * (1 + M / 2^m)``
* subnormal (``E = 0``):  ``(-1)^s * 2^(1 - b) * (M / 2^m)``

``specials`` says which codes are not finite numbers:

* ``"fn"``: only the all-ones code ``S.1...1.1...1`` is NaN; there is no Inf (OCP E4M3FN).
* ``"ieee"``: the all-ones exponent field is reserved (``M = 0`` is Inf, else NaN).
* ``"none"``: every code is a finite number.

Changing the bias only rescales the grid by a power of two: the grid at bias ``b`` is the grid at
the default bias ``2^(e-1) - 1`` times ``2^(default - b)``. Larger bias, finer steps, smaller range.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["FloatFormat", "E4M3", "E5M2", "SPECIALS"]

SPECIALS = ("fn", "ieee", "none")

# float32 limits that every format value must respect so that the fake-quantized tensors
# (float32) hold format values exactly.
_FLOAT32_MAX_EXPONENT = 127
_FLOAT32_MIN_SUBNORMAL_EXPONENT = -149


@dataclass(frozen=True)
class FloatFormat:
    """A 1-e-m floating-point format; see the module docstring for the value of each code.

    ``exponent_bias=None`` means the IEEE-style default ``2^(exponent_bits - 1) - 1``.
    """

    exponent_bits: int
    mantissa_bits: int
    exponent_bias: int | None = None
    specials: str = "fn"

    def __post_init__(self) -> None:
        for name in ("exponent_bits", "mantissa_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not 1 <= self.exponent_bits <= 8:
            raise ValueError(f"exponent_bits must be in 1..8, got {self.exponent_bits}")
        if not 0 <= self.mantissa_bits <= 16:
            raise ValueError(f"mantissa_bits must be in 0..16, got {self.mantissa_bits}")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.exponent_bias is None:
            object.__setattr__(self, "exponent_bias", self.default_bias)
        bias = self.exponent_bias
        if isinstance(bias, bool) or not isinstance(bias, int):
            # Accept integral numpy/torch scalars; anything else is a caller mistake.
            try:
                as_int = int(bias)
            except (TypeError, ValueError):
                raise TypeError(f"exponent_bias must be an integer, got {bias!r}") from None
            if as_int != bias:
                raise TypeError(f"exponent_bias must be an integer, got {bias!r}")
            object.__setattr__(self, "exponent_bias", as_int)
        if self.specials == "ieee" and self.exponent_bits < 2:
            raise ValueError("the 'ieee' layout needs at least 2 exponent bits (one is reserved)")
        top_field, top_mantissa = self.largest_finite_fields()
        if top_field == 0 and top_mantissa == 0:
            raise ValueError(f"{self} has no positive finite value")
        # Range check: every value must be an exact float32 (normal or subnormal).
        top_exponent = max(top_field, 1) - self.exponent_bias
        if top_exponent > _FLOAT32_MAX_EXPONENT:
            raise ValueError(
                f"{self}: max finite 2^{top_exponent} does not fit in float32 "
                f"(largest exponent 127); use a larger exponent_bias"
            )
        smallest_exponent = 1 - self.exponent_bias - self.mantissa_bits
        if smallest_exponent < _FLOAT32_MIN_SUBNORMAL_EXPONENT:
            raise ValueError(
                f"{self}: smallest step 2^{smallest_exponent} is below float32's smallest "
                f"subnormal 2^-149; use a smaller exponent_bias"
            )

    # -- naming ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short name such as ``E4M3``."""
        return f"E{self.exponent_bits}M{self.mantissa_bits}"

    def __str__(self) -> str:
        return f"{self.name}(bias={self.exponent_bias}, {self.specials})"

    def __repr__(self) -> str:
        return str(self)

    # -- derived quantities -----------------------------------------------------------------------
    @property
    def default_bias(self) -> int:
        """``2^(exponent_bits - 1) - 1``: 7 for E4M3, 15 for E5M2."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def bits(self) -> int:
        """Total width in bits: 1 + exponent_bits + mantissa_bits."""
        return 1 + self.exponent_bits + self.mantissa_bits

    def with_bias(self, exponent_bias: int) -> "FloatFormat":
        """The same layout at another exponent bias (a power-of-two rescaling of the grid)."""
        return FloatFormat(self.exponent_bits, self.mantissa_bits, int(exponent_bias), self.specials)

    def code_value(self, exponent_field: int, mantissa_field: int) -> float:
        """Magnitude of the code with these fields, straight from the definition (float64)."""
        m, b = self.mantissa_bits, self.exponent_bias
        if exponent_field == 0:
            return math.ldexp(mantissa_field, 1 - b - m)
        return math.ldexp(2**m + mantissa_field, exponent_field - b - m)

    def largest_finite_fields(self) -> tuple[int, int]:
        """``(exponent field, mantissa field)`` of the code of ``max_finite``."""
        all_ones_exponent = 2**self.exponent_bits - 1
        all_ones_mantissa = 2**self.mantissa_bits - 1
        if self.specials == "none":
            return all_ones_exponent, all_ones_mantissa
        if self.specials == "ieee":
            return all_ones_exponent - 1, all_ones_mantissa
        # "fn": only the all-ones code is NaN.
        if self.mantissa_bits == 0:
            return all_ones_exponent - 1, 0
        return all_ones_exponent, all_ones_mantissa - 1

    @property
    def max_finite(self) -> float:
        """Largest finite value, e.g. 448 for E4M3 "fn" at bias 7, 57344 for E5M2 "ieee"."""
        return self.code_value(*self.largest_finite_fields())

    @property
    def smallest_normal(self) -> float:
        """``2^(1 - b)``: the smallest value with an implicit leading one."""
        return math.ldexp(1.0, 1 - self.exponent_bias)

    @property
    def smallest_subnormal(self) -> float | None:
        """``2^(1 - b - m)``; ``None`` when ``mantissa_bits == 0`` (no subnormals)."""
        if self.mantissa_bits == 0:
            return None
        return math.ldexp(1.0, 1 - self.exponent_bias - self.mantissa_bits)

    @property
    def smallest_positive(self) -> float:
        """Smallest positive value: the smallest subnormal, or the smallest normal if m = 0."""
        return self.smallest_subnormal or self.smallest_normal

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def num_finite_values(self) -> int:
        """Number of distinct finite real values (+0 and -0 count once)."""
        top_field, top_mantissa = self.largest_finite_fields()
        positive = top_field * 2**self.mantissa_bits + top_mantissa
        return 2 * positive + 1

    def grid(self) -> torch.Tensor:
        """All distinct finite values, sorted ascending, as an exact float32 tensor."""
        return _grid(self).clone()


@functools.lru_cache(maxsize=64)
def _grid(fmt: FloatFormat) -> torch.Tensor:
    top_field, top_mantissa = fmt.largest_finite_fields()
    count = top_field * 2**fmt.mantissa_bits + top_mantissa + 1
    codes = torch.arange(count, dtype=torch.int64)
    fields = codes >> fmt.mantissa_bits
    mantissas = codes & (2**fmt.mantissa_bits - 1)
    significand = torch.where(fields == 0, mantissas, mantissas + 2**fmt.mantissa_bits)
    exponent = torch.clamp(fields, min=1) - fmt.exponent_bias - fmt.mantissa_bits
    positive = torch.ldexp(significand.double(), exponent.double())
    return torch.cat([-positive[1:].flip(0), positive]).float()


E4M3 = FloatFormat(4, 3, 7, "fn")
"""HFP8 forward format (weights and activations): 1-4-3, bias 7, OCP E4M3FN layout, max 448."""

E5M2 = FloatFormat(5, 2, 15, "ieee")
"""HFP8 backward format (gradients): 1-5-2, bias 15, IEEE layout with Inf, max 57344."""
