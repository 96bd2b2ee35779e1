"""Preparing a model for HFP8 training, guarding its steps, and finishing it into a quantized model.

:func:`prepare_training` takes a float model (with an example batch, to find the layers by
position in the graph as PTQ does) or a model from :func:`hfp8.quantize_model`, and returns a
copy in which every quantized layer

* reads its weight through a parametrization: the float32 master weight (what the optimizer
  updates) rounded to the forward format at the bias its current values call for;
* rounds its input to the forward format (delayed bias), and the gradient flowing out of that
  input to the backward format (delayed bias);
* rounds the gradient flowing into its output to the backward format (delayed bias);

and every attention operand rounds forward and backward the same way. The chosen forward biases
are written into the layer's ``weight_exponent_bias`` and ``input_exponent_bias`` buffers, so the
forward pass is exactly PTQ's fake quantization at those biases.

:class:`HybridTraining` guards the optimizer: a step whose gradients hold NaN/Inf or overflowed
a delayed choice is skipped (gradients zeroed, never applied) and counted. :func:`finish_training`
turns the trained copy back into a normal quantized model: master weights rounded onto the grid
at their final bias, input biases re-chosen on calibration data (or the last delayed ones kept).
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from hfp8.numerics.bias_selection import select_exponent_bias
from hfp8.numerics.fake_quant import quantize_weight
from hfp8.ptq.config import REPORT_ATTRIBUTE, QuantConfig
from hfp8.ptq.operand_sites import operand_sites
from hfp8.ptq.quantizers import layer_state, quantized_layers, weight_bias_buffer
from hfp8.ptq.report import QuantReport, report_of
from hfp8.training.config import TrainingConfig
from hfp8.training.rounding import (
    GradientRounder,
    round_forward_and_gradient,
    round_gradient,
    round_weight,
)
from hfp8.training.scaling import DelayedBias

__all__ = ["prepare_training", "finish_training", "deployable_snapshot", "HybridTraining"]


class _RoundedWeight(nn.Module):
    """Parametrization: the master weight rounded to ``fmt`` at the bias it calls for now."""

    def __init__(self, fmt, method: str, bias_buffer: torch.Tensor) -> None:
        super().__init__()
        self.fmt, self.method = fmt, method
        self.bias_buffer = bias_buffer  # the layer's weight_exponent_bias (shared tensor)

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rounded, bias = _round_at_chosen_bias(master.detach(), self.fmt, self.method,
                                                  self.bias_buffer.dim() == 1)
            self.bias_buffer.copy_(bias)
        return round_weight(master, rounded)


def _round_output_gradients(output, rounder):
    """A layer's output with its gradient rounded; a recurrent layer's tuple of outputs, each
    float tensor's."""
    if torch.is_tensor(output):
        return round_gradient(output, rounder)
    leaves, spec = tree_flatten(output)
    return tree_unflatten([round_gradient(leaf, rounder) if torch.is_tensor(leaf)
                           and leaf.is_floating_point() else leaf for leaf in leaves], spec)


def _round_at_chosen_bias(weight: torch.Tensor, fmt, method: str, per_channel: bool):
    """(``weight`` rounded onto ``fmt``, the bias chosen for it by ``method``: one, or one per
    output channel)."""
    bias = torch.as_tensor(select_exponent_bias(weight, fmt, method, axis=0 if per_channel else None))
    return quantize_weight(weight, fmt, bias), bias


class _PointTrainer:
    """Forward rounding at a delayed bias (written into ``buffer``) and gradient rounding."""

    def __init__(self, forward_fmt, gradient: GradientRounder | None, history: int,
                 buffer: torch.Tensor | None) -> None:
        self.forward = None if forward_fmt is None else DelayedBias(forward_fmt, history)
        self.gradient, self.buffer = gradient, buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmt = None
        if self.forward is not None:
            fmt = self.forward.choose(x)
            if self.buffer is not None:
                self.buffer.fill_(fmt.exponent_bias)
        return round_forward_and_gradient(x, fmt, self.gradient)


class HybridTraining:
    """The training state beside the prepared model: gradient streams, the guarded step."""

    def __init__(self, model: nn.Module, config: TrainingConfig) -> None:
        self.model, self.config = model, config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.gradient_streams: dict[str, DelayedBias] = {}
        self.steps = self.skipped = 0
        self.overflows: dict[str, int] = {}
        self.handles = []

    def rounder(self, name: str) -> GradientRounder | None:
        if self.config.backward_format is None:
            return None
        stream = DelayedBias(self.config.backward_format, self.config.history,
                             self.config.gradient_margin)
        self.gradient_streams[name] = stream
        return GradientRounder(stream, self.config.gradient_rounding == "stochastic",
                               self.generator)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the step unless a gradient overflowed or holds NaN/Inf; returns whether it
        was applied. Skipped steps leave no gradient behind."""
        overflowed = [name for name, s in self.gradient_streams.items() if s.overflowed]
        finite = all(bool(torch.isfinite(p.grad).all()) for group in optimizer.param_groups
                     for p in group["params"] if p.grad is not None)
        for name in overflowed:
            self.overflows[name] = self.overflows.get(name, 0) + 1
        for stream in self.gradient_streams.values():
            stream.overflowed = False
        if overflowed or not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return False
        optimizer.step()
        self.steps += 1
        return True

    def report(self) -> dict:
        return {"steps": self.steps, "skipped_steps": self.skipped, "overflows": dict(self.overflows),
                "gradient_biases": {n: s.bias for n, s in self.gradient_streams.items()},
                "config": {"forward_format": str(self.config.forward_format),
                           "backward_format": str(self.config.backward_format),
                           "gradient_rounding": self.config.gradient_rounding,
                           "history": self.config.history,
                           "gradient_margin": self.config.gradient_margin}}


def _attach_float_model(model: nn.Module, example_batch, config: TrainingConfig) -> nn.Module:
    from hfp8.ptq.graph_probe import probe_model
    from hfp8.ptq.pipeline import attach_planned_sites
    from hfp8.ptq.plan import plan_quantization
    from hfp8.ptq.quantizers import attach_layer

    if example_batch is None:
        raise ValueError("preparing a float model needs example_batch (to find the first and "
                         "last layers by position in the graph)")
    quant = QuantConfig(weight_format=config.forward_format, activation_format=config.forward_format,
                        keep_first_and_last=config.keep_first_and_last, exclude=config.exclude,
                        include=config.include, quantize_attention=config.quantize_attention,
                        float_budget=0.0, weight_rounding="nearest")
    probe = probe_model(model, example_batch)
    layers, sites = plan_quantization(model, quant, probe)
    for name, reason in layers.items():
        if reason is None:
            attach_layer(model.get_submodule(name), name, config.forward_format,
                         config.forward_format, per_channel=False)
    attach_planned_sites(model, sites, probe, quant)
    setattr(model, REPORT_ATTRIBUTE, QuantReport(
        config=quant.to_dict(), kept_float={n: r for n, r in layers.items() if r is not None},
        sites_kept_float={n: r for n, r in sites.items() if r is not None},
        graph={"first": sorted(probe.first), "last": sorted(probe.last), "not_run": []}))
    return model


def prepare_training(model: nn.Module, example_batch=None,
                     config: TrainingConfig = TrainingConfig()) -> tuple[nn.Module, HybridTraining]:
    """A copy of ``model`` ready for HFP8 training, and its :class:`HybridTraining`; ``model``
    is not modified. See the module docstring."""
    tmodel = copy.deepcopy(model)
    if not quantized_layers(tmodel) and not operand_sites(tmodel):
        _attach_float_model(tmodel, example_batch, config)
    training = HybridTraining(tmodel, config)
    forward = config.forward_format
    for name, layer in quantized_layers(tmodel).items():
        state = layer_state(layer)
        state.weight_format = state.input_format = forward
        if forward is not None:
            for weight_name in state.weights:
                parametrize.register_parametrization(
                    layer, weight_name, _RoundedWeight(
                        forward, config.weight_bias_method,
                        getattr(layer, weight_bias_buffer(weight_name))))
        state.trainer = _PointTrainer(forward, training.rounder(f"{name}.input"), config.history,
                                      layer.input_exponent_bias)
        output = training.rounder(f"{name}.output")
        if output is not None:
            training.handles.append(layer.register_forward_hook(
                lambda module, args, y, output=output: _round_output_gradients(y, output)))
    for site_name, (owner, site) in operand_sites(tmodel).items():
        site.fmt = forward or site.fmt
        for operand in site.operands:
            site.trainers[operand] = _PointTrainer(
                forward, training.rounder(f"{site_name}.{operand}"), config.history,
                getattr(owner, site.bias_buffer(operand)))
    return tmodel, training


def finish_training(training: HybridTraining, calibration=None, quiet: bool = True) -> nn.Module:
    """The trained model as a normal quantized model (exportable, savable); see the module
    docstring. The prepared model is modified in place and returned."""
    tmodel = training.model
    for handle in training.handles:
        handle.remove()
    for layer in quantized_layers(tmodel).values():
        layer_state(layer).trainer = None
        for weight_name in layer_state(layer).weights:
            if parametrize.is_parametrized(layer, weight_name):
                parametrize.remove_parametrizations(layer, weight_name, leave_parametrized=False)
    for _, site in operand_sites(tmodel).values():
        site.trainers.clear()
    return _deployable(tmodel, training, calibration, quiet)


def deployable_snapshot(training: HybridTraining, like: nn.Module, calibration=None,
                        quiet: bool = True) -> nn.Module:
    """What :func:`finish_training` would return now, built on a copy of ``like`` (the quantized
    model training started from) so that training can go on: ``training``'s model is not
    touched. (A deep copy of the parametrized model would share its generated classes, and
    finishing it would strip the original's parametrizations.)"""
    model = copy.deepcopy(like).eval()  # a caller's model in train mode: BN statistics stay
    state = {re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", key): value.detach()
             for key, value in training.model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return _deployable(model, training, calibration, quiet)


def _deployable(tmodel: nn.Module, training: HybridTraining, calibration, quiet: bool) -> nn.Module:
    """Master weights rounded onto their grids at their final bias; input biases re-chosen on
    ``calibration`` (or the last delayed ones kept); the training record in the report."""
    from hfp8.ptq.calibrate import calibration_pass, choose_input_biases

    for layer in quantized_layers(tmodel).values():
        state = layer_state(layer)
        if state.weight_format is None:
            continue
        for weight_name in state.weights:
            weight, buffer = layer.get_parameter(weight_name), getattr(layer, weight_bias_buffer(weight_name))
            rounded, bias = _round_at_chosen_bias(weight.detach(), state.weight_format,
                                                  training.config.weight_bias_method,
                                                  buffer.dim() == 1)
            with torch.no_grad():
                weight.copy_(rounded)
                buffer.copy_(bias)
    report = report_of(tmodel)
    if calibration is not None:
        quant = dataclasses.replace(QuantConfig.from_dict(report.config), bn_recalibration="none")
        observers, _, samples = calibration_pass(tmodel, tmodel, calibration, quant, quiet)
        report.observers = choose_input_biases(tmodel, observers, quant)
        report.calibration_samples = report.calibration_samples or samples
    report.training = training.report()
    return tmodel.eval()
