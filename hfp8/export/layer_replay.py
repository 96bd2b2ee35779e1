"""Replaying each quantized layer's nodes from an exported file on the input PyTorch gave it
(check 2 of :func:`hfp8.export.verify.verify_onnx`), and the two statistics the checks share.

A Conv/Linear layer must match PyTorch up to summation order: for a sum of ``n`` products the
float32 result lies within ``gamma_n * sum|x_i w_i|`` of the exact one whatever the order, so
the two may differ by ``2 gamma_(n+1) (|x| (*) |w| + |bias|)``, computed per output in float64
by the layer itself on ``|x|`` with ``|w|``. A recurrent layer is judged like the whole model
(a summation bound does not follow a recurrence through its gates): no further from the
layer's own float64 run than PyTorch's float32 run, or within the float32 floor.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from hfp8._runs import runs_within
from hfp8.data.model_io import output_leaves
from hfp8.export import noise_floor, onnx_replay
from hfp8.ptq.quantizers import layer_state, quantized_layers
from hfp8.ptq.recurrent import is_recurrent

__all__ = ["replay_layers", "summation_bound", "paired_test", "PIECES_BYTES"]

# The most weights (serialized bytes) one replay session holds: pieces are replayed side by side
# in sessions of up to this size, so verification's memory does not grow with the model.
PIECES_BYTES = 256 << 20


def summation_bound(terms: int) -> float:
    """``2 gamma_terms``: how far two float32 sums of ``terms`` products may lie apart."""
    return 2 * noise_floor.relative_bound(terms)


def paired_test(candidate: list[float], baseline: list[float]) -> dict:
    """Is ``candidate`` no larger than ``baseline`` on average? Paired differences per sample;
    passes when their mean is at most 3 standard errors above zero."""
    difference = np.asarray(candidate, np.float64) - np.asarray(baseline, np.float64)
    mean = float(difference.mean()) if difference.size else 0.0
    error = float(difference.std(ddof=1) / math.sqrt(difference.size)) if difference.size > 1 else 0.0
    return {"candidate_mean": float(np.mean(candidate)) if candidate else 0.0,
            "baseline_mean": float(np.mean(baseline)) if baseline else 0.0,
            "mean_difference": mean, "standard_error": error, "passed": mean <= 3 * error}


def _abs_layer(layer):
    """The layer in float64 with |w| and |bias| (its own forward and input rounding stay)."""
    copied = copy.deepcopy(layer).double()
    layer_state(copied).tap = None
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.abs_()
    return copied


def replay_layers(index: onnx_replay.FileIndex, qmodel, captured: dict, providers,
                  model_inputs: dict) -> dict:
    """Per quantized layer of ``qmodel``: its piece of the file (``index``) replayed on
    ``captured[name]`` (its input on the first batch) and judged; ``model_inputs``: the whole
    file's inputs on that batch (for the sizes a recurrent piece reads)."""
    results = {}
    model = index.model
    layers = quantized_layers(qmodel)
    recurrent = {name for name, layer in layers.items() if is_recurrent(layer)}
    types = onnx_replay.value_types(model) if recurrent else {}
    pieces = {name: onnx_replay.layer_model(model, name, many=name in recurrent, types=types,
                                            index=index)
              for name in layers if name in captured}
    sizes = onnx_replay.values_of(model, list(dict.fromkeys(
        v.name for piece in pieces.values() if piece is not None
        for v in piece.graph.input[1:])), model_inputs, types, providers)
    checkable = {}
    for name in layers:
        if name not in captured:
            results[name] = {"checked": False, "reason": "did not run on the first batch"}
        elif pieces[name] is None:
            results[name] = {"checked": False, "reason": "its nodes do not form a one-input, "
                             "one-output piece of the file (shared or split module)"}
        else:
            checkable[name] = pieces[name]
    if not checkable:
        return results
    feeds = {name: [captured[name].float().numpy(),
                    *(sizes[v.name] for v in piece.graph.input[1:])]
             for name, piece in checkable.items()}
    outputs = {}
    # one session and one run per group of pieces holding at most PIECES_BYTES of weights
    for run in runs_within(checkable.items(), lambda item: item[1].ByteSize(), PIECES_BYTES):
        group = dict(run)
        outputs.update(onnx_replay.Pieces(group, providers).run({k: feeds[k] for k in group}))
    for name in checkable:
        layer, x = layers[name], captured[name].float()
        actual = [torch.from_numpy(np.asarray(value)).double() for value in outputs[name]]
        results[name] = (_judge_recurrent(layer, x, actual) if name in recurrent
                         else _judge_layer(layer, x, actual[0]))
    order = {name: index for index, name in enumerate(layers)}
    return dict(sorted(results.items(), key=lambda item: order[item[0]]))


def _judge_layer(layer, x: torch.Tensor, actual: torch.Tensor) -> dict:
    """The file's output of a Conv/Linear layer against the layer's float32 output, within
    the summation bound computed on ``|x|`` and ``|w|``."""
    with torch.no_grad():
        expected = layer(x).double()
        magnitude = _abs_layer(layer)(x.abs().double())
    if actual.shape != expected.shape:
        return {"checked": False, "reason": f"shape {tuple(actual.shape)} in the file, "
                f"{tuple(expected.shape)} in PyTorch"}
    terms = layer.weight.shape[1:].numel() + 1  # fan-in products and the bias
    allowed = summation_bound(terms) * magnitude
    excess = float(((actual - expected).abs() - allowed).max())
    return {"checked": True, "within_bound": excess <= 0,
            "max_abs_diff": float((actual - expected).abs().max()),
            "max_excess_over_bound": excess}


def _judge_recurrent(layer, x: torch.Tensor, actual: list[torch.Tensor]) -> dict:
    """A recurrent layer's piece judged as the whole model is (a sum bound does not follow a
    recurrence through its gates): its outputs no further from the layer's float64 run than
    PyTorch's float32 run is (paired over output vectors: each step of each sequence, each
    final state), or within the float32 floor
    ``gamma_K``. Each file output is matched to the layer output of its shape (the closest of
    equal shapes: h_n and c_n). The piece ran on ``x`` and on the integer sizes it reads from
    elsewhere in the file (``h_0``'s batch size, from the whole file's run on the first
    batch)."""
    exact = copy.deepcopy(layer).double()
    layer_state(exact).tap = None
    with torch.no_grad():
        ours = [t.double() for _, t in output_leaves(layer(x)) if t.is_floating_point()]
        with noise_floor.counted_terms(exact) as total:
            truth = [t for _, t in output_leaves(exact(x.double())) if t.is_floating_point()]
    onnx_errors, torch_errors, worst, largest = [], [], 0.0, 0.0
    for value in actual:
        candidates = [i for i, t in enumerate(truth) if t.shape == value.shape]
        if not candidates:
            return {"checked": False, "reason": f"an output of shape {tuple(value.shape)} in "
                    "the file matches none of the layer's outputs"}
        index = min(candidates, key=lambda i: float((value - truth[i]).abs().max()))
        width = value.shape[-1] if value.dim() else 1  # one row per step and sequence
        for errors, test in ((onnx_errors, value), (torch_errors, ours[index])):
            errors.extend((test - truth[index]).square().reshape(-1, width).sum(1).tolist())
        scale = float(truth[index].square().mean().sqrt()) or 1.0
        worst = max(worst, float((value - truth[index]).square().mean().sqrt()) / scale)
        largest = max(largest, float((value - ours[index]).abs().max()))
    paired = paired_test(onnx_errors, torch_errors)
    bound = noise_floor.relative_bound(max(total[0], 1))
    return {"checked": True, "within_bound": bool(paired["passed"] or worst <= bound),
            "max_abs_diff": largest,
            "relative_deviation_from_float64": worst, "float32_floor": bound,
            "paired_passed": paired["passed"]}
