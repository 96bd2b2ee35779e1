"""Signal-to-quantization-noise ratio, the one definition every report uses, and the one way a
report with its infinities is written as strict JSON."""

from __future__ import annotations

import math

__all__ = ["sqnr_db", "strict_json"]


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB, for summed squares ``signal = sum z^2`` and
    ``noise = sum (z - z_q)^2``. Exact values (``noise == 0``) give ``+inf``, whatever the
    signal; noise over a zero signal, or infinite noise, gives ``-inf``; NaN in either stays NaN
    (a NaN output is reported, not hidden). Never None, so reports can compare and sort it.
    (Strict JSON has no infinity: :func:`strict_json` writes it as null.)"""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0:
        return math.inf
    ratio = signal / noise
    return -math.inf if ratio == 0 else 10 * math.log10(ratio)


def strict_json(value):
    """``value`` (dicts, lists, tuples, scalars) with every non-finite float (an infinite SQNR of
    identical outputs) replaced by None, for ``json.dumps(..., allow_nan=False)``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value
