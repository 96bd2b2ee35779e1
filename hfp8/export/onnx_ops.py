"""The ONNX side of the FP8 operators: the export-only weight operator and the translation of
both operators into ``QuantizeLinear``/``DequantizeLinear`` nodes.

* ``hfp8::quantize_dequantize`` (defined in :mod:`hfp8.numerics.ops`) is exported as
  ``QuantizeLinear -> DequantizeLinear`` with its power-of-two scale and an FP8 zero point (plus
  a clamp to +-240 s before it for the "ieee" E4M3 layout, whose grid stops below
  FLOAT8E4M3FN's 448).
* ``hfp8::dequantize_weight(codes, scale, axis, site)``: FP8 weight codes (a ``torch.float8_*``
  tensor) times a power-of-two scale (one, or one per slice along ``axis``). Exported as a
  ``DequantizeLinear`` reading the FLOAT8 initializer: one byte per weight in the file.

Format ``fmt`` at bias ``b`` is the ONNX FP8 type times ``2^(b_default - b)`` (docs/formats.md),
so the exported nodes compute the same numbers as eager PyTorch, bit for bit. ``site`` names the
quantization point; the translation tags the ONNX nodes with it (node metadata ``hfp8.site``) so
that verification can find each pair in the file.
"""
from __future__ import annotations

import numpy as np
import torch

import hfp8.numerics.ops  # noqa: F401  (registers hfp8::quantize_dequantize, translated below)
from hfp8.numerics.formats import E4M3, E5M2, FloatFormat

PAIR_ROLES = ("clip_low_test", "clip_low", "clip_high_test", "clip_high", "quantize",
              "dequantize")  # the nodes of one input quantization point, in order

__all__ = ["PAIR_ROLES", "dequantize_weight", "torch_fp8_dtype", "exportable_base",
           "onnx_translation_table", "SITE_KEY", "UnsupportedFormatError"]

SITE_KEY = "hfp8.site"  # ONNX node metadata: which quantization point a node belongs to


class UnsupportedFormatError(ValueError):
    """The format has no exact FP8 type in torch/ONNX (for example the "none" layout)."""


def exportable_base(fmt: FloatFormat) -> FloatFormat:
    """The FP8 type (at its own bias) whose grid times ``2^k`` holds ``fmt``'s grid."""
    layout = (fmt.exponent_bits, fmt.mantissa_bits, fmt.specials)
    if layout in ((4, 3, "fn"), (4, 3, "ieee")):
        return E4M3
    if layout == (5, 2, "ieee"):
        return E5M2
    hint = (" Its 'none' layout reaches 480, beyond FLOAT8E4M3FN's 448: use specials='fn'."
            if layout == (4, 3, "none") else "")
    raise UnsupportedFormatError(f"{fmt} has no exact FP8 type; export supports E4M3 ('fn' or "
                                 f"'ieee') and E5M2 ('ieee').{hint}")


def torch_fp8_dtype(fmt: FloatFormat) -> torch.dtype:
    return torch.float8_e4m3fn if exportable_base(fmt) is E4M3 else torch.float8_e5m2


@torch.library.custom_op("hfp8::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, axis: int, site: str) -> torch.Tensor:
    """``codes`` (a torch float8 tensor) times ``scale`` (0-d, or 1-D along ``axis``), float32."""
    values = codes.to(torch.float32)
    if scale.dim() == 0:
        return values * scale
    shape = [1] * codes.dim()
    shape[axis] = -1
    return values * scale.reshape(shape)


@dequantize_weight.register_fake
def _(codes, scale, axis, site):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


# -- ONNX translation (used by torch.onnx.export(..., custom_translation_table=...)) ----------
def _fp8_zero(fmt: FloatFormat):
    import ml_dtypes
    import onnx_ir as ir
    from onnxscript import opset19 as op

    dtype = ml_dtypes.float8_e4m3fn if exportable_base(fmt) is E4M3 else ml_dtypes.float8_e5m2
    return op.Constant(value=ir.tensor(np.zeros((), dtype=dtype)))


def _tag(value, site: str, role: str):
    node = value.producer()
    node.metadata_props[SITE_KEY] = site
    node.metadata_props["hfp8.role"] = role
    return value


def _translate_quantize_dequantize(x, scale, exponent_bits, mantissa_bits, specials, site):
    import onnx_ir as ir
    from onnxscript import opset19 as op

    fmt = FloatFormat(exponent_bits, mantissa_bits, None, specials)
    zero = _fp8_zero(fmt)
    if specials == "ieee" and exponent_bits == 4:
        # "ieee" E4M3 saturates at 240 s, FLOAT8E4M3FN at 448 s: clamp first. As Where, not
        # Clip or Max/Min: onnxruntime's Clip->QuantizeLinear fusion assumes integer zero
        # points, and onnxscript's rewriter merges Max/Min/Clip with a Relu before them (the
        # clamp would then leave this pair). Where also keeps NaN as NaN.
        limit = op.Mul(scale, op.Constant(value=ir.tensor(np.array(fmt.max_finite, np.float32))))
        below = _tag(op.Less(x, op.Neg(limit)), site, "clip_low_test")
        low = _tag(op.Where(below, op.Neg(limit), x), site, "clip_low")
        above = _tag(op.Greater(low, limit), site, "clip_high_test")
        x = _tag(op.Where(above, limit, low), site, "clip_high")
    quantized = _tag(op.QuantizeLinear(x, scale, zero), site, "quantize")
    return _tag(op.DequantizeLinear(quantized, scale, zero), site, "dequantize")


def _translate_dequantize_weight(codes, scale, axis, site):
    from onnxscript import opset19 as op

    attributes = {"axis": axis} if len(scale.shape or ()) == 1 else {}
    return _tag(op.DequantizeLinear(codes, scale, **attributes), site, "weight")


def onnx_translation_table() -> dict:
    """Custom-op -> ONNX translation, for ``torch.onnx.export(custom_translation_table=...)``."""
    return {torch.ops.hfp8.quantize_dequantize.default: _translate_quantize_dequantize,
            torch.ops.hfp8.dequantize_weight.default: _translate_dequantize_weight}
