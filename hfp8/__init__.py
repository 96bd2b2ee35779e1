"""hfp8-ptq: post-training quantization of PyTorch models to Hybrid 8-bit Floating Point.

The public names below are imported on first use (PEP 562), so ``import hfp8`` and the command
line start without loading torch; an interrupted start then ends cleanly instead of in a
traceback from deep inside an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hfp8._version import __version__

# public name -> module that defines it
_PUBLIC = {
    "recalibrate_batchnorm": "hfp8.ptq.report",
    "QuantReport": "hfp8.ptq.report",
    "select_exponent_bias": "hfp8.numerics.bias_selection",
    "HistogramObserver": "hfp8.calibration.observers",
    "decode": "hfp8.numerics.codes",
    "encode": "hfp8.numerics.codes",
    "QuantConfig": "hfp8.ptq.config",
    "ExportError": "hfp8.export",
    "export_onnx": "hfp8.export.onnx_export",
    "fake_quantize": "hfp8.numerics.fake_quant",
    "fake_quantize_per_channel": "hfp8.numerics.fake_quant",
    "E4M3": "hfp8.numerics.formats",
    "E5M2": "hfp8.numerics.formats",
    "FloatFormat": "hfp8.numerics.formats",
    "format_manifest": "hfp8.ptq.manifest",
    "manifest": "hfp8.ptq.report",
    "QuantizedFileError": "hfp8.ptq.saving",
    "load_quantized": "hfp8.ptq.saving",
    "read_manifest": "hfp8.ptq.saving",
    "save_quantized": "hfp8.ptq.saving",
    "quantize_model": "hfp8.ptq.pipeline",
    "verify_onnx": "hfp8.export.verify",
    "compare_outputs": "hfp8.ptq.evaluation",
    "perplexity": "hfp8.ptq.evaluation",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hfp8' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from hfp8.calibration.observers import HistogramObserver  # noqa: F401
    from hfp8.export import ExportError  # noqa: F401
    from hfp8.export.onnx_export import export_onnx  # noqa: F401
    from hfp8.export.verify import verify_onnx  # noqa: F401
    from hfp8.numerics.bias_selection import select_exponent_bias  # noqa: F401
    from hfp8.numerics.codes import decode, encode  # noqa: F401
    from hfp8.numerics.fake_quant import fake_quantize, fake_quantize_per_channel  # noqa: F401
    from hfp8.numerics.formats import E4M3, E5M2, FloatFormat  # noqa: F401
    from hfp8.ptq.config import QuantConfig  # noqa: F401
    from hfp8.ptq.evaluation import compare_outputs, perplexity  # noqa: F401
    from hfp8.ptq.manifest import format_manifest  # noqa: F401
    from hfp8.ptq.pipeline import quantize_model  # noqa: F401
    from hfp8.ptq.report import QuantReport, manifest, recalibrate_batchnorm  # noqa: F401
    from hfp8.ptq.saving import (  # noqa: F401
        QuantizedFileError,
        load_quantized,
        read_manifest,
        save_quantized,
    )
