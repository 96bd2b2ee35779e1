"""The budgeted choice of layers kept in float, and what each layer costs."""

import math

import torch
from torch import nn

from hfp8.ptq.float_budget import choose_float_layers, layer_costs


def test_the_budget_is_never_exceeded_and_the_choice_is_greedy_by_harm_per_cost():
    sensitivity = {"a": 8.0, "b": 4.0, "c": 1.0, "d": 0.5}
    costs = {"a": 50.0, "b": 10.0, "c": 10.0, "d": 30.0}   # total 100
    assert choose_float_layers(sensitivity, costs, 0.0) == []
    assert choose_float_layers(sensitivity, costs, 0.1) == ["b"]            # 0.4/unit first
    assert choose_float_layers(sensitivity, costs, 0.25) == ["b", "c"]      # a would exceed
    assert choose_float_layers(sensitivity, costs, 0.7) == ["b", "a", "c"]  # 70 of 70 allowed
    for budget in (0.05, 0.15, 0.33, 0.61, 0.99):
        chosen = choose_float_layers(sensitivity, costs, budget)
        assert sum(costs[n] for n in chosen) <= budget * 100
    # a target SQNR stops as soon as the remaining predicted error reaches it
    remaining_after_b = sum(sensitivity.values()) - 4.0     # 9.5: -9.8 dB
    assert choose_float_layers(sensitivity, costs, 1.0, target_sqnr_db=-10.0) == ["b"]
    assert -10 * math.log10(remaining_after_b) > -10.0


def test_costs_in_weights_and_in_multiply_accumulates():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    batch = torch.randn(3, 2, 5, 5)
    names = ["0", "1", "3"]
    assert layer_costs(model, names, batch, "weights") == {"0": 72.0, "1": 16.0, "3": 300.0}
    # per sample: 18 products for each of 4 x 25 outputs; 4 x 100; 100 x 3
    assert layer_costs(model, names, batch, "macs") == {"0": 1800.0, "1": 400.0, "3": 300.0}
