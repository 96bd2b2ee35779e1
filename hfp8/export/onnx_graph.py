"""Edits of the ONNX graph that torch's exporter produced, each for a stated reason.

* :func:`name_quantization_nodes`: our Q/DQ nodes get names from their site (``conv1.input
  .quantize``...) and FP8 weight initializers ``{layer}.weight_fp8``, so people and
  :mod:`hfp8.export.verify` can find them.
* the graph form that onnxruntime's QDQ transforms cannot mis-compute is
  :mod:`hfp8.export.onnx_fp8_form`'s (built on the helpers here).
* :func:`strip_metadata`: node metadata from the exporter holds source stack traces with local
  file paths; only the fields verification needs stay (module scope, site, role).

Every edit keeps what each graph output computes: a rewritten node's output keeps its name
(and so its consumers and its place among the graph outputs), and graph inputs and outputs
keep their names and values.
"""

from __future__ import annotations

import ast

import onnx

from hfp8.export.onnx_ops import PAIR_ROLES, SITE_KEY

__all__ = ["name_quantization_nodes", "tag_merged_pairs", "strip_metadata", "site_nodes",
           "node_scopes", "producers", "consumers", "SCOPE_KEY", "ROLE_KEY"]

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
    made_by = producers(model.graph)
    missing = []
    for layer in layer_sites:
        if "quantize" in sites.get(layer, {}):
            continue
        weight = sites.get(layer, {}).get("weight")
        readers, todo = [], [weight.output[0]] if weight is not None else []
        while todo:  # the node computing with the weight, past a Transpose or Reshape
            for reader in consumers(model.graph, todo.pop()):
                if reader.op_type in _SHAPE_ONLY:
                    todo.append(reader.output[0])
                else:
                    readers.append(reader)
        found = None
        for reader in readers:
            for value in reader.input:
                node = made_by.get(value)
                while node is not None and node.op_type in _SHAPE_ONLY | {"Pad"}:
                    node = made_by.get(node.input[0])
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
    if any(item.name == old for item in (*graph.input, *graph.output)):
        raise ValueError(f"internal: {old!r} is a graph input or output and keeps its name")
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
                boundary = {v.name for v in (*graph.input, *graph.output)}
                if new not in initializers and node.input[0] not in boundary:
                    _rename_value(graph, node.input[0], new)
                    initializers.add(new)


def producers(graph) -> dict[str, onnx.NodeProto]:
    """value name -> the node computing it."""
    return {output: node for node in graph.node for output in node.output}


def consumers(graph, value: str) -> list[onnx.NodeProto]:
    """The nodes reading ``value``."""
    return [node for node in graph.node if value in node.input]


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
