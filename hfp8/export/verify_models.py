"""The quantized model that verification runs beside the file: the caller's, not a copy.

Verification needs the quantized model in float32 on the CPU, in eval mode, with taps on its
quantization points. It used to tap a ``copy.deepcopy`` of the model: one more model's worth
of weights for the whole check (with onnxruntime's memory arena, the 150M decoder's
verification peaked at 6.3 GiB beside a 0.6 GiB model; 4.35 GiB without both). Now
:func:`verification_model` yields the model itself when it already is on the CPU in float32,
and puts its taps and train/eval flags back on leaving, whatever happens inside. A model
elsewhere (a GPU, another dtype) is still copied, as the caller's must not move.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch
from torch import nn

from hfp8.ptq.operand_sites import operand_sites
from hfp8.ptq.quantizers import layer_state, quantized_layers

__all__ = ["verification_model", "tap_holders"]


def tap_holders(qmodel: nn.Module) -> list:
    """Every object of ``qmodel`` with a ``tap``: its layers' states, its attention sites."""
    return [layer_state(layer) for layer in quantized_layers(qmodel).values()] + \
        [site for _, site in operand_sites(qmodel).values()]


@contextlib.contextmanager
def verification_model(qmodel: nn.Module):
    """Yields ``qmodel`` in eval mode (or its CPU float32 copy when it is not on the CPU in
    float32); every tap on its layers and attention sites, and every module's train/eval flag,
    is what it was once the block is left."""
    tensors = itertools.chain(qmodel.parameters(), qmodel.buffers())
    if not all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in tensors if t.is_floating_point()):
        yield copy.deepcopy(qmodel).eval().cpu().float()
        return
    modes = [(module, module.training) for module in qmodel.modules()]
    taps = [(holder, holder.tap) for holder in tap_holders(qmodel)]
    qmodel.eval()
    try:
        yield qmodel
    finally:
        for holder, tap in taps:
            holder.tap = tap
        for module, training in modes:
            module.training = training
