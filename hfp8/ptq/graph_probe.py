"""One forward pass that learns where each quantizable layer sits in the model's data flow.

Run on one calibration batch of the float model, with every module hooked and a
``TorchFunctionMode`` following every tensor operation, it records:

* which Conv/Linear layers run, in execution order;
* each layer's **predecessors**: the quantizable layers whose outputs reach its input through
  other operations only (the "provenance" of a tensor is carried from the inputs of every
  operation to its outputs; a quantizable layer's output starts a new provenance, itself);
* the **first** layers: those whose input depends on no quantizable layer (they read the model
  inputs, through any number of other operations);
* the **last** layers: per model output, the layers whose outputs reach it through other
  operations only and that no other such layer of the same output depends on (a residual
  stream carries every block's output to the model output, but only the final block writes
  it; parallel heads all write theirs);
* the **attention sites**: activation-times-activation matmuls and scaled-dot-product
  attention calls, and the **recurrent sites** (fused LSTM/GRU/RNN kernels and cells), by the
  module whose own forward makes them (see :mod:`hfp8.ptq.quantizers`).

This is decided by position in the graph, not by module registration order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from hfp8.data.model_io import call_model, output_leaves
from hfp8.ptq.operand_sites import MATMUL_FUNCTIONS, SDPA_FUNCTIONS
from hfp8.ptq.quantizers import is_quantizable
from hfp8.ptq.recurrent import RECURRENT_FUNCTIONS

__all__ = ["ProbeResult", "probe_model"]


@dataclass
class ProbeResult:
    executed: list[str] = field(default_factory=list)  # quantizable layers, first-call order
    calls: dict[str, int] = field(default_factory=dict)  # quantizable layer -> calls in the run
    predecessors: dict[str, set[str]] = field(default_factory=dict)
    sites: dict[str, list[str]] = field(default_factory=dict)  # owner -> ["matmul0", "sdpa0", "recurrent0"]
    output_writers: dict[str, set[str]] = field(default_factory=dict)  # output path -> layers

    @property
    def first(self) -> set[str]:
        return {name for name in self.executed if not self.predecessors.get(name)}

    def ancestors(self, name: str) -> set[str]:
        seen, todo = set(), list(self.predecessors.get(name, ()))
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.predecessors.get(current, ()))
        return seen

    @property
    def last(self) -> set[str]:
        found = set()
        for writers in self.output_writers.values():
            shadowed = set()
            for name in writers:
                shadowed |= self.ancestors(name) & writers
            found |= writers - shadowed
        return found


def _tensors(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if torch.is_tensor(leaf)]


class _Probe(TorchFunctionMode):
    def __init__(self, result: ProbeResult) -> None:
        super().__init__()
        self.result = result
        self.provenance = WeakIdKeyDictionary()
        self.stack: list[list] = []  # [module name, {kind: calls}]

    def origin(self, value) -> frozenset:
        found = frozenset()
        for tensor in _tensors(value):
            found |= self.provenance.get(tensor, frozenset())
        return found

    def _record_site(self, kind: str) -> None:
        if not self.stack:
            return
        owner, calls = self.stack[-1]
        index = calls.get(kind, 0)
        calls[kind] = index + 1
        local = f"{kind}{index}"
        sites = self.result.sites.setdefault(owner, [])
        if local not in sites:
            sites.append(local)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_FUNCTIONS and len(args) >= 2 and all(
                torch.is_tensor(a) and not isinstance(a, nn.Parameter) and a.is_floating_point()
                for a in args[:2]):
            self._record_site("matmul")
        elif func in SDPA_FUNCTIONS:
            self._record_site("sdpa")
        elif func in RECURRENT_FUNCTIONS:
            self._record_site("recurrent")
        origin = self.origin((args, kwargs))
        result = func(*args, **kwargs)
        if origin:
            for tensor in _tensors(result):
                self.provenance[tensor] = self.provenance.get(tensor, frozenset()) | origin
            if args and torch.is_tensor(args[0]) and (
                    getattr(func, "__name__", "").endswith("_") or "out" in kwargs
                    or getattr(func, "__name__", "") == "__setitem__"):
                # in place: the mutated tensor now also carries what was written into it
                self.provenance[args[0]] = self.provenance.get(args[0], frozenset()) | origin
        return result


def probe_model(model: nn.Module, batch) -> ProbeResult:
    """Run ``model`` once on ``batch`` (no gradients) and record its data flow."""
    result = ProbeResult()
    probe = _Probe(result)
    names = {module: name for name, module in model.named_modules()}

    def before(module, args, kwargs):
        name = names[module]
        probe.stack.append([name, {}])
        if is_quantizable(module):
            origin = probe.origin((args, kwargs))
            if name not in result.predecessors:
                result.executed.append(name)
            result.calls[name] = result.calls.get(name, 0) + 1
            result.predecessors.setdefault(name, set()).update(origin - {name})

    def after(module, args, kwargs, output):
        if probe.stack and probe.stack[-1][0] == names[module]:
            probe.stack.pop()
        if is_quantizable(module):
            for tensor in _tensors(output):
                probe.provenance[tensor] = frozenset({names[module]})

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
        with torch.no_grad(), probe:
            output = call_model(model, batch)
            for path, tensor in output_leaves(output):
                result.output_writers[path] = set(probe.origin(tensor))
    finally:
        for handle in handles:
            handle.remove()
    return result
