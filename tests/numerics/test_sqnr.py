"""The one SQNR definition (hfp8.numerics.sqnr), against numpy and its named edge cases."""

import math

import numpy as np
import pytest

from hfp8.numerics.sqnr import sqnr_db


def test_a_known_ratio_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(1000)
    zq = z + 0.01 * rng.standard_normal(1000)
    signal, noise = float(np.sum(z * z)), float(np.sum((z - zq) ** 2))
    assert sqnr_db(signal, noise) == pytest.approx(10 * np.log10(np.sum(z ** 2) / np.sum((z - zq) ** 2)),
                                                   rel=1e-15)


def test_exact_values_are_plus_infinity_even_over_a_zero_signal():
    assert sqnr_db(3.0, 0.0) == math.inf
    assert sqnr_db(0.0, 0.0) == math.inf  # all zeros, reproduced exactly


def test_noise_over_a_zero_signal_is_minus_infinity():
    assert sqnr_db(0.0, 1e-30) == -math.inf


def test_infinite_noise_is_minus_infinity_not_a_math_domain_error():
    """Verification's float32 floor passes an infinite relative bound (``K u >= 1/2``) here."""
    assert sqnr_db(1.0, math.inf) == -math.inf


def test_nan_is_reported_not_hidden():
    assert math.isnan(sqnr_db(math.nan, 1.0)) and math.isnan(sqnr_db(1.0, math.nan))


def test_strict_json_writes_every_non_finite_value_as_null_at_any_depth():
    import json

    from hfp8.numerics.sqnr import strict_json

    report = {"a": math.inf, "b": [1.0, -math.inf, (math.nan, 2)], "c": {"d": 3.5, "e": "x"}}
    text = json.dumps(strict_json(report), allow_nan=False)  # raises if anything is left
    assert json.loads(text) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": 3.5, "e": "x"}}
