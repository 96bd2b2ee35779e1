"""verify_onnx: run an exported file in onnxruntime beside the PyTorch model, judged three ways.

1. **Every Q/DQ pair, bit for bit.** Each quantization point's values, captured from the PyTorch
   run (plus probe values: every grid point, every tie, the overflow tie, values that flush to
   zero, +-Inf, NaN), go through that point's own nodes taken from the file; the result must
   equal :func:`hfp8.fake_quantize` with ``rtol=0, atol=0``.
2. **Every quantized Conv/Linear, up to summation order** (:mod:`hfp8.export.layer_replay`;
   recurrent layers against their own float64 run). The layer's nodes from the file are
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
from tqdm.auto import tqdm

from hfp8.data.batches import calibration_batches
from hfp8.data.model_io import map_tensors, output_leaves, split_batch
from hfp8.export import noise_floor, onnx_replay
from hfp8.export.layer_replay import paired_test, replay_layers, summation_bound
from hfp8.export.verify_models import tap_holders, verification_model
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.operand_sites import operand_sites, owners_closed
from hfp8.ptq.points import quant_points
from hfp8.ptq.quantizers import layer_state, quantize_point, quantized_layers
from hfp8.ptq.recurrent import is_recurrent

__all__ = ["verify_onnx", "probe_values", "passed", "summation_bound", "paired_test",
           "PAIR_VALUES", "REPLAY_VALUES"]

# Work per point and per layer is bounded whatever the batch: at most PAIR_VALUES of a point's
# values per batch go through its Q/DQ pair (evenly strided over the tensor; the probe values
# always go), and a layer is replayed on the leading rows of its first-batch input, at most
# REPLAY_VALUES values (at least one row).
PAIR_VALUES = 1 << 18
REPLAY_VALUES = 1 << 18


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


def passed(report: dict) -> bool:
    """The verdict: every pair bit-exact, every layer within its summation bound, the whole
    model as close to the float64 run as PyTorch's float32 run.

    Fidelity to the float model is reported, not judged on its own: by the triangle inequality
    onnxruntime's distance to the float model differs from PyTorch's by at most their distance
    to each other, which the whole-model test already bounds."""
    return bool(report["bit_exact"] and report["layers_exact"] and report["whole_model"]["passed"])


class _Pairs:
    """Runs captured values through each point's Q/DQ nodes from the file: the values of one
    batch are collected per point (:meth:`check`) and go through every pair in one run of one
    session (:meth:`flush`)."""

    def __init__(self, index: onnx_replay.FileIndex, points: dict, providers) -> None:
        self.points, self.results, self.pending = points, {}, {}
        pieces = {}
        for name in points:
            pieces[name] = onnx_replay.pair_model(index.model, name, index)
            if pieces[name] is None:
                raise ValueError(f"no Q/DQ nodes for quantization point {name!r} in the file; "
                                 "was it exported from this model?")
            self.results[name] = {"values": 0, "mismatches": 0}
        self.pieces = onnx_replay.Pieces(pieces, providers) if pieces else None
        for name, point in points.items():
            self.check(name, probe_values(point.fmt.with_bias(int(point.exponent_bias))))
        self.flush()

    def check(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        step = max(1, -(-flat.numel() // PAIR_VALUES))
        # a copy: the model may change its input in place before the batch ends
        self.pending.setdefault(name, []).append(flat[::step].float().cpu().clone())

    def flush(self) -> None:
        if self.pieces is None:
            return
        values = {name: torch.cat(self.pending.get(name, [torch.empty(0)])).contiguous()
                  for name in self.points}
        self.pending = {}
        actual = self.pieces.run({name: [v.numpy()] for name, v in values.items()})
        for name, v in values.items():
            point = self.points[name]
            expected = quantize_point(v, point.fmt, point.exponent_bias.cpu(), name).numpy()
            self.results[name]["values"] += v.numel()
            self.results[name]["mismatches"] += _bitwise_mismatches(expected, actual[name][0])


def _install_taps(qmodel, pairs: _Pairs, captured: dict) -> None:
    for name, layer in quantized_layers(qmodel).items():
        state = layer_state(layer)

        def tap(x, name=name, check=state.input_format is not None, layer=layer):
            if name not in captured:
                captured[name] = _replay_input(layer, x.detach()).clone()
            if check:
                pairs.check(name, x)
        state.tap = tap
    for _, site in operand_sites(qmodel).values():
        site.tap = lambda site, operand, x: pairs.check(f"{site.name}.{operand}", x)


def _replay_input(layer, x: torch.Tensor) -> torch.Tensor:
    """The leading rows of ``x`` holding at most ``REPLAY_VALUES`` values (at least one row).
    A Linear acts on the last dimension and a batched convolution on each sample, so any
    leading rows are a valid input; a recurrent layer (whose piece reads the batch size from
    the rest of the file) and an unbatched convolution input keep their whole input."""
    batched = x.dim() >= 2 if isinstance(layer, torch.nn.Linear) else \
        not is_recurrent(layer) and x.dim() == layer.weight.dim()
    if not batched or x.numel() <= REPLAY_VALUES:
        return x
    return x[:max(1, REPLAY_VALUES // (x.numel() // x.shape[0]))]


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
@owners_closed()
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
    with verification_model(qmodel) as tapped:
        return _verify(tapped, path, samples, reference, providers, quiet)


def _verify(qmodel, path, samples, reference, providers, quiet) -> dict:
    """:func:`verify_onnx` on ``qmodel`` (CPU, float32, eval mode; its taps are set here and
    put back by the caller). First the runs beside the file (PyTorch float32 with the pairs
    checked, onnxruntime, the float reference), then the float64 runs: the file's sessions and
    the model's float64 copy are never in memory at once (the outputs of every batch are kept
    in between)."""
    file_index = onnx_replay.FileIndex(onnx.load(str(path)))  # once: pieces cut in linear time
    runs, pairs, captured, first_inputs = _runs_beside_the_file(
        qmodel, path, file_index, samples, reference, providers, quiet)
    for holder in tap_holders(qmodel):
        holder.tap = None  # the float64 copy runs without them
    exact = copy.deepcopy(qmodel).double()
    errors = {"onnx": [], "torch": [], "onnx_float": [], "torch_float": []}
    sums = {}
    count, terms = 0, 1
    double = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    float64_runs = tqdm(runs, desc="Verifying ONNX (float64 runs)", unit="batch", disable=quiet,
                        leave=False, dynamic_ncols=True)
    for index, (args, kwargs, names, leaves, actual, floats) in enumerate(float64_runs):
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
        if floats is not None:
            errors["onnx_float"].extend(_per_sample_errors(actual, floats, size))
            errors["torch_float"].extend(_per_sample_errors(leaves, floats, size))
        pairs_of = {"onnx_vs_torch": (actual, leaves), "onnx_vs_float64": (actual, truth),
                    "torch_vs_float64": (leaves, truth)}
        if floats is not None:
            pairs_of.update(onnx_vs_float=(actual, floats), torch_vs_float=(leaves, floats))
        for comparison, (tests, references) in pairs_of.items():
            for name, test, wanted in zip(names, tests, references):
                entry = sums.setdefault(name, {}).setdefault(comparison, [0.0, 0.0, 0.0])
                test, wanted = test.double(), wanted.double()
                entry[0] += float(wanted.square().sum())
                entry[1] += float((test - wanted).square().sum())
                entry[2] = max(entry[2], float((test - wanted).abs().max()) if test.numel() else 0.0)
        count += size
        runs[index] = None  # this batch's outputs are no longer needed
    if count < 2:
        raise ValueError("verify_onnx needs at least 2 samples: the whole-model check compares "
                         "per-sample deviations")
    del exact  # the replay's sessions come next: not beside it
    layers = replay_layers(file_index, qmodel, captured, providers, first_inputs)
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


def _runs_beside_the_file(qmodel, path, file_index, samples, reference, providers, quiet):
    """Each batch through ``qmodel`` (its Q/DQ pairs checked on the way, its layers' inputs
    captured on the first batch), the file (a default session) and ``reference``. Returns
    (per batch: inputs, output names, float32 outputs, onnxruntime's, the reference's or None;
    the pairs; the captured inputs; the file's inputs on the first batch); the sessions are
    freed on return."""
    ort_session = onnx_replay.session(path, providers)  # the file as written (no proto copy)
    pairs = _Pairs(file_index, quant_points(qmodel), providers)
    captured: dict = {}
    _install_taps(qmodel, pairs, captured)
    runs, first_inputs = [], None
    for index, batch in enumerate(calibration_batches(samples, None, torch.device("cpu"),
                                                      "Verifying ONNX", quiet)):
        args, kwargs, _ = split_batch(qmodel, batch)
        named = output_leaves(qmodel(*args, **kwargs))
        pairs.flush()
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
        floats = None if reference is None else \
            [t for _, t in output_leaves(reference(*args, **kwargs))]
        runs.append((args, kwargs, [name for name, _ in named], leaves, actual, floats))
    pairs.pieces = None  # every batch is checked: its session can go
    return runs, pairs, captured, first_inputs


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
