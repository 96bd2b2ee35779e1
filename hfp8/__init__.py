"""hfp8-ptq: post-training quantization of PyTorch models to Hybrid 8-bit Floating Point."""

__version__ = "0.1.0"

from hfp8.calibration.batchnorm import recalibrate_batchnorm
from hfp8.calibration.bias_selection import select_exponent_bias
from hfp8.calibration.observers import HistogramObserver
from hfp8.ptq.codes import decode, encode
from hfp8.ptq.config import QuantConfig
from hfp8.ptq.export import ExportError, export_onnx
from hfp8.ptq.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.ptq.formats import E4M3, E5M2, FloatFormat
from hfp8.ptq.manifest import format_manifest, manifest
from hfp8.ptq.saving import (
    QuantizedFileError,
    load_quantized,
    read_manifest,
    save_quantized,
)
from hfp8.ptq.transform import quantize_model
from hfp8.ptq.verify import verify_onnx

__all__ = [
    "E4M3",
    "E5M2",
    "ExportError",
    "FloatFormat",
    "HistogramObserver",
    "QuantConfig",
    "QuantizedFileError",
    "decode",
    "encode",
    "export_onnx",
    "fake_quantize",
    "fake_quantize_per_channel",
    "format_manifest",
    "load_quantized",
    "manifest",
    "quantize_model",
    "read_manifest",
    "recalibrate_batchnorm",
    "save_quantized",
    "select_exponent_bias",
    "verify_onnx",
    "__version__",
]
