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

__all__ = ["layer_sensitivity", "choose_float_layers", "layer_costs", "predicted_sqnr_db",
           "SAVED_BYTES"]

# What autograd may save for one backward of the estimate (activations after the first
# injected layer): past it, the batch's samples run in chunks (see _accumulate).
SAVED_BYTES = 128 << 20


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
    ``totals``; returns the number of output elements it covered.

    Autograd keeps every activation after the first injection for the backward: when that
    would pass ``SAVED_BYTES`` (measured on one sample), the samples run in chunks, each its
    own forward and backward, with the projection drawn and the output RMS taken over the whole
    batch as in one forward (a forward without gradient gives the outputs first). The same
    sums, up to float rounding, for a model whose samples do not interact."""
    generator.manual_seed(seed * 1_000_003 + current_batch())  # the same on any rank
    if max_samples is not None:
        batch = slice_batch(batch, max_samples)
    samples = batch_size(batch)
    chunk = _samples_per_forward(reference, quantized, names, batch, samples)
    outputs = _outputs_in_chunks(reference, batch, samples, chunk) if chunk < samples else None
    if outputs is None:  # one forward and one backward
        leaves, scales = _injected_forward(reference, quantized, names, batch, bar)
        rms = {path: _rms(leaf.detach()) for path, leaf in leaves.items()}
        noises = {path: _noise(leaf.shape, generator, leaf.device) for path, leaf in leaves.items()}
        _add_gradients(leaves, scales, rms, noises, names, totals, bar)
        return _elements(leaves.values())
    rms, noises = {}, {}
    for start in range(0, samples, chunk):
        bar.reset(total=len(names))
        bar.set_postfix_str(f"batch {current_batch() + 1}, samples {start + 1}-"
                            f"{min(start + chunk, samples)} of {samples}")
        leaves, scales = _injected_forward(reference, quantized, names,
                                           slice_batch(batch, chunk, start), bar)
        if not noises:  # drawn as one forward would: the leaves that depend on a layer, in order
            rms = {path: _rms(outputs[path]) for path in leaves}
            noises = {path: _noise(outputs[path].shape, generator, outputs[path].device)
                      for path in leaves}
        _add_gradients(leaves, scales, rms, {path: noises[path][start:start + chunk]
                                              for path in leaves}, names, totals, bar)
    return _elements(outputs[path] for path in noises)


def _outputs_in_chunks(reference, batch, samples: int, chunk: int) -> dict | None:
    """The reference's float outputs on the whole batch, run ``chunk`` samples at a time
    without gradient (for their RMS and the projection's shapes); None if an output does not
    hold one row per sample."""
    parts = []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            part = slice_batch(batch, chunk, start)
            floats = {path: t for path, t in output_leaves(call_model(reference, part))
                      if t.is_floating_point()}
            if not all(t.dim() and t.shape[0] == batch_size(part) for t in floats.values()):
                return None
            parts.append(floats)
    return {path: torch.cat([part[path] for part in parts]) for path in parts[0]}


def _samples_per_forward(reference, quantized, names, batch, samples: int) -> int:
    """How many samples one injected forward may take so that what autograd saves for its
    backward stays within ``SAVED_BYTES`` (measured on two samples, the weights not counted):
    all of them unless every output and every layer's output holds one row per sample (two
    samples tell a per-sample output from one reduced over the batch)."""
    if samples <= 1:
        return samples
    weights = {t.untyped_storage().data_ptr() for t in (*reference.parameters(),
                                                        *reference.buffers())}
    saved, kept = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        kept.append(tensor)  # alive through the forward: storage pointers stay unique
        # nothing: this forward is never back-propagated, and a graph holding an output it
        # saves would be a reference cycle through C++ that Python's collector cannot free
        return None
    rows = []  # rows of dim 0 of each injected output: one per sample in a per-sample model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda nothing: nothing):
        leaves, _ = _injected_forward(reference, quantized, names, slice_batch(batch, 2), None,
                                      rows)
    kept.clear()
    if not all(leaf.dim() and leaf.shape[0] == 2 for leaf in leaves.values()) or \
            any(count != 2 for count in rows):
        return samples
    return max(1, min(samples, 2 * SAVED_BYTES // max(sum(saved.values()), 1)))


def _injected_forward(reference, quantized, names, batch, bar, rows_seen: list | None = None):
    """The reference's forward on ``batch`` with each layer's quantization error injected
    behind a zero scale per output row: (float outputs that depend on an injection, by path;
    each layer's scale). ``rows_seen`` gets each injected output's row count."""
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
            if rows_seen is not None:
                rows_seen.extend(rows)
            if bar is not None:
                bar.update(1)
            for i, part, noise in zip(floats, scale.split(rows), noises):
                shape = (-1, *([1] * (noise.dim() - 1))) if noise.dim() else ()
                leaves[i] = leaves[i] + part.reshape(shape) * noise
            return tree_unflatten(leaves, spec)
        return hook
    handles = [reference.get_submodule(n).register_forward_hook(inject(n)) for n in names]
    try:
        with torch.enable_grad():
            leaves = {path: t for path, t in output_leaves(call_model(reference, batch))
                      if t.is_floating_point() and t.requires_grad}
    finally:
        for handle in handles:
            handle.remove()
    return leaves, scales


def _rms(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.double().square().mean().sqrt().clamp_min(1e-30).float()


def _noise(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


def _add_gradients(leaves, scales, rms, noises, names, totals, bar) -> None:
    """Back-propagates the projection ``sum_leaf (noise . leaf) / rms(leaf)`` to every
    layer's scale and adds the squared gradients to ``totals``."""
    projection = 0.0
    for path, leaf in leaves.items():
        projection = projection + (noises[path] * leaf).sum() / rms[path]
    injected = [n for n in names if n in scales]
    bar.set_postfix_str(f"batch {current_batch() + 1}, backward")
    if torch.is_tensor(projection) and projection.requires_grad:
        gradients = torch.autograd.grad(projection, [scales[n] for n in injected],
                                        allow_unused=True)
    else:  # no output depends on a quantized layer (their results were discarded)
        gradients = [None] * len(injected)
    for name, gradient in zip(injected, gradients):
        if gradient is not None:
            totals[name] += float(gradient.double().square().sum())


def _elements(leaves) -> int:
    """Output elements of the whole batch: per sample, times the samples."""
    leaves = list(leaves)
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
