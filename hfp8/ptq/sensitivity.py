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

Which layers then stay float: :mod:`hfp8.ptq.float_budget`.
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
from hfp8.ptq.saved_tensors import SavedTensors

__all__ = ["layer_sensitivity", "SAVED_BYTES"]

# What autograd may save for one backward of the estimate (activations after the first
# injected layer): past it, the batch's samples run in chunks (see _accumulate).
SAVED_BYTES = 128 << 20
# Samples of each batch the first forward takes; what autograd saves for them sets the chunks
# (one: the 150M decoder saves 110 MiB per sample of 128 tokens; a forward without gradient on
# two tells an output with a row per sample from one reduced over the batch).
FIRST_SAMPLES = 1


def _float_leaves(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if torch.is_tensor(leaf) and leaf.is_floating_point()]


def _rows(floats) -> list[int]:
    """Rows of dim 0 of each float output leaf (1 for a scalar): one scale each in the
    injection, and what tells a per-sample layer."""
    return [leaf.shape[0] if leaf.dim() else 1 for leaf in floats]


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

    Autograd keeps every activation after the first injection for the backward. The first
    ``FIRST_SAMPLES`` run first, and what autograd saves for them is counted (a forward without
    gradient on one more sample tells whether the model is per-sample); the rest run in
    chunks that keep it within ``SAVED_BYTES``, each its own forward and backward, with the
    projection drawn for the whole batch as one forward draws it and each output scaled by the
    whole batch's RMS (one output: its squared gradients are divided by it at the end;
    several: a forward without gradient measures them first). The same sums, up to float
    rounding, for a model whose samples do not interact; a model whose outputs or layer
    outputs are not one row per sample runs the whole batch in one forward."""
    generator.manual_seed(seed * 1_000_003 + current_batch())  # the same on any rank
    if max_samples is not None:
        batch = slice_batch(batch, max_samples)
    samples = batch_size(batch)
    first = min(FIRST_SAMPLES, samples)
    rows = []  # rows of dim 0 of each injected output: one per sample in a per-sample model
    with SavedTensors(reference) as probe:
        leaves, scales = _injected_forward(reference, quantized, names,
                                           slice_batch(batch, first), bar, rows)
    per_sample = first == samples or _one_row_per_sample(reference, names, batch, first + 1,
                                                         rows, leaves, first)
    if first < samples and not per_sample:  # the whole batch in one forward
        probe.release()
        del leaves, scales
        bar.reset(total=len(names))
        leaves, scales = _injected_forward(reference, quantized, names, batch, bar)
    if first == samples or not per_sample:
        rms = {path: _rms(leaf.detach()) for path, leaf in leaves.items()}
        noises = {path: _noise(leaf.shape, generator, leaf.device) for path, leaf in leaves.items()}
        _add_gradients(leaves, scales, rms, noises, names, totals, bar)
        probe.release()
        return _elements([leaf.shape for leaf in leaves.values()])
    chunk = max(1, SAVED_BYTES * first // max(probe.bytes, 1))
    noises = {path: _noise((samples, *leaf.shape[1:]), generator, leaf.device)
              for path, leaf in leaves.items()}
    # one output: project unscaled and divide by its mean square at the end
    after_the_fact = len(leaves) <= 1
    squares = {path: 0.0 for path in leaves}
    rms = {path: torch.ones((), device=leaf.device) for path, leaf in leaves.items()} \
        if after_the_fact else _rms_in_chunks(reference, batch, samples, chunk, leaves)
    unscaled = {name: 0.0 for name in names}
    start = 0
    while True:
        for path, leaf in leaves.items() if after_the_fact else ():
            squares[path] += float(leaf.detach().double().square().sum())
        _add_gradients(leaves, scales, rms, {path: noises[path][start:start + len(leaf)]
                                              for path, leaf in leaves.items()},
                       names, unscaled, bar)
        probe.release()
        start += first if start == 0 else chunk
        if start >= samples:
            break
        bar.reset(total=len(names))
        bar.set_postfix_str(f"batch {current_batch() + 1}, samples {start + 1}-"
                            f"{min(start + chunk, samples)} of {samples}")
        leaves, scales = _injected_forward(reference, quantized, names,
                                           slice_batch(batch, chunk, start), bar)
    if after_the_fact and noises:  # (g / rms)^2 = g^2 / rms^2
        (path, noise), = noises.items()
        rms_squared = float(_rms_of_mean_square(squares[path] / max(noise.numel(), 1))) ** 2
        unscaled = {name: value / rms_squared for name, value in unscaled.items()}
    for name, value in unscaled.items():
        totals[name] += value
    return _elements([noise.shape for noise in noises.values()])


def _rms_in_chunks(reference, batch, samples: int, chunk: int, leaves: dict) -> dict:
    """The whole batch's RMS of each output in ``leaves``, run ``chunk`` samples at a time
    without gradient."""
    squares, counts = dict.fromkeys(leaves, 0.0), dict.fromkeys(leaves, 0)
    with torch.no_grad():
        for start in range(0, samples, chunk):
            outputs = dict(output_leaves(call_model(reference, slice_batch(batch, chunk, start))))
            for path in leaves:
                squares[path] += float(outputs[path].double().square().sum())
                counts[path] += outputs[path].numel()
    return {path: _rms_of_mean_square(squares[path] / max(counts[path], 1)).to(leaf.device)
            for path, leaf in leaves.items()}


def _one_row_per_sample(reference, names, batch, count: int, rows_seen: list, leaves: dict,
                        samples: int) -> bool:
    """Whether every injected output and every output of the model has one row of dim 0 per
    sample: ``rows_seen`` and ``leaves`` (the outputs by path) are what one forward on
    ``samples`` samples gave, and the model runs once more, without gradient, on the batch's
    first ``count`` samples (``count`` > samples: an output or a layer reduced over the batch
    keeps its row count)."""
    rows = []

    def hook(module, args, output):
        rows.extend(_rows(_float_leaves(output)))
    handles = [reference.get_submodule(n).register_forward_hook(hook) for n in names]
    try:
        with torch.no_grad():
            outputs = dict(output_leaves(call_model(reference, slice_batch(batch, count))))
    finally:
        for handle in handles:
            handle.remove()
    return len(rows) == len(rows_seen) and all(r == count for r in rows) and \
        all(r == samples for r in rows_seen) and \
        all(leaf.dim() and leaf.shape[0] == samples and path in outputs and
            outputs[path].dim() and outputs[path].shape[0] == count
            for path, leaf in leaves.items())


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
            rows = _rows([leaves[i] for i in floats])
            scale = torch.zeros(sum(rows), dtype=noises[0].dtype, device=noises[0].device,
                                requires_grad=True)  # a float64 model: float64 gradients
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
    return _rms_of_mean_square(float(leaf.double().square().mean()))


def _rms_of_mean_square(mean_square: float) -> torch.Tensor:
    """:func:`_rms` of a leaf whose mean square (float64) is ``mean_square``."""
    return torch.tensor(mean_square, dtype=torch.float64).sqrt().clamp_min(1e-30).float()


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


def _elements(shapes) -> int:
    """Output elements of the whole batch (shapes of its outputs): per sample, times the
    samples."""
    return sum(math.prod(shape[1:]) if len(shape) else 1 for shape in shapes) * (
        shapes[0][0] if shapes and len(shapes[0]) else 1)
