"""Pieces of an exported ONNX file, run on their own in onnxruntime.

* :func:`pair_model`: one quantization point's nodes (clamp, QuantizeLinear, DequantizeLinear),
  with their scales and zero points as stored in the file;
* :func:`layer_model`: every node exported under one module's scope (its input's Q/DQ pair, the
  weight's DequantizeLinear, padding, the convolution or matmul, the bias; a recurrent layer's
  LSTM/GRU operator or unrolled steps), with one input and one output (or several), or ``None``
  when the layer's nodes do not form such a piece;
* :func:`session` and :func:`feed`: a default onnxruntime session (as users create them) and the
  mapping from a model's inputs to the session's named inputs.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper

from hfp8.export.onnx_graph import node_scopes, site_nodes
from hfp8.export.onnx_ops import PAIR_ROLES

__all__ = ["pair_model", "layer_model", "session", "feed", "run"]


def _sub_model(model: onnx.ModelProto, nodes: list, name: str,
               outputs_from: list | None = None, many: bool = False) -> onnx.ModelProto | None:
    """``nodes`` as a model with one input and one output (``many``: one or more), or None;
    the outputs are the values of ``outputs_from`` (default: all nodes) that the rest of the
    graph reads."""
    graph = model.graph
    sources = {id(node) for node in (nodes if outputs_from is None else outputs_from)}
    produced = {output for node in nodes for output in node.output}
    consumed = [value for node in nodes for value in node.input if value]
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    extra = [constants[v] for v in dict.fromkeys(consumed) if v in constants and v not in produced]
    nodes = extra + list(nodes)
    produced |= {n.output[0] for n in extra}
    inputs = [v for v in dict.fromkeys(consumed) if v not in produced and v not in initializers]
    shapes = []
    if many and len(inputs) > 1:  # e.g. h_0's batch size, read from the model input's shape
        shapes = _shape_arithmetic(graph, inputs[1:])
        if shapes is None:
            return None
        nodes = shapes + nodes
        inputs = inputs[:1] + [v.name for v in graph.input if v.name != inputs[0]
                               and any(v.name in n.input for n in shapes)]
        consumed = [value for node in nodes for value in node.input if value]
    inside = {id(node) for node in nodes}
    readers_outside = {value for node in graph.node if id(node) not in inside for value in node.input}
    readers_outside |= {output.name for output in graph.output}
    outputs = [v for node in nodes if id(node) in sources for v in node.output
               if v in readers_outside]
    if (len(inputs) != 1 and not shapes) or not outputs or (len(outputs) > 1 and not many):
        return None
    graph_inputs = {v.name: v for v in graph.input}
    sub = helper.make_graph(
        [copy.deepcopy(n) for n in nodes], name,
        [helper.make_tensor_value_info(inputs[0], onnx.TensorProto.FLOAT, None),
         *(copy.deepcopy(graph_inputs[v]) for v in inputs[1:])],
        [helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in outputs],
        initializer=[copy.deepcopy(initializers[v]) for v in dict.fromkeys(consumed)
                     if v in initializers])
    piece = helper.make_model(sub, opset_imports=model.opset_import)
    piece.ir_version = model.ir_version
    return piece


_SHAPE_OPS = {"Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Cast",
              "Constant", "Identity", "Add", "Sub", "Mul", "Div"}


def _shape_arithmetic(graph, values: list[str]) -> list | None:
    """The nodes computing ``values`` from the shapes of graph inputs only (as a recurrent
    layer's initial state reads the batch size off the model input), in graph order; None if
    any of them depends on more than shapes."""
    every = list(graph.node)
    made_by = {o: index for index, n in enumerate(every) for o in n.output}
    graph_inputs = {v.name for v in graph.input}
    initializers = {t.name for t in graph.initializer}
    chosen, todo = set(), list(values)
    while todo:
        value = todo.pop()
        index = made_by.get(value)
        if value in initializers or index in chosen:
            continue
        if index is None or every[index].op_type not in _SHAPE_OPS:
            return None
        chosen.add(index)
        node = every[index]
        if node.op_type == "Shape":
            if node.input[0] not in graph_inputs:
                return None
            continue
        todo.extend(v for v in node.input if v)
    return [every[index] for index in sorted(chosen)]


def pair_model(model: onnx.ModelProto, site: str) -> onnx.ModelProto | None:
    """The clamp (if any), QuantizeLinear and DequantizeLinear of ``site`` as a model."""
    roles = site_nodes(model).get(site, {})
    order = [roles[r] for r in PAIR_ROLES if r in roles]
    if "quantize" not in roles or "dequantize" not in roles:
        return None
    return _sub_model(model, order, f"{site}_qdq")


def layer_model(model: onnx.ModelProto, layer: str, many: bool = False) -> onnx.ModelProto | None:
    """Every node exported under module ``layer``'s scope, if they form a one-input,
    one-output piece (``many``: one or more outputs, as a recurrent layer's sequence and final
    states)."""
    every = list(model.graph.node)  # one wrapper per node: identities below stay valid
    nodes = [node for node in every if layer in node_scopes(node)]
    if many and nodes:  # nodes the exporter left unscoped (Split of a chunk) that read only these
        produced = {o for node in nodes for o in node.output}
        known = produced | {t.name for t in model.graph.initializer}
        chosen = {id(node) for node in nodes}
        for node in every:
            if id(node) not in chosen and not node_scopes(node) and node.input and \
                    all(v in known for v in node.input if v) and any(v in produced for v in node.input):
                chosen.add(id(node))
                produced.update(node.output)
                known.update(node.output)
        nodes = [node for node in every if id(node) in chosen]
    inside = {id(node) for node in nodes}
    pair = site_nodes(model).get(layer, {})  # its input pair, also when shared with another
    pair = [pair[r] for r in PAIR_ROLES if r in pair]
    in_pair = {id(node) for node in pair}
    extra = [node for node in pair if id(node) not in inside]
    own = [node for node in nodes if id(node) not in in_pair]  # the layer's output comes from these
    return _sub_model(model, extra + nodes, layer, outputs_from=own, many=many) if nodes else None


def session(model_or_path, providers=("CPUExecutionProvider",)) -> onnxruntime.InferenceSession:
    """A session with onnxruntime's default options (graph optimizations on, as users run it)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # idle worker threads sleep instead of spinning: verification alternates onnxruntime runs
    # with PyTorch work in the same process, and spinning threads take its cores (the values
    # computed are the same; benchmarks/export_time.py: verification 1.8x faster on MobileNetV2,
    # 3.6x on the 10M decoder)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
        try:  # onnxruntime takes UTF-8 paths only; a name with other bytes is read here
            source.encode("utf-8")
        except UnicodeEncodeError:
            with open(model_or_path, "rb") as stream:
                source = stream.read()
    return onnxruntime.InferenceSession(source, options, providers=list(providers))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def feed(ort_session, model, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """Session inputs from a call's ``args``/``kwargs``: by argument name where the graph input
    has one (torch's exporter names inputs after ``forward``'s parameters), else in order."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    given = {names[i] if i < len(names) else f"arg{i}": a for i, a in enumerate(args)}
    given.update(kwargs)
    tensors = {key: value for key, value in given.items() if torch.is_tensor(value)}
    wanted = [i.name for i in ort_session.get_inputs()]
    result, unnamed = {}, [v for k, v in tensors.items() if k not in wanted]
    for name in wanted:
        if name in tensors:
            result[name] = _numpy(tensors[name])
        elif unnamed:
            result[name] = _numpy(unnamed.pop(0))
        else:
            raise ValueError(f"the ONNX model wants input {name!r}, which the batch does not give")
    return result


def run(ort_session, inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(out)) for out in ort_session.run(None, inputs)]
