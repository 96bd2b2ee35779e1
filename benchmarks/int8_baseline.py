"""INT8 symmetric fake quantization, the usual PTQ baseline (for benchmarks only).

Weights: ``s = max|w| / 127`` per tensor or per output channel, ``w_q = s * clamp(round(w/s),
-127, 127)``. Inputs of the same layers hfp8 quantizes: ``s = max|x| / 127`` over the
calibration data (max calibration), ``x_q = s * clamp(round(x/s), -128, 127)``.

Recurrent layers (``nn.LSTM``/``GRU``/``RNN`` and cells) are handled like Conv/Linear: every
weight matrix :func:`hfp8.ptq.recurrent.weight_names` lists (``weight_ih_l*``, ``weight_hh_l*``,
...) is rounded on its own (per channel: per row, i.e. per gate unit), and the layer input
(first positional argument, a tensor or a ``PackedSequence``'s data) is rounded. The hidden
state runs in float inside the fused kernel (like ``QuantConfig(quantize_recurrent_state=False)``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from hfp8.data.batches import Peeked
from hfp8.data.model_io import call_model
from hfp8.ptq.graph_probe import probe_model
from hfp8.ptq.pipeline import plan_quantization
from hfp8.ptq.recurrent import weight_names


def _quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(t / scale), -128, 127) * scale


def _data(x):
    """The tensor an input pre-hook rounds: a tensor itself or a packed sequence's data."""
    return x.data if isinstance(x, PackedSequence) else x


def _replace(x, function):
    return x._replace(data=function(x.data)) if isinstance(x, PackedSequence) else function(x)


def int8_quantize_model(model: nn.Module, calibration, config, per_channel: bool) -> nn.Module:
    """INT8 copy of ``model`` quantizing the Conv/Linear/recurrent layers ``config`` selects
    (same first/last rule, by position in the graph); attention products stay float."""
    qmodel = copy.deepcopy(model).eval()
    calibration = Peeked(calibration)
    layers, _ = plan_quantization(qmodel, config, probe_model(qmodel, calibration.first))
    names = [name for name, reason in layers.items() if reason is None]
    amax = {name: torch.zeros(()) for name in names}
    handles = []
    for name in names:
        layer = qmodel.get_submodule(name)
        with torch.no_grad():
            for weight in weight_names(layer):
                w = layer.get_parameter(weight)
                dims = tuple(range(1, w.dim()))
                scale = (w.abs().amax(dim=dims, keepdim=True) if per_channel else w.abs().max()) / 127
                w.copy_(torch.clamp(_quantize(w, scale), -127 * scale, 127 * scale))

        def observe(module, args, name=name):
            if args and torch.is_tensor(_data(args[0])):
                amax[name] = torch.maximum(amax[name], _data(args[0]).detach().abs().max())
        handles.append(layer.register_forward_pre_hook(observe))
    with torch.no_grad():
        for batch in calibration:
            call_model(qmodel, batch)
    for handle in handles:
        handle.remove()
    for name in names:
        scale = amax[name] / 127

        def quantize_input(module, args, scale=scale):
            if not args or not torch.is_tensor(_data(args[0])):
                return None
            return (_replace(args[0], lambda x: _quantize(x, scale)),) + tuple(args[1:])
        qmodel.get_submodule(name).register_forward_pre_hook(quantize_input)
    return qmodel
