"""The exported graph's form for onnxruntime's default QDQ transforms: the same function, written
so that no transform made for integer QDQ can mis-compute it with FP8 Q/DQ pairs.

A default onnxruntime session rewrites QDQ graphs on the assumption that the quantized type
is an 8-bit integer; on signed FP8 some of those rewrites change the numbers. Each edit here
takes one such transform's pattern away (README, "onnxruntime's QDQ transforms and signed
FP8", lists every transform we read, with its source file):

* :func:`clamps_as_max_min`: Relu and Clip upstream of a QuantizeLinear as Max/Min
  (``ReluQuantRewrite``/``ClipQuantRewrite`` after ``QDQPropagationTransformer``);
* :func:`bias_as_add`: biases added after the layer (``WeightBiasQuantization``);
* :func:`outputs_as_copies`: graph outputs read upstream of a pair get a producer of their own
  (``QDQPropagationTransformer`` inserting a pair that computes a graph output).

Every edit keeps what each graph output computes: a rewritten node keeps its output name, and
graph inputs and outputs keep their names and values. ``tests/export/test_onnx_graph.py`` shows
each edit necessary and sufficient; ``tests/export/test_onnx_fuzz.py`` runs random graphs in a
default session, without optimizations and in PyTorch, bit for bit.
"""

from __future__ import annotations

import onnx
from onnx import helper

from hfp8.export.onnx_graph import SCOPE_KEY, _props, consumers, producers
from hfp8.export.onnx_ops import SITE_KEY

__all__ = ["clamps_as_max_min", "bias_as_add", "outputs_as_copies"]


def _reaches_quantization(graph) -> set[str]:
    """Names of the values from which one of our QuantizeLinear nodes can be reached."""
    made_by = producers(graph)
    todo = [node.input[0] for node in graph.node
            if node.op_type == "QuantizeLinear" and SITE_KEY in _props(node)]
    seen: set[str] = set()
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        node = made_by.get(value)
        if node is not None:
            todo.extend(v for v in node.input if v)
    return seen


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {info.name: info.type.tensor_type.elem_type
            for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}


def _zero(graph, element_type: int) -> str:
    """An initializer holding a scalar 0 of ``element_type`` (added once)."""
    name = f"hfp8.zero.{onnx.TensorProto.DataType.Name(element_type).lower()}"
    if name not in {t.name for t in graph.initializer}:
        graph.initializer.append(helper.make_tensor(name, element_type, [], [0]))
    return name


def clamps_as_max_min(model: onnx.ModelProto) -> int:
    """Writes every Relu and Clip upstream of one of our QuantizeLinear nodes as ``Max`` (and
    ``Min``): the same values, ``relu(x) = max(x, 0)`` and ``clip(x, a, b) = min(max(x, a), b)``.
    Returns how many nodes were rewritten.

    Why: onnxruntime fuses a Relu or Clip *into* a following QuantizeLinear (level-2 rules
    ``ReluQuantRewrite`` and ``ClipQuantRewrite``), reasoning that the quantized type clamps
    the same values. That holds for uint8 (and int8 at zero point -128), never for signed FP8:
    the Relu is deleted and negative values survive, or (Clip) session creation fails on the
    FP8 zero point. A Relu need not sit next to the QuantizeLinear in the file: level-1
    ``QDQPropagationTransformer`` copies the pair up through MaxPool, Reshape, Transpose,
    Squeeze, Unsqueeze and Slice, and identity eliminations remove others, so any Relu from
    which a QuantizeLinear can be reached is at risk, whatever lies between. No rule fuses Max
    or Min (and ``WeightBiasQuantization`` follows only Relu and Clip), so this form is safe in
    any runtime. Each node keeps its output name: graph outputs compute what they did."""
    graph = model.graph
    upstream = _reaches_quantization(graph)
    types = _element_types(model)
    rewritten = 0
    for node in list(graph.node):
        if node.op_type not in ("Relu", "Clip") or node.domain not in ("", "ai.onnx") \
                or node.output[0] not in upstream:
            continue
        if node.op_type == "Relu":
            zero = _zero(graph, types.get(node.input[0], onnx.TensorProto.FLOAT))
            replacement = [helper.make_node("Max", [node.input[0], zero], [node.output[0]],
                                            name=f"{_name(node)}.max")]
        else:
            bounds = [b for b in zip(("Max", "Min"), list(node.input[1:]) + ["", ""]) if b[1]]
            if not bounds:
                continue  # a Clip without bounds is an identity; no rule fuses it into Q
            current, replacement = node.input[0], []
            for op_type, bound in bounds:
                output = f"{node.output[0]}.{op_type.lower()}"
                replacement.append(helper.make_node(op_type, [current, bound], [output],
                                                    name=f"{_name(node)}.{op_type.lower()}"))
                current = output
            replacement[-1].output[0] = node.output[0]
        for new in replacement:
            new.metadata_props.extend(p for p in node.metadata_props if p.key == SCOPE_KEY)
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        rewritten += 1
    return rewritten


def _per_channel(graph, node, bias: str, rank: int) -> str:
    """``bias`` (length C) shaped ``(C, 1, ..., 1)`` for a layer output of ``rank`` dims: a
    reshaped copy of the initializer, or a Reshape node in the layer's scope."""
    initializers = {t.name: t for t in graph.initializer}
    shaped = f"{bias}.per_channel"
    if bias in initializers:
        if shaped not in initializers:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(initializers[bias])
            copy_.name = shaped
            copy_.dims[:] = [copy_.dims[0] if copy_.dims else 1] + [1] * (rank - 2)
            graph.initializer.append(copy_)
        return shaped
    shape = f"{shaped}.shape"
    if shape not in initializers:
        graph.initializer.append(helper.make_tensor(shape, onnx.TensorProto.INT64, [rank - 1],
                                                    [-1] + [1] * (rank - 2)))
    reshaped = f"{node.output[0]}.bias"
    reshape = helper.make_node("Reshape", [bias, shape], [reshaped], name=f"{_name(node)}.bias_shape")
    reshape.metadata_props.extend(p for p in node.metadata_props if p.key == SCOPE_KEY)
    graph.node.insert(list(graph.node).index(node), reshape)
    return reshaped


def _name(node) -> str:
    return node.name or node.output[0]


def _drop_unused_initializers(graph, names: set[str]) -> None:
    used = {v for node in graph.node for v in node.input} | {o.name for o in graph.output}
    used |= {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in used or t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def outputs_as_copies(model: onnx.ModelProto) -> int:
    """Gives every graph output that is also read by nodes upstream of one of our
    QuantizeLinear nodes a producer of its own: the computing node writes ``{name}.value``,
    which the readers take, and a one-input ``Max`` (an identity, NaN included) copies it to
    the graph output. Returns how many outputs were so given.

    Why: level-1 ``QDQPropagationTransformer`` moves a QuantizeLinear up through Transpose,
    Reshape, MaxPool... to the edge leaving the value's producer when that value has one
    reader, without regard to the value being a graph output; the pair it inserts then
    computes the graph output, which a default session returns rounded to FP8 (found by the
    differential fuzz: a feature map returned and transposed into a quantized layer). With
    two readers (the copy and the rest) no propagation reaches the value, and no rule removes
    a Max. The graph output keeps its name and its values."""
    graph = model.graph
    upstream = _reaches_quantization(graph)
    made_by = producers(graph)
    rewritten = 0
    for output in graph.output:
        name = output.name
        node = made_by.get(name)
        if node is None or name not in upstream or not consumers(graph, name):
            continue
        value = f"{name}.value"
        for reader in consumers(graph, name):
            reader.input[:] = [value if v == name else v for v in reader.input]
        node.output[:] = [value if v == name else v for v in node.output]
        copy_ = helper.make_node("Max", [value], [name], name=f"{name}.output")
        graph.node.insert(list(graph.node).index(node) + 1, copy_)
        rewritten += 1
    return rewritten


def bias_as_add(model: onnx.ModelProto) -> int:
    """Takes the bias out of every Conv, ConvTranspose and Gemm that reads a DequantizeLinear
    result (input or weight) and adds it after: ``conv(x, w) + b``, the same sum in another
    order (within the summation bound verification allows). Returns how many were rewritten.

    Why: onnxruntime's level-1 ``WeightBiasQuantization`` finds such a layer when its input
    comes from a DequantizeLinear and its output leads (through Relu/Clip only) to a
    QuantizeLinear, and rounds its bias to int32 multiples of ``s_input * s_weight`` (and a
    float32 weight to int8): right for integer QDQ, where the accumulator is int32, a change of
    the model for FP8 (by up to half that step; after a coarse input scale, whole units). With
    the bias in an Add the layer's output no longer leads to a QuantizeLinear (a float weight
    behind a quantized input with no bias gets a zero bias for the same reason). The bias is the
    Add's *first* operand: level-1 ``ConvAddFusion`` folds ``Add(conv, constant)`` back into the
    Conv when the weight is an initializer (a float weight behind a quantized input), and it
    reads the constant from the second operand only. The Add takes the layer's output name:
    graph outputs compute what they did."""
    graph = model.graph
    made_by = producers(graph)
    initializers = {t.name: t for t in graph.initializer}

    def dequantized(value: str) -> bool:
        return getattr(made_by.get(value), "op_type", None) == "DequantizeLinear"

    rewritten, replaced = 0, set()
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ("", "ai.onnx") \
                or not (dequantized(node.input[0]) or dequantized(node.input[1])):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attributes.get("beta", 1.0) != 1.0:
            continue  # torch writes beta = 1; anything else keeps its form
        weight = initializers.get(node.input[1])
        if weight is None and dequantized(node.input[1]):
            weight = initializers.get(made_by[node.input[1]].input[0])  # the FP8 codes
        if weight is None:
            continue  # a computed weight: no shape to read, and no weight rule matches it
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias:
            bias = node.input[2]
            replaced.add(bias)
        elif node.input[1] in initializers and dequantized(node.input[0]):
            # a float weight behind a quantized input and no bias: WeightBiasQuantization
            # would round the weight to int8; a zero bias per channel keeps the Add in place
            # (NoopElimination removes only an Add of a zero that cannot broadcast)
            channels = _output_channels(node, weight, attributes)
            bias = f"{node.input[1]}.zero_bias"
            if bias not in initializers:
                graph.initializer.append(helper.make_tensor(bias, weight.data_type, [channels],
                                                            [0] * channels))
                initializers[bias] = graph.initializer[-1]
        else:
            continue
        if node.op_type != "Gemm":  # per channel: shape (C, 1, ..., 1) against (N, C, ...)
            bias = _per_channel(graph, node, bias, len(weight.dims))
        output = node.output[0]
        node.output[0] = f"{output}.without_bias"
        del node.input[2:]
        # bias first: ConvAddFusion looks for the constant in the Add's second input
        add = helper.make_node("Add", [bias, node.output[0]], [output], name=f"{_name(node)}.bias")
        add.metadata_props.extend(p for p in node.metadata_props if p.key == SCOPE_KEY)
        graph.node.insert(list(graph.node).index(node) + 1, add)
        rewritten += 1
    _drop_unused_initializers(graph, replaced)
    return rewritten


def _output_channels(node, weight, attributes: dict) -> int:
    if node.op_type == "Conv":
        return weight.dims[0]
    if node.op_type == "ConvTranspose":
        return weight.dims[1] * attributes.get("group", 1)
    return weight.dims[0] if attributes.get("transB", 0) else weight.dims[1]
