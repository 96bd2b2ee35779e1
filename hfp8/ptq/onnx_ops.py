"""Translation of traced PyTorch operations into ONNX nodes (float parts of the graph).

:class:`GraphBuilder` collects nodes and initializers under deterministic names. The tables at
the bottom map module types, functions and tensor methods to translators; anything else is an
:class:`ExportError` naming the operation, so a model is never exported half right.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

__all__ = ["ExportError", "GraphBuilder", "MODULE_TRANSLATORS", "FUNCTION_TRANSLATORS",
           "METHOD_TRANSLATORS"]


class ExportError(ValueError):
    """The model (or format) cannot be expressed exactly in the exported ONNX graph."""


class GraphBuilder:
    """Nodes and initializers of one ONNX graph, with unique deterministic names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self._names:
            index += 1
            candidate = f"{name}_{index}"
        self._names.add(candidate)
        return candidate

    def constant(self, name: str, value, dtype=np.float32) -> str:
        """A float32 (or ``dtype``) initializer from a tensor, array or number."""
        if torch.is_tensor(value):
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=dtype)
        unique = self._unique(name)
        self.initializers.append(numpy_helper.from_array(array, unique))
        return unique

    def raw_constant(self, name: str, data_type: int, dims, raw: bytes) -> str:
        """An initializer given as raw bytes (used for FLOAT8 codes)."""
        unique = self._unique(name)
        self.initializers.append(helper.make_tensor(unique, data_type, list(dims), raw, raw=True))
        return unique

    def rewrite_clamp_as_max_min(self, output: str) -> None:
        """Re-express the Relu or Clip node producing ``output`` as Max (and Min), same values.

        Why: onnxruntime's Level-2 fusions of Relu->QuantizeLinear and Clip->QuantizeLinear
        assume integer zero points. With FLOAT8 ones they drop the Relu (wrong results) or fail
        to load the model; Max/Min (NaN-propagating, like Relu and Clip) are left alone.
        """
        for index, node in enumerate(self.nodes):
            if list(node.output) != [output] or node.op_type not in ("Relu", "Clip"):
                continue
            if node.op_type == "Relu":
                zero = self.constant(f"{node.name}.zero", 0.0)
                replacement = [helper.make_node("Max", [node.input[0], zero], [output], name=node.name)]
            else:
                low, high = node.input[1], node.input[2]
                lowered = self._unique(f"{node.name}.max")
                replacement = [helper.make_node("Max", [node.input[0], low], [lowered], name=lowered),
                               helper.make_node("Min", [lowered, high], [output], name=node.name)]
            self.nodes[index:index + 1] = replacement
            return

    def node(self, op_type: str, inputs: list[str], name: str, **attributes) -> str:
        """Adds one node with a single output named after it; returns the output name."""
        unique = self._unique(name)
        self.nodes.append(helper.make_node(op_type, inputs, [unique], name=unique, **attributes))
        return unique


def _pair(value, rank: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * rank


def conv_attributes(module: nn.Module, rank: int) -> dict:
    """kernel_shape, strides, pads, dilations and group of a torch Conv layer."""
    if module.padding_mode != "zeros":
        raise ExportError(f"padding_mode={module.padding_mode!r} is not exported (only 'zeros')")
    kernel = _pair(module.kernel_size, rank)
    dilation = _pair(module.dilation, rank)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        begin = [t // 2 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin)]
    elif module.padding == "valid":
        pads = [0] * (2 * rank)
    else:
        pads = _pair(module.padding, rank) * 2
    return {"kernel_shape": kernel, "strides": _pair(module.stride, rank), "pads": pads,
            "dilations": dilation, "group": module.groups}


# -- module translators: (builder, module, name, inputs, input_ranks) -> output name -----------
def _batchnorm(b, m, name, inputs, ranks):
    channels = m.num_features
    scale = m.weight if m.weight is not None else torch.ones(channels)
    shift = m.bias if m.bias is not None else torch.zeros(channels)
    return b.node("BatchNormalization", [inputs[0], b.constant(f"{name}.weight", scale),
                                         b.constant(f"{name}.bias", shift),
                                         b.constant(f"{name}.running_mean", m.running_mean),
                                         b.constant(f"{name}.running_var", m.running_var)],
                  name, epsilon=float(m.eps))


def _clip(b, name, x, low, high):
    return b.node("Clip", [x, b.constant(f"{name}.min", low), b.constant(f"{name}.max", high)], name)


def _pool_common(m, rank):
    kernel = _pair(m.kernel_size, rank)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size, rank)
    return {"kernel_shape": kernel, "strides": stride, "pads": _pair(m.padding, rank) * 2,
            "ceil_mode": int(m.ceil_mode)}


def _max_pool(b, m, name, inputs, ranks):
    attributes = _pool_common(m, ranks[0] - 2)
    attributes["dilations"] = _pair(m.dilation, ranks[0] - 2)
    if m.return_indices:
        raise ExportError("MaxPool with return_indices=True is not exported")
    return b.node("MaxPool", inputs[:1], name, **attributes)


def _avg_pool(b, m, name, inputs, ranks):
    if getattr(m, "divisor_override", None):
        raise ExportError("AvgPool with divisor_override is not exported")
    attributes = _pool_common(m, ranks[0] - 2)
    return b.node("AveragePool", inputs[:1], name, count_include_pad=int(m.count_include_pad),
                  **attributes)


def _global_pool(b, name, x, output_size):
    sizes = output_size if isinstance(output_size, (tuple, list)) else [output_size]
    if any(s != 1 for s in sizes):
        raise ExportError(f"adaptive average pooling to {output_size} is not exported (only 1)")
    return b.node("GlobalAveragePool", [x], name)


def _flatten(b, name, x, rank, start_dim=0, end_dim=-1):
    """torch.flatten(x, start_dim) up to the last dim: Flatten for start 1 (the common case),
    else Reshape to ``[0] * start + [-1]`` (0 copies a dim, keeping the batch dynamic)."""
    if end_dim % rank != rank - 1:
        raise ExportError("flatten with an end_dim other than the last is not exported")
    start = start_dim % rank
    if start == rank - 1:
        return x
    if start == 1:
        return b.node("Flatten", [x], name, axis=1)
    shape = b.constant(f"{name}.shape", [0] * start + [-1], dtype=np.int64)
    return b.node("Reshape", [x, shape], name)


MODULE_TRANSLATORS = {
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.BatchNorm3d: _batchnorm,
    nn.ReLU: lambda b, m, name, i, r: b.node("Relu", i[:1], name),
    nn.ReLU6: lambda b, m, name, i, r: _clip(b, name, i[0], 0.0, 6.0),
    nn.Hardtanh: lambda b, m, name, i, r: _clip(b, name, i[0], m.min_val, m.max_val),
    nn.LeakyReLU: lambda b, m, name, i, r: b.node("LeakyRelu", i[:1], name,
                                                  alpha=float(m.negative_slope)),
    nn.Sigmoid: lambda b, m, name, i, r: b.node("Sigmoid", i[:1], name),
    nn.Tanh: lambda b, m, name, i, r: b.node("Tanh", i[:1], name),
    nn.SiLU: lambda b, m, name, i, r: b.node("Mul", [i[0], b.node("Sigmoid", i[:1], f"{name}.sigmoid")], name),
    nn.Hardswish: lambda b, m, name, i, r: b.node("HardSwish", i[:1], name),
    nn.Hardsigmoid: lambda b, m, name, i, r: b.node("HardSigmoid", i[:1], name, alpha=1 / 6, beta=0.5),
    nn.Softmax: lambda b, m, name, i, r: b.node("Softmax", i[:1], name, axis=m.dim if m.dim is not None else -1),
    nn.Dropout: lambda b, m, name, i, r: i[0],  # eval mode: identity
    nn.Identity: lambda b, m, name, i, r: i[0],
    nn.Flatten: lambda b, m, name, i, r: _flatten(b, name, i[0], r[0], m.start_dim, m.end_dim),
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    nn.MaxPool3d: _max_pool,
    nn.AvgPool1d: _avg_pool,
    nn.AvgPool2d: _avg_pool,
    nn.AvgPool3d: _avg_pool,
    nn.AdaptiveAvgPool1d: lambda b, m, name, i, r: _global_pool(b, name, i[0], m.output_size),
    nn.AdaptiveAvgPool2d: lambda b, m, name, i, r: _global_pool(b, name, i[0], m.output_size),
    nn.AdaptiveAvgPool3d: lambda b, m, name, i, r: _global_pool(b, name, i[0], m.output_size),
}


# -- function and method translators: (builder, name, args, kwargs, ranks) -> output name ------
def _binary(op_type):
    def translate(b, name, args, kwargs, ranks):
        if kwargs.get("alpha", 1) != 1 or len(args) != 2:
            raise ExportError(f"{op_type} with these arguments is not exported")
        operands = [a if isinstance(a, str) else b.constant(f"{name}.constant", float(a))
                    for a in args]
        return b.node(op_type, operands, name)
    return translate


def _mean(b, name, args, kwargs, ranks):
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None:
        raise ExportError("mean over all dimensions is not exported")
    dims = [dims] if isinstance(dims, int) else list(dims)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    axes = b.constant(f"{name}.axes", dims, dtype=np.int64)
    return b.node("ReduceMean", [args[0], axes], name, keepdims=int(bool(keepdim)))


def _cat(b, name, args, kwargs, ranks):
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return b.node("Concat", list(args[0]), name, axis=dim)


def _f_flatten(b, name, args, kwargs, ranks):
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return _flatten(b, name, args[0], ranks[0], start, end)


def _adaptive_pool(b, name, args, kwargs, ranks):
    return _global_pool(b, name, args[0], args[1] if len(args) > 1 else kwargs["output_size"])


def _hardtanh(b, name, args, kwargs, ranks):
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return _clip(b, name, args[0], low, high)


_relu = lambda b, name, args, kwargs, ranks: b.node("Relu", [args[0]], name)  # noqa: E731
_sigmoid = lambda b, name, args, kwargs, ranks: b.node("Sigmoid", [args[0]], name)  # noqa: E731

FUNCTION_TRANSLATORS = {
    operator.add: _binary("Add"), torch.add: _binary("Add"),
    operator.sub: _binary("Sub"), torch.sub: _binary("Sub"),
    operator.mul: _binary("Mul"), torch.mul: _binary("Mul"),
    operator.truediv: _binary("Div"), torch.div: _binary("Div"),
    torch.relu: _relu, nn.functional.relu: _relu,
    nn.functional.relu6: lambda b, name, args, kwargs, ranks: _clip(b, name, args[0], 0.0, 6.0),
    nn.functional.hardtanh: _hardtanh,
    torch.sigmoid: _sigmoid, nn.functional.sigmoid: _sigmoid,
    torch.flatten: _f_flatten,
    torch.cat: _cat,
    torch.mean: _mean,
    nn.functional.adaptive_avg_pool2d: _adaptive_pool,
    nn.functional.adaptive_avg_pool1d: _adaptive_pool,
}

METHOD_TRANSLATORS = {
    "flatten": _f_flatten,
    "relu": _relu,
    "sigmoid": _sigmoid,
    "mean": _mean,
    "add": _binary("Add"),
    "mul": _binary("Mul"),
}

FLOAT_TYPE = TensorProto.FLOAT
