"""One way to feed a model a batch of any structure, and to read outputs of any structure.

Batches (calibration, evaluation, export examples) may be:

* a tensor, or a ``PackedSequence`` (one input of a recurrent model; its size is its number of
  sequences): ``model(batch)``;
* a mapping (a dict, a ``transformers.BatchEncoding``): ``model(**batch)``; every key must be an
  argument of ``forward`` (unless it takes ``**kwargs``);
* a tuple or list: its items are passed positionally, nested items as they are. Items beyond the
  number of positional inputs ``forward`` takes are the targets of a labelled loader
  (``(inputs, target)``): they are not passed, and :func:`split_batch` says how many were left;
  ``(mapping, target)`` passes the mapping as keyword arguments.

Outputs may be tensors, tuples, lists, dicts, ``ModelOutput``-like mappings and namedtuples,
nested: :func:`output_leaves` names every tensor leaf by its path (``"0"``, ``"logits"``,
``"1.boxes"``; a bare tensor is ``"output"``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence, unpack_sequence

__all__ = ["BatchError", "split_batch", "call_model", "map_tensors", "batch_size", "leaf_hooks",
           "output_leaves", "positional_capacity", "describe", "describe_batch", "slice_batch",
           "weight_sharing_copy"]


class BatchError(TypeError):
    """A batch that cannot be passed to the model; the message says which part and why."""


def positional_capacity(model: Callable) -> tuple[float, set[str] | None]:
    """(how many positional inputs ``model``'s forward accepts, its keyword names or None when
    it takes ``**kwargs``). Unknown signatures accept everything."""
    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return float("inf"), None
    positional, names, var_keyword = 0, set(), False
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            positional = float("inf")
        elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            names.add(parameter.name)
        var_keyword |= parameter.kind == parameter.VAR_KEYWORD
    return positional, None if var_keyword else names


def describe(value) -> str:
    if isinstance(value, PackedSequence):
        return (f"a packed sequence of {int(value.batch_sizes[0])} sequences (data "
                f"{describe(value.data)[2:]})")
    if torch.is_tensor(value):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _keywords(mapping: Mapping, names: set[str] | None) -> dict:
    keywords = dict(mapping)
    for key in keywords:
        if not isinstance(key, str):
            raise BatchError(f"batch mapping keys must be argument names, got {key!r}")
        if names is not None and key not in names:
            raise BatchError(f"batch key {key!r} is not an argument of the model's forward "
                             f"(it takes {', '.join(sorted(names)) or 'no keywords'})")
    return keywords


def split_batch(model: Callable, batch) -> tuple[tuple, dict, tuple]:
    """``(args, kwargs, left)`` for calling ``model`` on ``batch`` (see the module docstring);
    ``left`` holds the items that are not passed (targets)."""
    capacity, names = positional_capacity(model)
    if torch.is_tensor(batch) or isinstance(batch, PackedSequence):
        return (batch,), {}, ()
    if isinstance(batch, Mapping):
        return (), _keywords(batch, names), ()
    if isinstance(batch, (tuple, list)):
        items = tuple(batch)
        if not items:
            raise BatchError("a calibration batch is an empty tuple")
        if isinstance(items[0], Mapping) and len(items) == 2 and capacity < 2:
            return (), _keywords(items[0], names), items[1:]
        if len(items) > capacity:
            count = int(capacity)
            if count == 0:
                raise BatchError("the model's forward takes no positional input, but the batch "
                                 "is a tuple; give mappings (keyword arguments) instead")
            return items[:count], {}, items[count:]
        return items, {}, ()
    raise BatchError(f"a batch must be a tensor, a tuple/list or a mapping of inputs, got "
                     f"{describe(batch)}")


def call_model(model: Callable, batch):
    """``model`` called on ``batch`` (targets, if any, are not passed)."""
    args, kwargs, _ = split_batch(model, batch)
    return model(*args, **kwargs)


def map_tensors(value, function: Callable[[torch.Tensor], torch.Tensor]):
    """``value`` with ``function`` applied to every tensor leaf; mappings become dicts. A packed
    sequence's data is a leaf (its indices follow the data's device; its step sizes stay)."""
    if torch.is_tensor(value):
        return function(value)
    if isinstance(value, PackedSequence):
        data = function(value.data)
        if not torch.is_tensor(data):  # a function run for its effect (collecting leaves)
            return value
        move = lambda t: None if t is None else t.to(data.device)  # noqa: E731
        return value._replace(data=data, sorted_indices=move(value.sorted_indices),
                              unsorted_indices=move(value.unsorted_indices))
    if isinstance(value, Mapping):
        return {key: map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(item, function) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, function) for item in value)
    return value


def describe_batch(batch) -> str:
    """``a float32 tensor of shape (8, 3, 224, 224)``, ``{input_ids: ..., ...}``, ..."""
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return describe(batch)


def slice_batch(batch, count: int, start: int = 0):
    """Samples ``start`` to ``start + count`` of ``batch`` (the first ``count`` by default):
    every tensor whose first dimension is the batch size is sliced, anything else (a shared
    mask, a scalar) kept whole."""
    size, stop = batch_size(batch), start + count
    if isinstance(batch, PackedSequence):  # those sequences, in their original order
        return pack_sequence(unpack_sequence(batch)[start:stop], enforce_sorted=False)
    if isinstance(batch, (tuple, list)) and any(isinstance(v, PackedSequence) for v in batch):
        return type(batch)(slice_batch(v, count, start) if isinstance(v, PackedSequence) else
                           map_tensors(v, lambda t: t[start:stop] if t.dim() and t.shape[0] == size
                                       else t) for v in batch)
    return map_tensors(batch, lambda t: t[start:stop] if t.dim() and t.shape[0] == size else t)


def _first_tensor(value):
    if torch.is_tensor(value) or isinstance(value, PackedSequence):
        return value
    items = value.values() if isinstance(value, Mapping) else value \
        if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size(batch) -> int:
    """Length of the first dimension of the batch's first tensor (1 for a 0-d tensor)."""
    tensor = _first_tensor(batch)
    if tensor is None:
        raise BatchError(f"the batch holds no tensor ({describe(batch)})")
    if isinstance(tensor, PackedSequence):
        return int(tensor.batch_sizes[0])
    return int(tensor.shape[0]) if tensor.dim() else 1


def output_leaves(output, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a model output, with its path (see the module docstring)."""
    if torch.is_tensor(output):
        return [(prefix or "output", output)]
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = ((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    else:
        items = ()
    leaves = []
    for key, item in items:
        leaves.extend(output_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


@contextlib.contextmanager
def leaf_hooks(model: torch.nn.Module, hook: Callable):
    """``hook(module, inputs, output)`` as a forward hook on every leaf module of ``model``
    while the block runs; removed in any case."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (modules, buffers, attributes, hooks) whose parameters are new
    Parameters without gradient over the same storage as ``model``'s: hooks, flags and
    ``requires_grad`` set on the copy never reach the caller's model, and the weights (most of
    a model's memory) are not copied. For a reference run that reads the weights and never
    writes them (no torch layer's forward writes its weights); tied weights stay tied."""
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)
