"""verify_onnx: run an exported file in onnxruntime beside the PyTorch model, judged three ways.

1. **Every Q/DQ pair, bit for bit.** Each quantization point's values, captured from the PyTorch
   run (plus probe values: every grid point, every tie, the overflow tie, values that flush to
   zero, +-Inf, NaN), go through that point's own nodes taken from the file; the result must
   equal :func:`hfp8.fake_quantize` with ``rtol=0, atol=0``.
2. **Every quantized Conv/Linear, up to summation order.** The layer's nodes from the file are
   replayed on the input PyTorch gave the layer (first batch). Both runtimes then multiply the
   same FP8 values exactly; only the order of the float32 sums differs. For a sum of ``n``
   products the float32 result lies within ``gamma_n * sum|x_i w_i|`` of the exact one
   (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``, whatever the order; Higham, Accuracy and
   Stability, 3.1), so the two may differ by ``2 gamma_(n+1) * (|x| (*) |w| + |bias|)``,
   computed per output in float64 by the layer itself on ``|x|`` with ``|w|``.
3. **The whole model, as close as PyTorch is to itself.** A deep QDQ model is chaotic under
   float rounding: a value within an ulp of an FP8 rounding boundary moves a whole FP8 step,
   and the flips multiply layer after layer; no fixed tolerance fits every model. The yardstick
   is the model's own float64 run (same FP8 grids, exact sums): per sample, the squared
   deviation of onnxruntime from it must be no larger than that of PyTorch's float32 run, up
   to sampling noise (mean paired difference <= 3 standard errors). With the float model as
   ``reference``, the same test says onnxruntime is as faithful to the float model as PyTorch.
   **Floor**: a file whose every output lies within float32 noise of the float64 run (relative
   RMS deviation <= ``gamma_K``, the first-order bound of float32 evaluation over the model's
   accumulation length ``K``; :mod:`hfp8.export.noise_floor`) passes whatever the paired test says:
   when neither runtime flips an FP8 rounding, the paired test compares two float32 noises, and
   a runtime whose float kernels are a little less accurate than PyTorch's is not wrong.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import onnx
import torch

from hfp8.data.batches import calibration_batches
from hfp8.data.model_io import map_tensors, output_leaves, split_batch
from hfp8.export import noise_floor, onnx_replay
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.points import quant_points
from hfp8.ptq.recurrent import is_recurrent
from hfp8.ptq.quantizers import (
    layer_state,
    operand_sites,
    quantize_point,
    quantized_layers,
)

__all__ = ["verify_onnx", "probe_values", "passed", "summation_bound", "paired_test"]


def probe_values(fmt) -> torch.Tensor:
    """Hard cases for ``fmt`` (bias included): grid points, ties, overflow, flush, specials."""
    grid = fmt.grid().double()
    ties = (grid[1:] + grid[:-1]) / 2
    tiny = fmt.smallest_positive
    overflow_tie = fmt.max_finite + float(grid[-1] - grid[-2]) / 2  # rounds up past the max
    extremes = [fmt.max_finite * 1.5, fmt.max_finite * 1e3, overflow_tie, tiny / 2, tiny / 3,
                tiny * 0.75]
    extremes = torch.tensor(extremes + [-v for v in extremes] + [math.inf, -math.inf, math.nan])
    return torch.cat([grid, ties, extremes.double()]).float()


def _bitwise_mismatches(expected: np.ndarray, actual: np.ndarray) -> int:
    same = (expected.view(np.uint32) == actual.view(np.uint32)) | (np.isnan(expected) & np.isnan(actual))
    return int((~same).sum())


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


def passed(report: dict) -> bool:
    """The verdict: every pair bit-exact, every layer within its summation bound, the whole
    model as close to the float64 run as PyTorch's float32 run.

    Fidelity to the float model is reported, not judged on its own: by the triangle inequality
    onnxruntime's distance to the float model differs from PyTorch's by at most their distance
    to each other, which the whole-model test already bounds."""
    return bool(report["bit_exact"] and report["layers_exact"] and report["whole_model"]["passed"])


class _Pairs:
    """Runs captured values through each point's Q/DQ nodes from the file."""

    def __init__(self, model: onnx.ModelProto, points: dict, providers) -> None:
        self.points, self.sessions, self.results = points, {}, {}
        for name in points:
            pair = onnx_replay.pair_model(model, name)
            if pair is None:
                raise ValueError(f"no Q/DQ nodes for quantization point {name!r} in the file; "
                                 "was it exported from this model?")
            self.sessions[name] = (onnx_replay.session(pair, providers), pair.graph.input[0].name)
            self.results[name] = {"values": 0, "mismatches": 0}
            point = points[name]
            self.check(name, probe_values(point.fmt.with_bias(int(point.exponent_bias))))

    def check(self, name: str, x: torch.Tensor) -> None:
        point = self.points[name]
        values = x.detach().float().cpu().reshape(-1).contiguous()
        expected = quantize_point(values, point.fmt, point.exponent_bias.cpu(), name).numpy()
        ort_session, input_name = self.sessions[name]
        actual = ort_session.run(None, {input_name: values.numpy()})[0]
        self.results[name]["values"] += values.numel()
        self.results[name]["mismatches"] += _bitwise_mismatches(expected, actual)


def _install_taps(qmodel, pairs: _Pairs, captured: dict) -> None:
    for name, layer in quantized_layers(qmodel).items():
        state = layer_state(layer)

        def tap(x, name=name, check=state.input_format is not None):
            captured.setdefault(name, x.detach().clone())
            if check:
                pairs.check(name, x)
        state.tap = tap
    for _, site in operand_sites(qmodel).values():
        site.tap = lambda site, operand, x: pairs.check(f"{site.name}.{operand}", x)


def _abs_layer(layer):
    """The layer in float64 with |w| and |bias| (its own forward and input rounding stay)."""
    copied = copy.deepcopy(layer).double()
    layer_state(copied).tap = None
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.abs_()
    return copied


def _replay_layers(model: onnx.ModelProto, qmodel, captured: dict, providers,
                   model_inputs: dict) -> dict:
    results = {}
    recurrent = any(is_recurrent(layer) for layer in quantized_layers(qmodel).values())
    types = onnx_replay.value_types(model) if recurrent else {}
    pieces = {name: onnx_replay.layer_model(model, name, many=is_recurrent(layer), types=types)
              for name, layer in quantized_layers(qmodel).items() if name in captured}
    sizes = onnx_replay.values_of(model, list(dict.fromkeys(
        v.name for piece in pieces.values() if piece is not None
        for v in piece.graph.input[1:])), model_inputs, types, providers)
    for name, layer in quantized_layers(qmodel).items():
        if name not in captured:
            results[name] = {"checked": False, "reason": "did not run on the first batch"}
            continue
        recurrent = is_recurrent(layer)
        piece = pieces[name]
        if piece is None:
            results[name] = {"checked": False, "reason": "its nodes do not form a one-input, "
                             "one-output piece of the file (shared or split module)"}
            continue
        x = captured[name].float()
        if recurrent:
            results[name] = _replay_recurrent(piece, layer, x, providers, sizes)
            continue
        with torch.no_grad():
            expected = layer(x).double()
            magnitude = _abs_layer(layer)(x.abs().double())
        ort_session = onnx_replay.session(piece, providers)
        actual = onnx_replay.run(ort_session, {piece.graph.input[0].name: x.numpy()})[0].double()
        if actual.shape != expected.shape:
            results[name] = {"checked": False, "reason": f"shape {tuple(actual.shape)} in the "
                             f"file, {tuple(expected.shape)} in PyTorch"}
            continue
        terms = layer.weight.shape[1:].numel() + 1  # fan-in products and the bias
        allowed = summation_bound(terms) * magnitude
        excess = float(((actual - expected).abs() - allowed).max())
        results[name] = {"checked": True, "within_bound": excess <= 0,
                         "max_abs_diff": float((actual - expected).abs().max()),
                         "max_excess_over_bound": excess}
    return results


def _replay_recurrent(piece, layer, x: torch.Tensor, providers, sizes: dict) -> dict:
    """A recurrent layer's piece judged as the whole model is (a sum bound does not follow a
    recurrence through its gates): its outputs no further from the layer's float64 run than
    PyTorch's float32 run is (paired over output vectors: each step of each sequence, each
    final state), or within the float32 floor
    ``gamma_K``. Each file output is matched to the layer output of its shape (the closest of
    equal shapes: h_n and c_n). ``sizes``: the integer sizes the piece reads from elsewhere in
    the file (``h_0``'s batch size), from the whole file's run on the first batch."""
    exact = copy.deepcopy(layer).double()
    layer_state(exact).tap = None
    with torch.no_grad():
        ours = [t.double() for _, t in output_leaves(layer(x)) if t.is_floating_point()]
        with noise_floor.counted_terms(exact) as total:
            truth = [t for _, t in output_leaves(exact(x.double())) if t.is_floating_point()]
    feed = {piece.graph.input[0].name: x.numpy()}
    feed.update({v.name: sizes[v.name] for v in piece.graph.input[1:]})
    actual = onnx_replay.run(onnx_replay.session(piece, providers), feed)
    onnx_errors, torch_errors, worst, largest = [], [], 0.0, 0.0
    for value in (a.double() for a in actual):
        candidates = [i for i, t in enumerate(truth) if t.shape == value.shape]
        if not candidates:
            return {"checked": False, "reason": f"an output of shape {tuple(value.shape)} in "
                    "the file matches none of the layer's outputs"}
        index = min(candidates, key=lambda i: float((value - truth[i]).abs().max()))
        width = value.shape[-1] if value.dim() else 1  # one row per step and sequence
        onnx_errors.extend((value - truth[index]).square().reshape(-1, width).sum(1).tolist())
        torch_errors.extend((ours[index] - truth[index]).square().reshape(-1, width).sum(1).tolist())
        scale = float(truth[index].square().mean().sqrt()) or 1.0
        worst = max(worst, float((value - truth[index]).square().mean().sqrt()) / scale)
        largest = max(largest, float((value - ours[index]).abs().max()))
    paired = paired_test(onnx_errors, torch_errors)
    bound = noise_floor.relative_bound(max(total[0], 1))
    return {"checked": True, "within_bound": bool(paired["passed"] or worst <= bound),
            "max_abs_diff": largest,
            "relative_deviation_from_float64": worst, "float32_floor": bound,
            "paired_passed": paired["passed"]}


def _per_sample_errors(candidate: list, baseline: list, size: int) -> np.ndarray:
    """Per sample: sum over output leaves of ``|c - b|^2 / mean |b|^2`` (scale-free)."""
    total = np.zeros(size)
    for c, b in zip(candidate, baseline):
        c, b = c.double(), b.double()
        scale = float(b.square().mean()) or 1.0
        error = (c - b).square()
        per_sample = error.reshape(size, -1).sum(1) if b.dim() and b.shape[0] == size \
            else error.sum().expand(size) / size
        total += (per_sample / scale).numpy()
    return total


@torch.no_grad()
def verify_onnx(qmodel, path, samples, reference=None, providers=("CPUExecutionProvider",),
                quiet=True) -> dict:
    """Judge the ONNX file at ``path`` against ``qmodel`` on ``samples`` (an iterable of
    batches of any structure), optionally with the float ``reference`` model; see the module
    docstring. :func:`passed` turns the report into a verdict.

    The report: ``samples``; ``pairs`` (per quantization point: values checked, mismatches,
    ``bit_exact``) and ``bit_exact``; ``layers`` (per quantized layer: ``checked``,
    ``within_bound``, ``max_abs_diff``, ``max_excess_over_bound``) and ``layers_exact``;
    ``outputs`` (per output leaf, SQNR in dB and max |difference| of ``onnx_vs_torch``,
    ``onnx_vs_float64``, ``torch_vs_float64`` and, with a reference, ``onnx_vs_float`` and
    ``torch_vs_float``); ``whole_model`` (the paired test of onnxruntime's and PyTorch's squared
    deviations from the float64 run, ``paired_passed``; ``float32_floor``: the accumulation
    length, the bound, onnxruntime's worst relative RMS deviation over the outputs and whether
    it is within; ``passed`` if either holds) and, with a reference, ``fidelity`` (the same test against
    the float model's outputs; informative: closeness to the float64 run implies it).
    """
    model = onnx.load(str(path))
    ort_session = onnx_replay.session(model, providers)
    qmodel = copy.deepcopy(qmodel).eval().cpu().float()
    exact = copy.deepcopy(qmodel).double()
    pairs = _Pairs(model, quant_points(qmodel), providers)
    captured: dict = {}
    _install_taps(qmodel, pairs, captured)
    errors = {"onnx": [], "torch": [], "onnx_float": [], "torch_float": []}
    sums = {}
    count, terms = 0, 1
    for index, batch in enumerate(calibration_batches(samples, None, torch.device("cpu"),
                                                      "Verifying ONNX", quiet)):
        args, kwargs, _ = split_batch(qmodel, batch)
        named = output_leaves(qmodel(*args, **kwargs))
        leaves = [t.float() for _, t in named]
        if index == 0:
            for state in (layer_state(m) for m in quantized_layers(qmodel).values()):
                state.tap = None  # layer inputs of the first batch are enough for the replay
            _install_pair_taps_only(qmodel, pairs)
        inputs = onnx_replay.feed(ort_session, qmodel, args, kwargs)
        if index == 0:
            first_inputs = inputs
        actual = onnx_replay.run(ort_session, inputs)
        if len(actual) != len(leaves):
            raise ValueError(f"{path}: {len(actual)} outputs in the file, {len(leaves)} in PyTorch")
        double = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
        exact_args, exact_kwargs = map_tensors(args, double), map_tensors(kwargs, double)
        # K (the float32 floor's accumulation length) counted on the first batch's float64
        # forward, which runs anyway
        with noise_floor.counted_terms(exact) if index == 0 else contextlib.nullcontext() as total:
            truth = [t for _, t in output_leaves(exact(*exact_args, **exact_kwargs))]
        if index == 0:
            terms = max(total[0], 1)
        size = int(leaves[0].shape[0]) if leaves and leaves[0].dim() else 1
        errors["onnx"].extend(_per_sample_errors(actual, truth, size))
        errors["torch"].extend(_per_sample_errors(leaves, truth, size))
        if reference is not None:
            floats = [t for _, t in output_leaves(reference(*args, **kwargs))]
            errors["onnx_float"].extend(_per_sample_errors(actual, floats, size))
            errors["torch_float"].extend(_per_sample_errors(leaves, floats, size))
        pairs_of = {"onnx_vs_torch": (actual, leaves), "onnx_vs_float64": (actual, truth),
                    "torch_vs_float64": (leaves, truth)}
        if reference is not None:
            pairs_of.update(onnx_vs_float=(actual, floats), torch_vs_float=(leaves, floats))
        for comparison, (tests, references) in pairs_of.items():
            for (name, _), test, wanted in zip(named, tests, references):
                entry = sums.setdefault(name, {}).setdefault(comparison, [0.0, 0.0, 0.0])
                test, wanted = test.double(), wanted.double()
                entry[0] += float(wanted.square().sum())
                entry[1] += float((test - wanted).square().sum())
                entry[2] = max(entry[2], float((test - wanted).abs().max()) if test.numel() else 0.0)
        count += size
    if count < 2:
        raise ValueError("verify_onnx needs at least 2 samples: the whole-model check compares "
                         "per-sample deviations")
    layers = _replay_layers(model, qmodel, captured, providers, first_inputs)
    for result in pairs.results.values():
        result["bit_exact"] = result["mismatches"] == 0
    report = {
        "samples": count,
        "pairs": pairs.results,
        "bit_exact": all(r["bit_exact"] for r in pairs.results.values()),
        "layers": layers,
        "layers_exact": all(r.get("within_bound", True) for r in layers.values()),
        "outputs": {name: {comparison: {"sqnr_db": sqnr_db(signal, noise), "max_abs_diff": largest}
                           for comparison, (signal, noise, largest) in entries.items()}
                    for name, entries in sums.items()},
        "whole_model": _whole_model(paired_test(errors["onnx"], errors["torch"]), sums, terms),
    }
    if reference is not None:
        report["fidelity"] = paired_test(errors["onnx_float"], errors["torch_float"])
    return report


def _whole_model(paired: dict, sums: dict, terms: int) -> dict:
    """The paired test, passed also when every output is within the float32 floor."""
    bound = noise_floor.relative_bound(terms)
    worst = max((math.sqrt(noise / signal) if signal else (0.0 if noise == 0 else math.inf)
                 for entries in sums.values()
                 for signal, noise, _ in [entries["onnx_vs_float64"]]), default=0.0)
    floor = {"accumulation_length": terms, "relative_bound": bound,
             "sqnr_floor_db": sqnr_db(1.0, bound * bound),
             "onnx_relative_deviation": worst, "passed": worst <= bound}
    return {**paired, "paired_passed": paired["passed"], "float32_floor": floor,
            "passed": bool(paired["passed"] or floor["passed"])}


def _install_pair_taps_only(qmodel, pairs: _Pairs) -> None:
    for name, layer in quantized_layers(qmodel).items():
        if layer_state(layer).input_format is not None:
            layer_state(layer).tap = lambda x, name=name: pairs.check(name, x)
