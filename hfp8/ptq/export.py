"""export_onnx: a quantized model as a standard FP8 QuantizeLinear/DequantizeLinear ONNX graph.

Format ``fmt`` at exponent bias ``b`` is exactly the ONNX FP8 type times a power of two:
E4M3 at bias ``b`` = FLOAT8E4M3FN * 2^(7 - b), E5M2 ("ieee") at bias ``b`` = FLOAT8E5M2 *
2^(15 - b). So each quantized layer becomes

    x -> [Clip +-240 s, "ieee" E4M3 only] -> QuantizeLinear(s, 0) -> DequantizeLinear(s, 0) --+
    weight codes (FLOAT8 initializer) -> DequantizeLinear(s_w per tensor or per axis 0) ------+-> Conv/Gemm

with ``s = 2^(7 - input bias)``: the same numbers as the PyTorch model, bit for bit (verify with
:func:`hfp8.verify_onnx`). Float layers, BatchNorm (as BatchNormalization, never folded into
quantized weights) and the rest of the graph stay float32. The graph comes from torch.fx
tracing; operations outside the supported table are refused by name.
"""

from __future__ import annotations

import copy
import json
import os

import onnx
import torch
import torch.fx
from onnx import TensorProto, helper
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from hfp8._files import atomic_write
from hfp8.ptq.codes import decode, encode
from hfp8.ptq.formats import E4M3, E5M2, FloatFormat
from hfp8.ptq.layers import QUANTIZED_TYPES, _QuantizedLayer
from hfp8.ptq.onnx_ops import (
    FUNCTION_TRANSLATORS,
    METHOD_TRANSLATORS,
    MODULE_TRANSLATORS,
    ExportError,
    GraphBuilder,
    conv_attributes,
)

__all__ = ["export_onnx", "ExportError", "onnx_type", "DEFAULT_OPSET", "MANIFEST_KEY"]

DEFAULT_OPSET = 19  # the first opset with FLOAT8 QuantizeLinear/DequantizeLinear
MAX_OPSET = 21
MANIFEST_KEY = "hfp8_ptq_manifest"


def onnx_type(fmt: FloatFormat) -> tuple[int, FloatFormat]:
    """(ONNX FLOAT8 type, the format at that type's bias) for an exportable format."""
    layout = (fmt.exponent_bits, fmt.mantissa_bits, fmt.specials)
    if layout in ((4, 3, "fn"), (4, 3, "ieee")):
        return TensorProto.FLOAT8E4M3FN, E4M3
    if layout == (5, 2, "ieee"):
        return TensorProto.FLOAT8E5M2, E5M2
    hint = (" Its 'none' layout reaches 480, beyond FLOAT8E4M3FN's 448: use specials='fn'."
            if layout == (4, 3, "none") else "")
    raise ExportError(f"{fmt} has no exact ONNX FP8 type; export supports E4M3 ('fn' or 'ieee') "
                      f"and E5M2 ('ieee').{hint}")


def _scale(fmt: FloatFormat, exponent_bias: torch.Tensor) -> torch.Tensor:
    """``2^(base_bias - b)``: the QuantizeLinear scale of ``fmt`` at bias ``b`` (float32)."""
    _, base = onnx_type(fmt)
    return torch.ldexp(torch.ones(()), (base.exponent_bias - exponent_bias).double()).float()


def _zero_point(builder: GraphBuilder, name: str, data_type: int, count: int | None) -> str:
    dims = [] if count is None else [count]
    return builder.raw_constant(name, data_type, dims, bytes(count or 1))


def _quantized_input(builder, layer, name, x) -> str:
    fmt = layer.input_format.with_bias(int(layer.input_exponent_bias))
    data_type, _ = onnx_type(fmt)
    scale = _scale(fmt, layer.input_exponent_bias.cpu())
    builder.rewrite_clamp_as_max_min(x)
    if fmt.specials == "ieee" and fmt.exponent_bits == 4:
        # FLOAT8E4M3FN saturates at 448 s, "ieee" E4M3 at 240 s: clamp first (Max/Min, not
        # Clip, for the onnxruntime reason given in GraphBuilder.rewrite_clamp_as_max_min).
        low = builder.node("Max", [x, builder.constant(f"{name}.input_clip.min", -fmt.max_finite)],
                           f"{name}.input_clip_low")
        x = builder.node("Min", [low, builder.constant(f"{name}.input_clip.max", fmt.max_finite)],
                         f"{name}.input_clip")
    scale_name = builder.constant(f"{name}.input_scale", scale)
    zero = _zero_point(builder, f"{name}.input_zero_point", data_type, None)
    q = builder.node("QuantizeLinear", [x, scale_name, zero], f"{name}.input_quantize")
    return builder.node("DequantizeLinear", [q, scale_name, zero], f"{name}.input_dequantize")


def _quantized_weight(builder, layer, name) -> str:
    weight = layer.weight.detach().float().cpu()
    fmt = layer.weight_format
    data_type, base = onnx_type(fmt)
    scale = _scale(fmt, layer.weight_exponent_bias.cpu())
    per_channel = scale.dim() == 1
    broadcast = scale.reshape(-1, *([1] * (weight.dim() - 1))) if per_channel else scale
    codes = encode(weight / broadcast, base)  # exact: dividing by a power of two
    if not torch.equal(decode(codes, base) * broadcast, weight):
        raise ExportError(f"weights of {name!r} are not on the {fmt.name} grid; was the model "
                          "modified after quantize_model?")
    stored = builder.raw_constant(f"{name}.weight_fp8", data_type, weight.shape,
                                  codes.numpy().tobytes())
    scale_name = builder.constant(f"{name}.weight_scale", scale)
    zero = _zero_point(builder, f"{name}.weight_zero_point", data_type,
                       scale.numel() if per_channel else None)
    attributes = {"axis": 0} if per_channel else {}
    return builder.node("DequantizeLinear", [stored, scale_name, zero],
                        f"{name}.weight_dequantize", **attributes)


def _weighted_layer(builder, layer, name, x, rank) -> str:
    """Conv or Linear, float or quantized."""
    quantized = isinstance(layer, _QuantizedLayer)
    if quantized and layer.input_format is not None:
        x = _quantized_input(builder, layer, name, x)
    if quantized and layer.weight_format is not None:
        weight = _quantized_weight(builder, layer, name)
    else:
        weight = builder.constant(f"{name}.weight", layer.weight.float())
    inputs = [x, weight]
    if layer.bias is not None:
        inputs.append(builder.constant(f"{name}.bias", layer.bias.float()))
    if isinstance(layer, nn.Linear):
        if rank == 2:
            return builder.node("Gemm", inputs, name, transB=1)
        transposed = builder.node("Transpose", [weight], f"{name}.weight_t", perm=[1, 0])
        product = builder.node("MatMul", [x, transposed], f"{name}.matmul")
        return builder.node("Add", [product, inputs[2]], name) if len(inputs) == 3 else product
    return builder.node("Conv", inputs, name, **conv_attributes(layer, rank - 2))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, tuple(QUANTIZED_TYPES.values())) or \
            super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # torch.fx raises many types for untraceable code
        raise ExportError(f"torch.fx cannot trace this model ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); export needs a "
                          "forward without data-dependent control flow") from None
    module = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(module).propagate(example)
    return module


def _rank(node) -> int:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ExportError(f"operation {node} does not produce a single tensor; not exported")
    return len(meta.shape)


def _convert(graph_module: torch.fx.GraphModule, builder: GraphBuilder) -> tuple[list, list]:
    values, outputs, inputs = {}, [], []

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if inputs:
                raise ExportError("export supports models with one input tensor")
            values[node] = "input"
            inputs.append(node)
        elif node.op == "get_attr":
            values[node] = builder.constant(node.target, getattr(graph_module, node.target))
        elif node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            x, rank = values[node.args[0]], _rank(node.args[0])
            if type(module) in QUANTIZED_TYPES or isinstance(module, _QuantizedLayer):
                values[node] = _weighted_layer(builder, module, node.target, x, rank)
            elif type(module) in MODULE_TRANSLATORS:
                values[node] = MODULE_TRANSLATORS[type(module)](
                    builder, module, node.target, [x], [rank])
            else:
                raise ExportError(f"module {node.target!r} of type {type(module).__name__} is "
                                  "not supported by the ONNX export")
        elif node.op in ("call_function", "call_method"):
            table = FUNCTION_TRANSLATORS if node.op == "call_function" else METHOD_TRANSLATORS
            if node.target not in table:
                label = getattr(node.target, "__name__", node.target)
                raise ExportError(f"operation {label!r} (at {node.name}) is not supported by the "
                                  "ONNX export")
            ranks = [_rank(a) if isinstance(a, torch.fx.Node) else 0 for a in node.args]
            values[node] = table[node.target](builder, node.name, arg(node.args),
                                              arg(dict(node.kwargs)), ranks)
        elif node.op == "output":
            result = node.args[0]
            for item in result if isinstance(result, (tuple, list)) else [result]:
                outputs.append((values[item], item))
    return inputs, outputs


def _value_info(name: str, node, dynamic_batch: bool):
    shape = list(node.meta["tensor_meta"].shape)
    if dynamic_batch and shape:
        shape[0] = "batch"
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                opset: int | None = None, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Write ``qmodel`` (from :func:`hfp8.quantize_model`, or any float model) as ONNX to ``path``.

    ``example_input``: one float32 input batch (traced for shapes). ``opset``: 19 (default) to
    21. ``dynamic_batch``: the first dimension of input and outputs is named "batch". The file is
    checked with ``onnx.checker.check_model(full_check=True)`` and written atomically; the same
    model always gives the same bytes. Returns the ONNX model.
    """
    from hfp8 import __version__
    from hfp8.ptq.manifest import manifest

    opset = DEFAULT_OPSET if opset is None else opset
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in {DEFAULT_OPSET}..{MAX_OPSET} (FP8 Q/DQ needs 19+), got {opset}")
    if not torch.is_tensor(example_input) or example_input.dtype != torch.float32:
        raise ExportError("example_input must be one float32 tensor (a batch of model inputs)")
    model = copy.deepcopy(qmodel).eval()
    for layer in model.modules():
        if isinstance(layer, _QuantizedLayer):
            for fmt in (layer.weight_format, layer.input_format):
                if fmt is not None:
                    onnx_type(fmt)  # refuses formats ONNX cannot hold, before any work
    example = example_input.detach().cpu()
    graph_module = _trace(model.cpu(), example)
    builder = GraphBuilder()
    inputs, outputs = _convert(graph_module, builder)
    graph = helper.make_graph(
        builder.nodes, "hfp8_ptq",
        [_value_info("input", inputs[0], dynamic_batch)],
        [_value_info(name, node, dynamic_batch) for name, node in outputs],
        initializer=builder.initializers)
    onnx_model = helper.make_model(graph, producer_name="hfp8-ptq", producer_version=__version__,
                                   opset_imports=[helper.make_opsetid("", opset)])
    onnx_model.ir_version = 9  # opset 19's IR; readable by older runtimes than onnx's default
    try:
        data = manifest(qmodel)
    except ValueError:
        data = None  # a plain float model
    if data is not None:
        helper.set_model_props(onnx_model, {MANIFEST_KEY: json.dumps(data, sort_keys=True)})
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph fails onnx.checker: {str(error).splitlines()[0]}") from None
    serialized = onnx_model.SerializeToString(deterministic=True)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(serialized)

    atomic_write(path, write)
    return onnx_model
