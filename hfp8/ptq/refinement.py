"""Between the analysis pass and the main calibration pass: error-compensating weight rounding,
then the layers that harm the output most kept in float within the budget.

Both happen before BatchNorm re-estimation and input-bias selection, so that those see the final
weights and the final set of quantized layers (a layer turned back to float after BN
re-estimation would leave its BN shift correction behind).
"""

from __future__ import annotations

import torch
from torch import nn

from hfp8.ptq.config import QuantConfig
from hfp8.ptq.quantizers import (
    detach_layer,
    layer_state,
    quantized_layers,
    weight_bias_buffer,
)
from hfp8.ptq.recurrent import input_weight_names
from hfp8.ptq.float_budget import choose_float_layers, layer_costs, predicted_sqnr_db
from hfp8.ptq.sensitivity import layer_sensitivity
from hfp8.ptq.weight_rounding import rounded_runs

__all__ = ["compensate_weights", "keep_sensitive_layers_float", "SENSITIVITY_SAMPLES"]

# Samples of the first batch the sensitivity estimate uses: its per-sample random projections
# average to about +-35% (1.5 dB) per layer, while layers differ by orders of magnitude.
SENSITIVITY_SAMPLES = 16


class _Square:
    """One layer's second moments, made into the reversed square that compensated rounding
    factors only when the rounding run that needs them starts (wide layers hold half the square
    until then: see :mod:`hfp8.calibration.input_moments`), so the squares in memory at once
    are one run's, not the whole group's. ``users``: the weight matrices sharing these moments
    (both directions of a recurrent layer); the moments are released at the last one."""

    def __init__(self, moments, users: int) -> None:
        self.moments, self.users, self.shape = moments, users, moments.shape

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        self.users -= 1
        square = self.moments.reversed_square(dtype, release=self.users == 0)
        if self.users == 0:
            self.moments = None
        return square


def compensate_weights(qmodel: nn.Module, model: nn.Module, moments: dict) -> list[str]:
    """Re-round each layer's input matrices with its input moments from the float weights
    (same grid, same bias), all of one weight format in one batched call; returns the names
    of the layers rounded this way. ``moments`` is consumed (emptied): each layer's second
    moments are released once its weights are rounded."""
    by_format: dict = {}
    for name in list(moments):
        layer = qmodel.get_submodule(name)
        fmt = layer_state(layer).weight_format
        accumulated = moments.pop(name)
        if accumulated.observed and fmt is not None:  # else: never ran, or weights stay float
            weight_names = input_weight_names(layer)
            square = _Square(accumulated, len(weight_names))
            for weight_name in weight_names:  # (both directions share H)
                float_weight = model.get_submodule(name).get_parameter(weight_name).detach()
                by_format.setdefault(fmt, []).append(((name, weight_name), (
                    float_weight, square, getattr(layer, weight_bias_buffer(weight_name)))))
        del accumulated
    done = []
    for fmt in list(by_format):
        names, problems = zip(*by_format.pop(fmt))
        problems = list(problems)  # the only reference: rounded_runs releases each H in turn
        for index, weight in rounded_runs(problems, fmt):
            name, weight_name = names[index]
            with torch.no_grad():
                qmodel.get_submodule(name).get_parameter(weight_name).copy_(weight)
            if name not in done:
                done.append(name)
    return done


def keep_sensitive_layers_float(qmodel: nn.Module, model: nn.Module, batches,
                                config: QuantConfig, first_batch, quiet: bool) -> dict:
    """Estimates every quantized layer's sensitivity, keeps the chosen ones float (in
    ``qmodel``), and returns ``{name: {"nsr", "sqnr_db", "cost", "float"}}``."""
    names = list(quantized_layers(qmodel))
    if not names:
        return {}
    sensitivity = layer_sensitivity(model, qmodel, names, batches, num_batches=1, quiet=quiet,
                                    max_samples=SENSITIVITY_SAMPLES)
    costs = layer_costs(model, names, first_batch, config.budget_unit)
    chosen = set(choose_float_layers(sensitivity, costs, config.float_budget,
                                     config.target_sqnr_db))
    for name in chosen:
        detach_layer(qmodel.get_submodule(name), model.get_submodule(name))
    return {name: {"nsr": sensitivity[name], "sqnr_db": predicted_sqnr_db(sensitivity[name]),
                   "cost": costs[name], "float": name in chosen} for name in names}
