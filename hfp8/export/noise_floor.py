"""The float32 noise floor of a whole model: how far any float32 evaluation may lie from exact.

A float32 sum of ``n`` terms lies within ``gamma_n * sum|terms|`` of the exact sum whatever the
order (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``; Higham, Accuracy and Stability, 3.1). A
model's output is, to first order in ``u``, a chain of such sums: along the path from input to
output, each layer adds its own fan-in of roundings, so the first-order relative error of the
output is bounded by ``gamma_K`` with ``K`` the total accumulation length along the path,
provided no layer amplifies relative error (no cancellation, Lipschitz constant 1 relative to
the magnitudes summed). ``K`` here counts every call of every leaf module once, which bounds
any single path from above:

* Conv/ConvTranspose: ``in_channels / groups * prod(kernel) + 1`` (products and the bias);
* Linear: ``in_features + 1``;
* LSTM/GRU/RNN: per layer and step ``width + hidden + 2`` (input and recurrent products, both
  biases), times the sequence length and the number of layers (the hidden state carries the
  error from step to step);
* LayerNorm and Softmax: their reduction length; every other leaf: 1 (one rounding).

Two float32 runtimes whose outputs both lie within ``gamma_K`` (relative RMS) of the float64
run differ by float32 noise only; no whole-model test can tell them apart, so verification
does not try (see :func:`hfp8.export.verify.verify_onnx`). Matmuls written as functions in a
forward (not modules) are not counted: ``K`` is then smaller, the floor stricter.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from hfp8.data.model_io import leaf_hooks

__all__ = ["accumulation_length", "relative_bound", "UNIT_ROUNDOFF"]

UNIT_ROUNDOFF = 2.0 ** -24  # float32


def _sequence_length(module: nn.RNNBase, x) -> int:
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.batch_sizes.numel())
    if x.dim() == 2:  # unbatched (L, H_in)
        return int(x.shape[0])
    return int(x.shape[1] if module.batch_first else x.shape[0])


def _terms(module: nn.Module, inputs: tuple) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * math.prod(module.kernel_size) + 1
    if isinstance(module, nn.Linear):
        return module.in_features + 1
    if isinstance(module, nn.RNNBase) and inputs:
        width = max(module.input_size, module.hidden_size * (2 if module.bidirectional else 1))
        step = width + module.hidden_size + 2
        return _sequence_length(module, inputs[0]) * module.num_layers * step
    if isinstance(module, nn.RNNCellBase):
        return module.input_size + module.hidden_size + 2
    if isinstance(module, nn.LayerNorm):
        return math.prod(module.normalized_shape) + 1
    if isinstance(module, nn.Softmax) and inputs and torch.is_tensor(inputs[0]):
        dim = module.dim if module.dim is not None else -1
        return int(inputs[0].shape[dim]) + 1
    return 1


@contextlib.contextmanager
def counted_terms(model: nn.Module):
    """Within it, every leaf-module call of ``model`` adds its accumulation length to the
    yielded list's one item (so a forward the caller runs anyway counts ``K``, see
    :func:`accumulation_length`). Hooks are removed in any case."""
    total = [0]

    def hook(module, inputs, output):
        total[0] += _terms(module, inputs)

    with leaf_hooks(model, hook):
        yield total


@torch.no_grad()
def accumulation_length(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """``K``: the accumulation lengths of every leaf-module call in one forward of ``model``
    on ``args``/``kwargs`` (see the module docstring)."""
    with counted_terms(model) as total:
        model(*args, **kwargs)
    return max(total[0], 1)


def relative_bound(terms: int) -> float:
    """``gamma_K``: the relative deviation float32 evaluation may reach; ``inf`` once ``K u``
    reaches 1/2 (the first-order bound says nothing there)."""
    product = terms * UNIT_ROUNDOFF
    return math.inf if product >= 0.5 else product / (1 - product)
