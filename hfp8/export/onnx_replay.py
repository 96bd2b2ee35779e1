"""Pieces of an exported ONNX file, run on their own in onnxruntime.

* :func:`pair_model`: one quantization point's nodes (clamp, QuantizeLinear, DequantizeLinear),
  with their scales and zero points as stored in the file;
* :func:`layer_model`: every node exported under one module's scope (its input's Q/DQ pair, the
  weight's DequantizeLinear, padding, the convolution or matmul, the bias; a recurrent layer's
  LSTM/GRU operator or unrolled steps), with one input and one output (or several), or ``None``
  when the layer's nodes do not form such a piece;
* :func:`session` and :func:`feed`: a default onnxruntime session (as users create them) and the
  mapping from a model's inputs to the session's named inputs;
* :class:`Pieces`: many such pieces side by side in one session (one build, one run for all).
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import compose, helper

from hfp8.export.onnx_graph import node_scopes, site_nodes
from hfp8.export.onnx_ops import PAIR_ROLES

__all__ = ["pair_model", "layer_model", "session", "feed", "run", "values_of", "value_types",
           "Pieces", "FileIndex"]


class FileIndex:
    """What cutting pieces out of ``model`` needs, computed once per file (every lookup below
    is then proportional to the piece, not to the file: cutting one piece per layer of a large
    model stays linear in the model): the nodes in graph order, each module scope's nodes,
    the tagged sites' nodes, initializers, Constant nodes, the readers of every value."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.every = list(graph.node)  # one wrapper per node: identities below stay valid
        self.scoped: dict[str, list] = {}
        self.unscoped = []
        for node in self.every:
            scopes = node_scopes(node)
            for scope in dict.fromkeys(scopes):
                self.scoped.setdefault(scope, []).append(node)
            if not scopes:
                self.unscoped.append(node)
        self.sites = site_nodes(model)
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n for n in self.every if n.op_type == "Constant"}
        self.readers: dict[str, list[int]] = {}
        for node in self.every:
            for value in node.input:
                self.readers.setdefault(value, []).append(id(node))
        self.graph_outputs = {output.name for output in graph.output}
        self.shape_values = _ShapeValues(graph)

    def read_outside(self, value: str, inside: set[int]) -> bool:
        """Whether a node not in ``inside`` (identities) or a graph output reads ``value``."""
        return value in self.graph_outputs or any(
            reader not in inside for reader in self.readers.get(value, ()))


def _sub_model(index: FileIndex, nodes: list, name: str,
               outputs_from: list | None = None, many: bool = False,
               types: dict | None = None) -> onnx.ModelProto | None:
    """``nodes`` as a model with one input and one output (``many``: one or more), or None;
    the outputs are the values of ``outputs_from`` (default: all nodes) that the rest of the
    graph reads."""
    model = index.model
    sources = {id(node) for node in (nodes if outputs_from is None else outputs_from)}
    produced = {output for node in nodes for output in node.output}
    consumed = [value for node in nodes for value in node.input if value]
    initializers, constants = index.initializers, index.constants
    extra = [constants[v] for v in dict.fromkeys(consumed) if v in constants and v not in produced]
    nodes = extra + list(nodes)
    produced |= {n.output[0] for n in extra}
    inputs = [v for v in dict.fromkeys(consumed) if v not in produced and v not in initializers]
    shape_valued = index.shape_values if many else None
    if many and not all(shape_valued(v) for v in inputs[1:]):
        return None  # more than sizes and constants (h_0 of another layer's batch size) come in
    inside = {id(node) for node in nodes}
    outputs = [v for node in nodes if id(node) in sources for v in node.output
               if v and index.read_outside(v, inside) and not (many and shape_valued(v))]
    if (len(inputs) != 1 and not many) or not outputs or (len(outputs) > 1 and not many):
        return None
    sub = helper.make_graph(
        [copy.deepcopy(n) for n in nodes], name,
        [helper.make_tensor_value_info(inputs[0], onnx.TensorProto.FLOAT, None),
         *(helper.make_tensor_value_info(v, (types or {}).get(v, onnx.TensorProto.INT64), None)
           for v in inputs[1:])],
        [helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in outputs],
        initializer=[copy.deepcopy(initializers[v]) for v in dict.fromkeys(consumed)
                     if v in initializers])
    piece = helper.make_model(sub, opset_imports=model.opset_import)
    piece.ir_version = model.ir_version
    return piece


_SHAPE_OPS = {"Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Cast",
              "Constant", "Identity", "Add", "Sub", "Mul", "Div", "Range", "Expand",
              "ConstantOfShape", "Tile"}


class _ShapeValues:
    """``values(name)``: is the value computed from tensor shapes and constants only (a batch
    size; a recurrent layer's zero ``h_0``, which the exporter may share between layers)?"""

    def __init__(self, graph) -> None:
        self.made_by = {o: node for node in graph.node for o in node.output}
        self.constants = {t.name for t in graph.initializer}
        self.known: dict[str, bool] = {}

    def __call__(self, value: str) -> bool:
        if value in self.constants:
            return True
        if value not in self.known:
            self.known[value] = False  # cycles cannot occur; this only stops re-entry
            node = self.made_by.get(value)
            self.known[value] = node is not None and (
                node.op_type == "Shape" or (node.op_type in _SHAPE_OPS and all(
                    self(v) for v in node.input if v)))
        return self.known[value]


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of ``model``, by ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {info.name: info.type.tensor_type.elem_type
            for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}


def values_of(model: onnx.ModelProto, names: list[str], inputs: dict, types: dict,
              providers=("CPUExecutionProvider",)) -> dict:
    """Intermediate values of ``model`` computed from shapes and constants (sizes, a zero
    ``h_0``: what a replayed piece reads besides its input, see :func:`layer_model`) on one
    run with ``inputs``; ``types`` from :func:`value_types`."""
    if not names:
        return {}
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    del copied.graph.output[:]
    copied.graph.output.extend(helper.make_tensor_value_info(
        v, types.get(v, onnx.TensorProto.INT64), None) for v in names)
    found = session(copied, providers).run(None, inputs)
    return dict(zip(names, found, strict=True))


def pair_model(model: onnx.ModelProto, site: str,
               index: FileIndex | None = None) -> onnx.ModelProto | None:
    """The clamp (if any), QuantizeLinear and DequantizeLinear of ``site`` as a model
    (``index``: the file's :class:`FileIndex`, when cutting many pieces)."""
    index = index or FileIndex(model)
    roles = index.sites.get(site, {})
    order = [roles[r] for r in PAIR_ROLES if r in roles]
    if "quantize" not in roles or "dequantize" not in roles:
        return None
    return _sub_model(index, order, f"{site}_qdq")


def layer_model(model: onnx.ModelProto, layer: str, many: bool = False,
                types: dict | None = None, index: FileIndex | None = None) -> onnx.ModelProto | None:
    """Every node exported under module ``layer``'s scope, if they form a one-input,
    one-output piece (``many``: one or more outputs, as a recurrent layer's sequence and final
    states, and besides the layer input any number of values computed elsewhere from tensor
    shapes and constants, as ``h_0``'s batch size: :func:`values_of` gives them; ``types``
    from :func:`value_types` declares them; ``index``: the file's :class:`FileIndex`)."""
    index = index or FileIndex(model)
    nodes = list(index.scoped.get(layer, ()))
    if many and nodes:  # nodes the exporter left unscoped (Split of a chunk) that read only these
        produced = {o for node in nodes for o in node.output}
        known = produced | set(index.initializers)
        chosen = {id(node) for node in nodes}
        for node in index.unscoped:
            if node.input and all(v in known for v in node.input if v) and \
                    any(v in produced for v in node.input):
                chosen.add(id(node))
                produced.update(node.output)
                known.update(node.output)
        nodes = [node for node in index.every if id(node) in chosen]
    pair = index.sites.get(layer, {})  # its input pair, also when shared with another
    pair = [pair[r] for r in PAIR_ROLES if r in pair]
    if pair:  # the exporter may tag the caller's reshaping of the input with the layer's scope
        upstream = _ancestors(nodes, pair[0].input[0])
        nodes = [node for node in nodes if id(node) not in upstream]
    inside = {id(node) for node in nodes}
    in_pair = {id(node) for node in pair}
    extra = [node for node in pair if id(node) not in inside]
    own = [node for node in nodes if id(node) not in in_pair]  # the layer's output comes from these
    return _sub_model(index, extra + nodes, layer, outputs_from=own, many=many,
                      types=types) if nodes else None


def _ancestors(nodes: list, value: str) -> set[int]:
    """Identities of the nodes among ``nodes`` that ``value`` is computed from."""
    made_by = {o: node for node in nodes for o in node.output}
    found, todo = set(), [value]
    while todo:
        node = made_by.get(todo.pop())
        if node is not None and id(node) not in found:
            found.add(id(node))
            todo.extend(v for v in node.input if v)
    return found


def session(model_or_path, providers=("CPUExecutionProvider",),
            memory_arena: bool = False) -> onnxruntime.InferenceSession:
    """A session with onnxruntime's default options (graph optimizations on, as users run it),
    but for two that change no value computed, only what the session costs beside PyTorch in
    one process: idle worker threads sleep instead of spinning (verification alternates
    onnxruntime runs with PyTorch work, and spinning threads take its cores:
    benchmarks/export_time.py, verification 1.8x faster on MobileNetV2, 3.6x on the 10M
    decoder), and without ``memory_arena`` each run's tensors go back to the allocator instead
    of into an arena the session keeps (verification of the 40M decoder peaked at 1.74 GiB
    instead of 2.04 GiB, in about the same time)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = memory_arena
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


class Pieces:
    """Pieces of a file (:func:`pair_model`, :func:`layer_model`) side by side in one model and
    one default session: each keeps its own nodes, weights and inputs (names prefixed per
    piece, so pieces that copy the same nodes stay apart). Building one session and running it
    once costs a fraction of one session per piece (onnxruntime's per-session setup dominates
    for small pieces); each piece computes exactly what it computes alone."""

    def __init__(self, pieces: dict[str, onnx.ModelProto], providers=("CPUExecutionProvider",)):
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        first = next(iter(pieces.values()))
        graph = helper.make_graph([], "pieces", [], [])
        for index, (key, piece) in enumerate(pieces.items()):
            renamed = compose.add_prefix(piece, f"p{index}/")
            graph.node.extend(renamed.graph.node)
            graph.initializer.extend(renamed.graph.initializer)
            graph.input.extend(renamed.graph.input)
            graph.output.extend(renamed.graph.output)
            self.inputs[key] = [v.name for v in renamed.graph.input]
            self.outputs[key] = [v.name for v in renamed.graph.output]
        merged = helper.make_model(graph, opset_imports=first.opset_import)
        merged.ir_version = first.ir_version
        self.session = session(merged, providers)

    def run(self, feeds: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """``feeds[key]``: the arrays for piece ``key``'s inputs, in order (every piece must be
        fed; an empty array where a piece has nothing to compute). Returns each piece's
        outputs."""
        given = {name: array for key, arrays in feeds.items()
                 for name, array in zip(self.inputs[key], arrays, strict=True)}
        wanted = [name for key in self.outputs for name in self.outputs[key]]
        found = dict(zip(wanted, self.session.run(wanted, given), strict=True))
        return {key: [found[name] for name in names] for key, names in self.outputs.items()}
