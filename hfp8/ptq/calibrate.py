"""The calibration side of quantize_model: quantization points, passes that observe them, and
the input biases chosen from what was observed.

A *point* is one place where values get rounded: a quantized layer's input, or one operand of
an attention product. During a pass every point's values flow through unrounded and are shown
to an observer (and, in the analysis pass, to the layer's input-moment accumulator), while
BatchNorm layers normalize with batch statistics: activations as the re-estimated model will
see them.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from hfp8 import distributed
from hfp8._runs import runs_within
from hfp8.calibration.batchnorm import (
    batch_statistics,
    batchnorm_layers,
    reestimate_batchnorm,
)
from hfp8.calibration.input_moments import InputMoments, moment_bytes, supports
from hfp8.calibration.observers import HistogramObserver
from hfp8.data.batches import calibration_batches, model_device
from hfp8.data.model_io import batch_size, call_model, weight_sharing_copy
from hfp8.ptq.operand_sites import owners_closed
from hfp8.ptq.points import quant_points
from hfp8.ptq.prefix_replay import PrefixOutputs
from hfp8.ptq.quantizers import layer_state, quantized_layers

__all__ = ["analysis_pass", "moment_groups", "calibration_pass", "choose_input_biases",
           "refuse_non_finite"]


class _Seeing:
    """Shows each value to an observer and, for a layer, to its input-moment accumulator
    (then tells the pass's fence, if any, that the layer has been seen)."""

    def __init__(self, observer, moments=None, fence=None, name=None) -> None:
        self.observer, self.moments, self.fence, self.name = observer, moments, fence, name

    def observe(self, x: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.observe(x)
        if self.moments is not None:
            self.moments.observe(x)
            if self.fence is not None:
                self.fence.seen(self.name)


class _StopPass(BaseException):
    """Ends a forward pass early (a BaseException, so that a model's own ``except
    Exception`` does not swallow it)."""


class _Fence:
    """Stops a moments-only pass's forward as soon as every layer it measures has seen its
    input in the current batch: the rest of the model would compute nothing the pass keeps."""

    def __init__(self, names) -> None:
        self.names, self.pending = frozenset(names), set()

    def open(self) -> None:
        self.pending = set(self.names)

    def seen(self, name: str) -> None:
        self.pending.discard(name)
        if not self.pending:
            raise _StopPass


def analysis_pass(qmodel: nn.Module, batches, num_batches: int, moment_layers,
                  quiet: bool, observe: bool = True, stop_early: bool = False,
                  prefix: PrefixOutputs | None = None, cut: str | None = None
                  ) -> tuple[dict, dict]:
    """A short pass over the first ``num_batches`` batches: provisional observers for every
    point (``observe``), and the input second moments of the quantized Conv1d/2d and Linear
    layers named in ``moment_layers``. Nothing in the model changes. ``stop_early`` (moments
    only, for layers that run once per forward): each batch's forward ends as soon as every
    one of those layers has seen its input. ``prefix`` without ``cut``: the pass records the
    outputs that the later passes replay; with ``cut`` (the first layer of
    ``moment_layers``), the pass replays what was recorded before it
    (:mod:`hfp8.ptq.prefix_replay`)."""
    found = quant_points(qmodel)
    observers = {name: HistogramObserver() for name in found} if observe else {}
    layers = quantized_layers(qmodel)
    # seeded by the layer's position among all quantized layers, whichever pass measures it
    moments = {name: InputMoments(layer, seed=index) for index, (name, layer)
               in enumerate(layers.items()) if name in moment_layers and supports(layer)}
    # every point passes its values unrounded, observed or not: a moments-only pass sees the
    # activations the first pass saw (a point left alone would round at its provisional bias)
    states = {name: layer_state(layer) for name, layer in layers.items()
              if name in found or name in moments}
    fence = _Fence(moments) if stop_early and moments and not observe else None
    try:
        for name, state in states.items():
            state.observer = _Seeing(observers.get(name), moments.get(name), fence, name)
        for name, point in found.items():
            if name not in layers:
                point.attach_observer(_Seeing(observers.get(name)))
        device = model_device(qmodel)
        title = "Second moments and sensitivity data" if observe else "Second moments"
        replay = contextlib.nullcontext() if prefix is None else \
            prefix.replaying(cut) if cut is not None else prefix.recording()
        with batch_statistics([qmodel]), torch.no_grad(), replay:
            for batch in calibration_batches(batches, num_batches, device, title, quiet):
                if fence is not None:
                    fence.open()
                try:
                    with owners_closed():  # the stop skips attention owners' closing hooks
                        call_model(qmodel, batch)
                except _StopPass:
                    pass
                else:
                    if prefix is not None and cut is None:
                        prefix.batch_done()
    finally:
        for state in states.values():
            state.observer = None
        for point in found.values():
            point.attach_observer(None)
    for observer in observers.values():  # every rank: what all ranks' batches showed
        observer.reduce()
    for accumulated in moments.values():
        accumulated.reduce()
    return observers, moments


def moment_groups(qmodel: nn.Module, limit: int, order=()) -> list[list[str]]:
    """The quantized layers with second moments, in model order (those named in ``order``, the
    order of first calls, first; the rest in registration order), cut into groups whose float64
    moments stay under ``limit`` bytes together (a layer alone may exceed it), returned **last
    group first**: one analysis pass per group bounds the memory the moments take, whatever the
    model's size. Measured from the end, every group's inputs come from layers still rounded
    to nearest, as in a single pass, so the weights are the single pass's. The groups are cut
    from the end too, so that the last group, which the first (whole) pass measures, is full
    and the remainder sits at the front: each later pass costs about its own group's share of
    the forward (it replays what comes before and stops after), so the passes after the first
    cost the share of all but the last group."""
    layers = {name: layer for name, layer in quantized_layers(qmodel).items() if supports(layer)}
    ordered = [name for name in order if name in layers]
    named = set(ordered)
    ordered += [name for name in layers if name not in named]
    groups = runs_within(ordered[::-1], lambda name: moment_bytes(layers[name]), limit)
    return [group[::-1] for group in groups] or [[]]  # no such layer: one pass, for observers


def calibration_pass(qmodel, model, calibration, config, quiet):
    """The main pass: BN statistics (if asked) and observers. Returns the observers, the BN
    report and the number of samples seen."""
    found = quant_points(qmodel) if config.activation_format is not None else {}
    has_bn = bool(batchnorm_layers(model)) and config.bn_recalibration != "none"
    observers = {name: HistogramObserver() for name in found}  # one shared draw per batch
    bn_report, samples = None, 0
    try:
        for name, observer in observers.items():
            found[name].attach_observer(observer)  # values pass through unrounded, observed
        if has_bn:
            bn_report = reestimate_batchnorm(
                qmodel, calibration, config.num_calibration_batches,
                method=config.bn_recalibration, quiet=quiet,
                # a private copy (weights shared, read only): even temporary flag changes never
                # touch the caller's model
                reference=weight_sharing_copy(model) if config.bn_recalibration == "shift"
                else None,
                measure_every=config.bn_shift_stride if config.bn_recalibration == "shift" else 1)
            samples = bn_report["samples"]
        elif observers:
            device = model_device(qmodel)
            with torch.no_grad():
                for batch in calibration_batches(calibration, config.num_calibration_batches,
                                                 device, "Calibrating input biases", quiet):
                    call_model(qmodel, batch)
                    samples += batch_size(batch)
    finally:
        for point in found.values():
            point.attach_observer(None)
    for observer in observers.values():  # every rank: what all ranks' batches showed
        observer.reduce()
    if bn_report is None:
        samples = int(distributed.all_reduce(torch.tensor(samples, dtype=torch.int64)))
    return observers, bn_report, samples


def refuse_non_finite(observers: dict) -> None:
    """NaN or Inf seen at a point is an error naming it: no model is made from it."""
    for name, observer in observers.items():
        if observer.num_non_finite:
            raise ValueError(f"the input of {name!r} held {observer.num_non_finite} NaN or Inf "
                             f"values during calibration (of {observer.num_values}); a model is "
                             "not made from that (check the samples and the model's weights)")


def choose_input_biases(qmodel, observers, config, warn: bool = True) -> dict[str, dict]:
    """Sets each point's bias from its observer; returns the observer summaries."""
    found = quant_points(qmodel)
    refuse_non_finite(observers)
    summaries = {}
    for name, observer in observers.items():
        if name not in found:
            continue
        fmt = found[name].fmt
        if observer.num_calls == 0:
            if warn:
                warnings.warn(f"{name!r} never ran during calibration; its input keeps the "
                              f"format's own bias {fmt.exponent_bias}", stacklevel=3)
            summaries[name] = {"warning": "never ran during calibration"}
            continue
        bias = observer.exponent_bias(fmt, config.activation_bias_method)
        found[name].exponent_bias.fill_(bias)
        summaries[name] = observer.summary(fmt.with_bias(bias))
    return summaries
