"""Per-layer sensitivity: how much of the model's output error each quantized layer causes, and
which layers to keep in float within a budget.

**Estimate (first order, one forward and one backward pass).** Quantizing layer ``L`` alone
adds ``n_L = q_L(x) - f_L(x)`` to its output (``q_L``: the layer with its FP8 weight and input
rounding, ``f_L``: the float layer, on the float model's own input ``x``); to first order the
model output moves by ``J_L n_L``. With a random projection ``v ~ N(0, I)`` of the outputs (each
output leaf scaled by its RMS, so that leaves of different scales count alike),
``E_v[(v^T J_L n_L)^2] = |J_L n_L|^2``. Injecting ``n_L`` with a per-sample scalar ``e_L = 0``
and back-propagating ``v^T output`` gives ``v^T J_L n_L`` as the gradient of ``e_L``, for every
layer at once. The mean over samples of its square, per output element, is the predicted
noise-to-signal ratio of "only this layer quantized"; ``-10 log10`` of it is the predicted output
SQNR in dB. ``benchmarks/sensitivity_ranking.py`` measures how well it ranks layers against
quantizing each layer alone.

**Selection.** :func:`choose_float_layers` keeps the layers with the most predicted error per
unit of cost (weights or multiply-accumulates) in float, most harmful first, while the total
cost stays within the budget (a fraction of all quantized layers' cost; never exceeded), or
until the predicted output SQNR (independent errors add) reaches a target.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from hfp8 import distributed
from hfp8.data.batches import calibration_batches, current_batch, model_device
from hfp8.data.model_io import (
    batch_size,
    call_model,
    output_leaves,
    slice_batch,
    weight_sharing_copy,
)
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.recurrent import is_recurrent, weight_names

__all__ = ["layer_sensitivity", "choose_float_layers", "layer_costs", "predicted_sqnr_db"]


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
                first = _float_leaves(output)[0]  # (steps, batch, features) or packed (rows, features)
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


def _float_leaves(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if torch.is_tensor(leaf) and leaf.is_floating_point()]


def layer_sensitivity(model: nn.Module, qmodel: nn.Module, names: list[str], batches,
                      num_batches: int = 1, seed: int = 0, quiet: bool = True,
                      max_samples: int | None = None) -> dict[str, float]:
    """Predicted noise-to-signal ratio of the outputs when only layer ``name`` of ``qmodel`` is
    quantized (see the module docstring), for each name. ``model``: the float model; at most
    ``max_samples`` samples of each batch are used."""
    # parameters need no gradient: autograd then records only what follows an injection point
    # (they share the float model's storage: no third copy of the weights)
    reference = weight_sharing_copy(model).eval()
    quantized = {name: qmodel.get_submodule(name) for name in names}
    generator = torch.Generator().manual_seed(seed)
    totals = {name: 0.0 for name in names}
    elements = 0
    device = model_device(reference)
    # a bar per layer, not per batch: one batch of large images can take many seconds, and a
    # bar that sits at 0/1 for all of it looks hung (issue 20)
    bar = tqdm(total=len(names), desc="Layer sensitivity", unit="layer", disable=quiet,
               leave=False, dynamic_ncols=True)
    try:
        for batch in calibration_batches(batches, num_batches, device, "", quiet=True):
            bar.reset(total=len(names))
            bar.set_postfix_str(f"batch {current_batch() + 1}, forward")
            elements += _accumulate(reference, quantized, names, batch, generator, seed,
                                    max_samples, totals, bar)
    finally:
        bar.close()
    summed = distributed.all_reduce(torch.tensor([totals[n] for n in names] + [float(elements)],
                                                dtype=torch.float64))  # all ranks' batches
    per_element = max(float(summed[-1]), 1.0)
    return {name: float(value) / per_element for name, value in zip(names, summed[:-1])}


def _accumulate(reference, quantized, names, batch, generator, seed, max_samples, totals,
                bar) -> int:
    """One batch of :func:`layer_sensitivity`: adds each layer's squared projected error to
    ``totals``; returns the number of output elements it covered."""
    generator.manual_seed(seed * 1_000_003 + current_batch())  # the same on any rank
    if max_samples is not None:
        batch = slice_batch(batch, max_samples)
    scales = {}

    def inject(name):
        def hook(module, args, output):
            leaves, spec = tree_flatten(output)
            # one scalar per row of dim 0 of each float output (a recurrent layer's sequence
            # and its final states alike)
            floats = [i for i, leaf in enumerate(leaves)
                      if torch.is_tensor(leaf) and leaf.is_floating_point()]
            with torch.no_grad():
                noises = [q - leaves[i] for i, q in
                          zip(floats, _float_leaves(quantized[name](*args)))]
            rows = [leaves[i].shape[0] if leaves[i].dim() else 1 for i in floats]
            scale = torch.zeros(sum(rows), device=noises[0].device, requires_grad=True)
            scales[name] = scale
            bar.update(1)
            for i, part, noise in zip(floats, scale.split(rows), noises):
                shape = (-1, *([1] * (noise.dim() - 1))) if noise.dim() else ()
                leaves[i] = leaves[i] + part.reshape(shape) * noise
            return tree_unflatten(leaves, spec)
        return hook
    handles = [reference.get_submodule(n).register_forward_hook(inject(n)) for n in names]
    try:
        with torch.enable_grad():
            leaves = [t for _, t in output_leaves(call_model(reference, batch))
                      if t.is_floating_point() and t.requires_grad]
    finally:
        for handle in handles:
            handle.remove()
    projection = 0.0
    for leaf in leaves:
        rms = leaf.detach().double().square().mean().sqrt().clamp_min(1e-30).float()
        noise = torch.randn(leaf.shape, generator=generator).to(leaf.device)
        projection = projection + (noise * leaf).sum() / rms
    inputs = [scales[n] for n in names if n in scales]
    bar.set_postfix_str(f"batch {current_batch() + 1}, backward")
    if torch.is_tensor(projection) and projection.requires_grad:
        gradients = torch.autograd.grad(projection, inputs, allow_unused=True)
    else:  # no output depends on a quantized layer (their results were discarded)
        gradients = [None] * len(inputs)
    for name, gradient in zip([n for n in names if n in scales], gradients):
        if gradient is not None:
            totals[name] += float(gradient.double().square().sum())
    return sum(leaf[0].numel() if leaf.dim() else 1 for leaf in leaves) * (
        leaves[0].shape[0] if leaves and leaves[0].dim() else 1)


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
