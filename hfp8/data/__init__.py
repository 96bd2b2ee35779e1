"""What goes into a model: sample folders and files, image preprocessing, batches and their
structure (model_io), and loading model files safely (model_files).

``SampleConfig``, ``SampleError`` and ``SampleFolder`` are imported on first use (PEP 562): the
batch helpers below them do not need PIL.
"""

from __future__ import annotations

import importlib

_PUBLIC = {"SampleConfig": "hfp8.data.sample_config", "SampleError": "hfp8.data.sample_files",
           "SampleFolder": "hfp8.data.samples"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hfp8.data' has no attribute {name!r}")
