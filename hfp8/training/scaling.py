"""Delayed exponent-bias choice for tensors that change every step (inputs and gradients).

The bias used at step ``t`` is the largest whose range covers ``2^margin`` times the largest
magnitude seen in the last ``history`` steps (the current one not included, so that the choice
exists before the tensor does, as in delayed loss scaling; the margin is headroom for growth);
with no history yet, the current tensor's own. After
rounding, the current maximum joins the history, and a maximum beyond the chosen range is an
overflow: the step that saw it is skipped by :class:`hfp8.training.HybridTraining`.
"""

from __future__ import annotations

from collections import deque

import torch

from hfp8.numerics.bias_selection import max_bias_for_amax
from hfp8.numerics.formats import FloatFormat

__all__ = ["DelayedBias"]


class DelayedBias:
    """Exponent bias of one tensor stream in ``fmt`` (see the module docstring)."""

    def __init__(self, fmt: FloatFormat, history: int, margin: int = 0) -> None:
        self.fmt, self.margin = fmt, margin
        self.maxima: deque[float] = deque(maxlen=history)
        self.bias: int | None = None  # the bias used last
        self.overflowed = False  # since the last reset

    def choose(self, tensor: torch.Tensor) -> FloatFormat:
        """The format (at the chosen bias) for ``tensor``; records its maximum."""
        with torch.no_grad():
            finite = tensor.detach()
            current = float(finite.abs().amax()) if finite.numel() else 0.0
        if current != current or current == float("inf"):  # NaN or Inf: the step is skipped
            self.overflowed = True
            current = 0.0
        reference = (max(self.maxima) if self.maxima else current) * 2.0 ** self.margin
        bias = self.fmt.exponent_bias if reference == 0.0 else \
            int(max_bias_for_amax(torch.tensor([reference]), self.fmt)[0])
        fmt = self.fmt.with_bias(bias)
        if current > fmt.max_finite:
            self.overflowed = True
        if current > 0:
            self.maxima.append(current)
        self.bias = bias
        return fmt
