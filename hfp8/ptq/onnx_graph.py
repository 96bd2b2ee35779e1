"""Edits of the ONNX graph that torch's exporter produced, each for a stated reason.

* :func:`name_quantization_nodes`: our Q/DQ nodes get names from their site (``conv1.input
  .quantize``...) and FP8 weight initializers ``{layer}.weight_fp8``, so people and
  :mod:`hfp8.ptq.verify` can find them.
* :func:`move_relu_past_qdq`: onnxruntime's default graph transforms mis-compute signed FP8
  QDQ graphs where a Relu feeds a QuantizeLinear (directly or through shape-only nodes). Found by
  bisecting its optimizers: the level-1 ``QDQPropagationTransformer`` copies the Q/DQ pair up
  through Reshape/Transpose/... to sit right after the Relu, and a level-2 Relu->QuantizeLinear
  fusion then deletes the Relu, which is only right when the quantized type clamps negatives
  (unsigned integers; not FP8). Since ``relu(DQ(Q(x))) == DQ(Q(relu(x)))`` for a sign-symmetric
  format with zero offset (rounding keeps signs, ``fq(0) = 0``), the Relu can sit after the pair,
  where no transform touches it: same function, in any runtime.
* :func:`clip_as_max_min`: a Clip feeding a QuantizeLinear makes a default onnxruntime session
  fail to load the model (its Clip->QuantizeLinear fusion expects an integer zero point); Max
  and Min compute the same values and are left alone.
* :func:`strip_metadata`: node metadata from the exporter holds source stack traces with local
  file paths; only the fields verification needs stay (module scope, site, role).
"""

from __future__ import annotations

import ast

import onnx
from onnx import helper

from hfp8.ptq.ops import PAIR_ROLES, SITE_KEY

__all__ = ["name_quantization_nodes", "move_relu_past_qdq", "clip_as_max_min", "tag_merged_pairs", "strip_metadata", "site_nodes",
           "node_scopes", "SCOPE_KEY", "ROLE_KEY"]

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
ROLE_KEY = "hfp8.role"
ALIAS_KEY = "hfp8.also"  # further sites served by the same Q/DQ pair (merged by the optimizer)
_KEEP = (SITE_KEY, ROLE_KEY, SCOPE_KEY, ALIAS_KEY)
_SHAPE_ONLY = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def _props(node) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def node_scopes(node) -> list[str]:
    """The module names a node was exported under (outermost first)."""
    text = _props(node).get(SCOPE_KEY)
    try:
        scopes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)]


def site_nodes(model: onnx.ModelProto, aliases: bool = True) -> dict[str, dict[str, onnx.NodeProto]]:
    """site -> {role: node} for every node that our translation tagged (and, with
    ``aliases``, for the sites that share a merged pair; see :func:`tag_merged_pairs`)."""
    found: dict[str, dict[str, onnx.NodeProto]] = {}
    for node in model.graph.node:
        props = _props(node)
        if SITE_KEY in props:
            found.setdefault(props[SITE_KEY], {})[props.get(ROLE_KEY, "")] = node
    for node in model.graph.node if aliases else ():  # after owners: an owner's name wins
        props = _props(node)
        for alias in filter(None, props.get(ALIAS_KEY, "").split(",")):
            found.setdefault(alias, {}).setdefault(props.get(ROLE_KEY, ""), node)
    return found


def tag_merged_pairs(model: onnx.ModelProto, layer_sites: list[str]) -> list[str]:
    """Where the optimizer merged two identical Q/DQ pairs (one tensor quantized at the same
    scale for two layers), tag the surviving pair with the other layer's site too. Found from
    the layer's weight DequantizeLinear: the node reading it takes the pair's output (through
    padding or shape-only nodes). Returns the sites that could not be found."""
    sites = site_nodes(model)
    producers = _producers(model.graph)
    missing = []
    for layer in layer_sites:
        if "quantize" in sites.get(layer, {}):
            continue
        weight = sites.get(layer, {}).get("weight")
        readers, todo = [], [weight.output[0]] if weight is not None else []
        while todo:  # the node computing with the weight, past a Transpose or Reshape
            for reader in _consumers(model.graph, todo.pop()):
                if reader.op_type in _SHAPE_ONLY:
                    todo.append(reader.output[0])
                else:
                    readers.append(reader)
        found = None
        for reader in readers:
            for value in reader.input:
                node = producers.get(value)
                while node is not None and node.op_type in _SHAPE_ONLY | {"Pad"}:
                    node = producers.get(node.input[0])
                if node is not None and _props(node).get(ROLE_KEY) == "dequantize":
                    found = node
        if found is None:
            missing.append(layer)
            continue
        owner = _props(found)[SITE_KEY]
        for node in sites[owner].values():
            if _props(node).get(ROLE_KEY) in PAIR_ROLES:
                aliases = [a for a in _props(node).get(ALIAS_KEY, "").split(",") if a] + [layer]
                _set_prop(node, ALIAS_KEY, ",".join(aliases))
    return missing


def _set_prop(node, key: str, value: str) -> None:
    for prop in node.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    node.metadata_props.add(key=key, value=value)


def _rename_value(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for collection in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in collection:
            if item.name == old:
                item.name = new


def name_quantization_nodes(model: onnx.ModelProto) -> None:
    graph = model.graph
    taken = {node.name for node in graph.node}
    initializers = {t.name for t in graph.initializer}
    for site, roles in site_nodes(model, aliases=False).items():
        for role, node in roles.items():
            wanted = f"{site}.{role}"
            if wanted not in taken:
                taken.discard(node.name)
                node.name = wanted
                taken.add(wanted)
            if role == "weight" and node.input[0] in initializers:
                new = f"{site}.weight_fp8"
                if new not in initializers:
                    _rename_value(graph, node.input[0], new)
                    initializers.add(new)


def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _consumers(graph, value: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if value in node.input]


def clip_as_max_min(model: onnx.ModelProto) -> int:
    """Re-expresses each Clip that feeds one of our QuantizeLinear nodes (directly or through
    shape-only nodes) as Max then Min: the same values. Why: onnxruntime's Clip->QuantizeLinear
    fusion reads the zero point as an integer and refuses FP8 ones, so a default session
    fails to load the model ("Unexpected data type for QuantizeLinear input y_zero_point of
    17"); Max and Min are not fused. Returns how many Clips were rewritten."""
    graph = model.graph
    rewritten = 0
    for site, roles in site_nodes(model, aliases=False).items():
        quantize = roles.get("quantize") or roles.get("clip_low")
        if quantize is None:
            continue
        producers = _producers(graph)
        value = quantize.input[0]
        while value in producers and producers[value].op_type in _SHAPE_ONLY:
            value = producers[value].input[0]
        clip = producers.get(value)
        if clip is None or clip.op_type != "Clip":
            continue
        bounds = list(clip.input[1:]) + ["", ""]
        current, replacement = clip.input[0], []
        for op_type, bound in (("Max", bounds[0]), ("Min", bounds[1])):
            if bound:
                output = f"{clip.output[0]}.{op_type.lower()}"
                replacement.append(helper.make_node(op_type, [current, bound], [output],
                                                    name=f"{clip.name}.{op_type.lower()}"))
                current = output
        if not replacement:
            continue
        replacement[-1].output[0] = clip.output[0]
        for node in replacement:
            node.metadata_props.extend(p for p in clip.metadata_props if p.key == SCOPE_KEY)
        index = list(graph.node).index(clip)
        graph.node.remove(clip)
        for offset, node in enumerate(replacement):
            graph.node.insert(index + offset, node)
        rewritten += 1
    return rewritten


def move_relu_past_qdq(model: onnx.ModelProto) -> int:
    """Puts every Relu that feeds one of our QuantizeLinear nodes (through shape-only nodes)
    after the matching DequantizeLinear; returns how many were moved. A Relu whose output also
    feeds other nodes stays where it is, and a copy goes after the pair (idempotent)."""
    graph = model.graph
    moved = 0
    for site, roles in site_nodes(model, aliases=False).items():
        quantize, dequantize = roles.get("quantize"), roles.get("dequantize")
        if quantize is None or dequantize is None:
            continue
        producers = _producers(graph)
        value, chain = quantize.input[0], []
        while value in producers and producers[value].op_type in _SHAPE_ONLY \
                and len(_consumers(graph, value)) == 1:
            chain.append(producers[value])
            value = producers[value].input[0]
        relu = producers.get(value)
        if relu is None or relu.op_type != "Relu":
            continue
        if len(_consumers(graph, relu.output[0])) == 1:  # only the chain to this Q reads it
            _rename_value(graph, relu.output[0], relu.input[0])
            graph.node.remove(relu)
        after = f"{dequantize.output[0]}.relu"
        for node in _consumers(graph, dequantize.output[0]):
            node.input[:] = [after if name == dequantize.output[0] else name for name in node.input]
        for output in graph.output:
            if output.name == dequantize.output[0]:
                raise ValueError("a model output is a DequantizeLinear result")  # never ours
        new = helper.make_node("Relu", [dequantize.output[0]], [after], name=f"{site}.relu")
        new.metadata_props.extend(p for p in dequantize.metadata_props if p.key == SCOPE_KEY)
        index = list(graph.node).index(dequantize)
        graph.node.insert(index + 1, new)
        moved += 1
    return moved


def strip_metadata(model: onnx.ModelProto) -> None:
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
        keep = [p for p in node.metadata_props if p.key in _KEEP]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    del model.metadata_props[:]
    for collection in (model.graph.input, model.graph.output, model.graph.value_info,
                       model.graph.initializer):
        for item in collection:
            del item.metadata_props[:]
