"""Which Conv/Linear/recurrent layers and attention and recurrent sites to quantize, before
any data-driven choice:
the user's patterns, the first/last policy (by position in the data flow), and layers whose
weight cannot be rounded in place."""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.nn.utils import parametrize

from hfp8.ptq.config import QuantConfig
from hfp8.ptq.graph_probe import ProbeResult
from hfp8.ptq.operand_sites import site_kind
from hfp8.ptq.quantizers import is_quantizable, weight_names

__all__ = ["plan_quantization", "FIRST_REASON", "LAST_REASON"]

FIRST_REASON = "first layer: reads the model input (kept in full precision by default)"
LAST_REASON = "last layer: writes a model output (kept in full precision by default)"


def _weight_problem(layer: nn.Module) -> str | None:
    for name in weight_names(layer):
        if parametrize.is_parametrized(layer, name) or not isinstance(
                layer._parameters.get(name), nn.Parameter):
            return f"its {name} is computed in forward (a parametrization or hook), not a " \
                   "Parameter"
    return None


def plan_quantization(model: nn.Module, config: QuantConfig,
                      probe: ProbeResult) -> tuple[dict, dict]:
    """``(layers, sites)``: for each Conv/Linear name and each attention-site name, ``None``
    (quantize) or the reason it stays float."""
    layers = {name: _weight_problem(m) for name, m in model.named_modules() if is_quantizable(m)}
    sites = {}
    for owner, locals_ in probe.sites.items():
        for local in locals_:
            name = f"{owner}.{local}" if owner else local
            if site_kind(local) == "recurrent":
                continue  # decided with its layer, below
            sites[name] = None if config.quantize_attention and config.activation_format \
                else "attention products not quantized (quantize_attention=False or no " \
                     "activation format)"
    names = [*layers, *sites]
    for pattern in (*config.exclude, *config.include):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            example = f" (names look like {names[0]!r})" if names else ""
            raise ValueError(f"layer pattern {pattern!r} matches no quantizable layer or "
                             f"attention site{example}")
    first, last = probe.first, probe.last
    for plan in (layers, sites):
        for name, reason in plan.items():
            excluded = [p for p in config.exclude if fnmatch.fnmatchcase(name, p)]
            included = [p for p in config.include if fnmatch.fnmatchcase(name, p)]
            if excluded and included:
                raise ValueError(f"{name!r} matches both exclude {excluded[0]!r} and include "
                                 f"{included[0]!r}")
            if reason is not None and plan is layers:
                continue  # cannot be quantized at all
            if excluded:
                plan[name] = f"matches exclude pattern {excluded[0]!r}"
            elif included:
                plan[name] = None
            elif plan is layers and config.keep_first_and_last and name in first:
                plan[name] = FIRST_REASON
            elif plan is layers and config.keep_first_and_last and name in last:
                plan[name] = LAST_REASON
    for owner, locals_ in probe.sites.items():  # a hidden state is rounded only in a quantized layer
        for local in locals_:
            if site_kind(local) == "recurrent":
                sites[f"{owner}.{local}" if owner else local] = _recurrent_reason(
                    config, layers.get(owner, "not a quantizable layer"))
    return layers, sites


def _recurrent_reason(config: QuantConfig, layer_reason: str | None) -> str | None:
    if layer_reason is not None:
        return "its layer stays float"
    if not config.quantize_recurrent_state or config.activation_format is None:
        return "hidden state not quantized (quantize_recurrent_state=False or no activation " \
               "format): the fused kernel and the ONNX LSTM/GRU operator keep it float"
    return None
