"""Quantization points: every place an input is rounded, with the same slots whether it is a
quantized layer's input or one operand of an attention site.

One list serves calibration (observers are attached to each point, and biases written back),
verification (each point's Q/DQ pair is replayed at its bias) and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfp8.numerics.formats import FloatFormat
from hfp8.ptq.operand_sites import OperandSite, operand_sites
from hfp8.ptq.quantizers import layer_state, quantized_layers

__all__ = ["QuantPoint", "quant_points"]


@dataclass(frozen=True)
class QuantPoint:
    """One input quantization point.

    Attributes:
        name: the layer's name, or ``"{site}.{operand}"`` for an attention operand.
        fmt: the format it rounds to (its bias is ``exponent_bias``, not ``fmt``'s own).
        owner: the module holding the integer bias buffer.
        buffer: that buffer's name on ``owner``.
        site, operand: the attention site and operand; ``None`` for a layer input.
    """

    name: str
    fmt: FloatFormat
    owner: nn.Module
    buffer: str
    site: OperandSite | None = None
    operand: str | None = None

    @property
    def exponent_bias(self) -> torch.Tensor:
        """The 0-d int buffer the rounding reads (write it with ``fill_``)."""
        return getattr(self.owner, self.buffer)

    def attach_observer(self, observer) -> None:
        """Route the point's values, unrounded, to ``observer`` (``None``: detach; the point
        rounds again)."""
        if self.site is None:
            layer_state(self.owner).observer = observer
        elif observer is None:
            self.site.observers.pop(self.operand, None)
        else:
            self.site.observers[self.operand] = observer


def quant_points(qmodel: nn.Module) -> dict[str, QuantPoint]:
    """Every input quantization point of ``qmodel`` by name: quantized layers whose input is
    rounded, then the operands of every attention site."""
    found = {}
    for name, layer in quantized_layers(qmodel).items():
        fmt = layer_state(layer).input_format
        if fmt is not None:
            found[name] = QuantPoint(name, fmt, layer, "input_exponent_bias")
    for site_name, (owner, site) in operand_sites(qmodel).items():
        for operand in site.operands:
            name = f"{site_name}.{operand}"
            found[name] = QuantPoint(name, site.fmt, owner, site.bias_buffer(operand), site,
                                     operand)
    return found
