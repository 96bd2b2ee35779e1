"""Observers, input moments and BatchNorm re-estimation: what calibration measures on a model's
activations (sample folders and batches live in :mod:`hfp8.data`)."""

from __future__ import annotations

import warnings

_MOVED = {"SampleConfig", "SampleError", "SampleFolder"}  # to hfp8.data in 0.3


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"hfp8.calibration.{name} moved to hfp8.data.{name}", DeprecationWarning,
                      stacklevel=2)
        from hfp8 import data

        return getattr(data, name)
    raise AttributeError(f"module 'hfp8.calibration' has no attribute {name!r}")
