"""The roundings of HFP8 training as autograd functions.

* :func:`round_forward_and_gradient` for a layer input or attention operand: forward, the value
  rounded to the forward format (1-4-3) at its delayed bias; backward, the straight-through
  gradient rounded to the backward format (1-5-2) at its own delayed bias.
* :func:`round_gradient` for a layer output: forward identity; backward, the incoming gradient
  rounded to the backward format.
* :func:`round_weight`: forward, the master weight rounded to the forward format; backward,
  straight through (the weight gradient stays float32 for the optimizer).
"""

from __future__ import annotations

import torch

from hfp8.numerics.fake_quant import fake_quantize
from hfp8.training.scaling import DelayedBias

__all__ = ["GradientRounder", "round_forward_and_gradient", "round_gradient", "round_weight"]


class GradientRounder:
    """Rounds one gradient stream: format and delayed bias, nearest or stochastic."""

    def __init__(self, delayed: DelayedBias, stochastic: bool, generator: torch.Generator | None):
        self.delayed, self.stochastic, self.generator = delayed, stochastic, generator

    def __call__(self, gradient: torch.Tensor) -> torch.Tensor:
        fmt = self.delayed.choose(gradient)
        if self.stochastic:
            return fake_quantize(gradient, fmt, rounding="stochastic", generator=self.generator)
        return fake_quantize(gradient, fmt)


class _ForwardAndGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_fmt, gradient_rounder):
        ctx.gradient_rounder = gradient_rounder
        return x if forward_fmt is None else fake_quantize(x.detach(), forward_fmt)

    @staticmethod
    def backward(ctx, gradient):
        rounder = ctx.gradient_rounder
        return (gradient if rounder is None else rounder(gradient)), None, None


class _Gradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gradient_rounder):
        ctx.gradient_rounder = gradient_rounder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient):
        return ctx.gradient_rounder(gradient), None


class _Weight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, rounded):
        return rounded

    @staticmethod
    def backward(ctx, gradient):
        return gradient, None


def round_forward_and_gradient(x, forward_fmt, gradient_rounder):
    return _ForwardAndGradient.apply(x, forward_fmt, gradient_rounder)


def round_gradient(x, gradient_rounder):
    return _Gradient.apply(x, gradient_rounder)


def round_weight(weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward pass, with the gradient passing straight to ``weight``."""
    return _Weight.apply(weight, rounded)
