"""Which quantized layers to keep in float: each layer's cost, and the budgeted choice.

:func:`choose_float_layers` keeps the layers with the most predicted error (from
:mod:`hfp8.ptq.sensitivity`) per unit of cost (weights or multiply-accumulates,
:func:`layer_costs`) in float, most harmful first, while the total cost stays within the budget
(a fraction of all quantized layers' cost; never exceeded), or until the predicted output SQNR
(independent errors add) reaches a target.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hfp8.data.model_io import batch_size, call_model
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.recurrent import is_recurrent, weight_names

__all__ = ["choose_float_layers", "layer_costs", "predicted_sqnr_db"]


def _weight_count(module: nn.Module) -> int:
    return sum(module.get_parameter(name).numel() for name in weight_names(module))


def layer_costs(model: nn.Module, names: list[str], batch, unit: str) -> dict[str, float]:
    """Cost of each layer: its weight count, or its multiply-accumulates on one sample (a
    recurrent layer: its weights once per step of the first output, per sequence)."""
    if unit == "weights":
        return {name: float(_weight_count(model.get_submodule(name))) for name in names}
    macs = {}
    samples = max(batch_size(batch), 1)

    def count(name):
        def hook(module, args, output):
            if is_recurrent(module):
                first = next(leaf for leaf in tree_flatten(output)[0] if torch.is_tensor(leaf)
                             and leaf.is_floating_point())  # (steps, batch, features) or packed
                per_sample = _weight_count(module) * first[..., 0].numel() / samples
            else:  # in/groups x kernel products per output value, on the first sample
                per_sample = module.weight[0].numel() * output[0].numel()
            macs[name] = macs.get(name, 0.0) + per_sample
        return hook
    handles = [model.get_submodule(n).register_forward_hook(count(n)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: macs.get(name, 0.0) for name in names}


def predicted_sqnr_db(ratio: float) -> float:
    """The SQNR of a predicted noise-to-signal ``ratio`` (clamped at 0: +inf)."""
    return sqnr_db(1.0, max(ratio, 0.0))


def choose_float_layers(sensitivity: dict[str, float], costs: dict[str, float],
                        budget: float | None, target_sqnr_db: float | None = None) -> list[str]:
    """Layers to keep float, most predicted error per cost first: while their summed cost stays
    within ``budget`` (a fraction of the summed cost of all candidates), and, with
    ``target_sqnr_db``, only until the remaining predicted error reaches it."""
    total_cost = sum(costs.values())
    allowed = math.inf if budget is None else budget * total_cost
    remaining = sum(sensitivity.values())
    order = sorted(sensitivity, key=lambda n: sensitivity[n] / max(costs[n], 1e-30), reverse=True)
    chosen, spent = [], 0.0
    for name in order:
        if target_sqnr_db is not None and predicted_sqnr_db(remaining) >= target_sqnr_db:
            break
        if sensitivity[name] <= 0 or spent + costs[name] > allowed:
            continue
        chosen.append(name)
        spent += costs[name]
        remaining -= sensitivity[name]
    return chosen
