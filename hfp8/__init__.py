"""hfp8-ptq: post-training quantization of PyTorch models to Hybrid 8-bit Floating Point."""

from hfp8.calibration.bias_selection import select_exponent_bias
from hfp8.ptq.codes import decode, encode
from hfp8.ptq.fake_quant import fake_quantize, fake_quantize_per_channel
from hfp8.ptq.formats import E4M3, E5M2, FloatFormat

__version__ = "0.1.0"

__all__ = [
    "E4M3",
    "E5M2",
    "FloatFormat",
    "decode",
    "encode",
    "fake_quantize",
    "fake_quantize_per_channel",
    "select_exponent_bias",
    "__version__",
]
