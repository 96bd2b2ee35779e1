"""The calibration side of quantize_model: quantization points, passes that observe them, and
the input biases chosen from what was observed.

A *point* is one place where values get rounded: a quantized layer's input, or one operand of
an attention product. During the main pass every point's values flow through unrounded and are
shown to an observer, while BatchNorm layers normalize with batch statistics: activations as the
re-estimated model will see them. The analysis pass runs the float model the same way and shows
each quantized layer's input to an observer and to the layer's input-moment accumulator.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from hfp8.calibration import collective
from hfp8.calibration.batches import calibration_batches, model_device
from hfp8.calibration.batchnorm import (
    batch_statistics,
    batchnorm_layers,
    measuring_moments,
    recalibrate_batchnorm,
)
from hfp8.calibration.input_moments import InputMoments, supports
from hfp8.calibration.observers import HistogramObserver
from hfp8.model_io import batch_size, call_model
from hfp8.ptq.quantizers import layer_state, operand_sites, quantized_layers

__all__ = ["points", "analysis_pass", "calibration_pass", "choose_input_biases",
           "refuse_non_finite"]


def points(qmodel: nn.Module) -> dict[str, tuple]:
    """Every input quantization point: name -> (format, bias buffer owner, buffer name, setter
    of the observer slot)."""
    found = {}
    for name, layer in quantized_layers(qmodel).items():
        state = layer_state(layer)
        if state.input_format is not None:
            found[name] = (state.input_format, layer, "input_exponent_bias",
                           lambda observer, state=state: setattr(state, "observer", observer))
    for site_name, (owner, site) in operand_sites(qmodel).items():
        for operand in site.operands:
            found[f"{site_name}.{operand}"] = (
                site.fmt, owner, site.bias_buffer(operand),
                lambda observer, site=site, operand=operand: site.observers.__setitem__(operand, observer)
                if observer is not None else site.observers.pop(operand, None))
    return found


class _Seeing:
    """Shows each value to an observer and, for a layer, to its input-moment accumulator."""

    def __init__(self, observer, moments=None) -> None:
        self.observer, self.moments = observer, moments

    def observe(self, x: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.observe(x)
        if self.moments is not None:
            self.moments.observe(x)


def _observing_inputs(layer: nn.Module, seeing: _Seeing):
    """A forward pre-hook on a float layer: shows its input (first positional argument, or the
    first tensor passed by keyword) to ``seeing``."""
    def hook(module, args, kwargs):
        value = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        if value is not None:
            seeing.observe(value)
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def analysis_pass(qmodel: nn.Module, reference: nn.Module, batches, num_batches: int,
                  with_moments: bool, quiet: bool) -> tuple[dict, dict, tuple[dict, int]]:
    """A short pass of the float ``reference`` (a private copy of the float model, BatchNorm on
    batch statistics) over the first ``num_batches`` batches: provisional observers of the
    inputs of every layer quantized in ``qmodel``, and (``with_moments``) the input second
    moments of every such Conv1d/2d and Linear layer. The float model's activations differ from
    the quantized model's by the rounding noise only (~30 dB below), which moves neither second
    moments nor ranges noticeably, and this pass doubles as the first part of the reference's
    run in the main pass: it also returns the reference's BatchNorm moments on these batches and
    their count (``recalibrate_batchnorm``'s ``reference_head``). Nothing in either model
    changes."""
    names = list(quantized_layers(qmodel))
    observers = {name: HistogramObserver(seed=index) for index, name in enumerate(names)
                 if layer_state(qmodel.get_submodule(name)).input_format is not None}
    moments = {name: InputMoments(reference.get_submodule(name), seed=index)
               for index, name in enumerate(names)
               if with_moments and supports(reference.get_submodule(name))}
    seen = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(batch_statistics([reference]))
        bn_moments = stack.enter_context(measuring_moments(reference))
        for name in names:
            if name in observers or name in moments:
                seeing = _Seeing(observers.get(name), moments.get(name))
                stack.callback(_observing_inputs(reference.get_submodule(name), seeing).remove)
        device = model_device(reference)
        with torch.no_grad():
            for batch in calibration_batches(batches, num_batches, device,
                                             "Second moments and sensitivity data", quiet):
                call_model(reference, batch)
                seen += 1
    for observer in observers.values():  # every rank: what all ranks' batches showed
        observer.reduce()
    for accumulated in moments.values():
        accumulated.reduce()
    return observers, moments, (bn_moments, seen)


def calibration_pass(qmodel, model, calibration, config, quiet, reference=None,
                     reference_head=None):
    """The main pass: BN statistics (if asked) and observers. Returns the observers, the BN
    report and the number of samples seen. ``reference``: a private copy of the float model for
    the "shift" method (one is made if not given); ``reference_head``: its BatchNorm moments on
    the first batches, from :func:`analysis_pass`."""
    found = points(qmodel) if config.activation_format is not None else {}
    has_bn = bool(batchnorm_layers(model)) and config.bn_recalibration != "none"
    observers = {name: HistogramObserver(seed=index) for index, name in enumerate(found)}
    bn_report, samples = None, 0
    try:
        for name, observer in observers.items():
            found[name][3](observer)  # values pass through unrounded and are observed
        if has_bn:
            bn_report = recalibrate_batchnorm(
                qmodel, calibration, config.num_calibration_batches,
                method=config.bn_recalibration, quiet=quiet,
                # a private copy: even temporary flag changes never touch the caller's model
                reference=(reference if reference is not None else copy.deepcopy(model))
                if config.bn_recalibration == "shift" else None,
                reference_head=_usable(reference_head, config.num_calibration_batches))
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
            point[3](None)
    for observer in observers.values():  # every rank: what all ranks' batches showed
        observer.reduce()
    if bn_report is None:
        samples = int(collective.all_reduce(torch.tensor(samples, dtype=torch.int64)))
    return observers, bn_report, samples


def _usable(reference_head, num_batches):
    """The analysis pass's reference moments, unless they cover batches the main pass will not
    see (fewer calibration batches than analysis batches)."""
    if reference_head is None or (num_batches is not None and reference_head[1] > num_batches):
        return None
    return reference_head


def refuse_non_finite(observers: dict) -> None:
    """NaN or Inf seen at a point is an error naming it: no model is made from it."""
    for name, observer in observers.items():
        if observer.num_non_finite:
            raise ValueError(f"the input of {name!r} held {observer.num_non_finite} NaN or Inf "
                             f"values during calibration (of {observer.num_values}); a model is "
                             "not made from that (check the samples and the model's weights)")


def choose_input_biases(qmodel, observers, config, warn: bool = True) -> dict[str, dict]:
    """Sets each point's bias from its observer; returns the observer summaries."""
    found = points(qmodel)
    refuse_non_finite(observers)
    summaries = {}
    for name, observer in observers.items():
        if name not in found:
            continue
        fmt, owner, buffer, _ = found[name]
        if observer.num_calls == 0:
            if warn:
                warnings.warn(f"{name!r} never ran during calibration; its input keeps the "
                              f"format's own bias {fmt.exponent_bias}", stacklevel=3)
            summaries[name] = {"warning": "never ran during calibration"}
            continue
        if config.activation_bias_method == "fixed":
            bias = fmt.exponent_bias
        else:
            bias = observer.exponent_bias(fmt, config.activation_bias_method)
        getattr(owner, buffer).fill_(bias)
        summaries[name] = observer.summary(fmt.with_bias(bias))
    return summaries
