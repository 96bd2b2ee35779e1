"""Quantization *sites*: the operands of attention products and a recurrent layer's hidden state.

Attention products (``torch.matmul``/``@``/``bmm`` of two activations, and
``F.scaled_dot_product_attention``) are quantization *sites* owned by the module whose forward
makes the call: site ``{module}.matmul{k}`` is its k-th activation-activation matmul per call
(operands ``left``, ``right``), ``{module}.sdpa{k}`` its k-th attention call, computed by the
definition with ``query``, ``key``, softmax ``probs`` and ``value`` rounded (softmax itself stays
float). A recurrent layer's hidden state is a site too: ``{module}.recurrent0``, operand
``hidden``, the fused kernel's call computed by definition with the hidden state rounded where a
weight product reads it (:mod:`hfp8.ptq.recurrent`); a cell's kernel runs on its rounded ``h``.
The owner gets a buffer ``{local}_{operand}_exponent_bias`` per operand, an attribute
``hfp8_sites`` and pre/post hooks that keep a ``TorchFunctionMode`` active while it runs; the
mode rounds the operands of exactly those calls. Matmuls with a Parameter operand are weights,
not attention, and are left alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hfp8.numerics.formats import FloatFormat
from hfp8.ptq.attention import attention_by_definition
from hfp8.ptq.quantizers import guard_hooks_under_compile, quantize_point
from hfp8.ptq.recurrent import (
    CELL_FUNCTIONS,
    RECURRENT_FUNCTIONS,
    recurrence_by_definition,
    round_cell_hidden,
)

__all__ = ["OperandSite", "attach_sites", "operand_sites", "owners_closed", "site_kind",
           "MATMUL_FUNCTIONS", "SDPA_FUNCTIONS", "SDPA_OPERANDS", "MATMUL_OPERANDS",
           "RECURRENT_OPERANDS", "SITES_ATTRIBUTE"]

SITES_ATTRIBUTE = "hfp8_sites"
MATMUL_OPERANDS = ("left", "right")
SDPA_OPERANDS = ("query", "key", "probs", "value")
RECURRENT_OPERANDS = ("hidden",)
MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                    torch.Tensor.bmm, torch.Tensor.__rmatmul__}
SDPA_FUNCTIONS = {nn.functional.scaled_dot_product_attention}


def site_kind(local: str) -> str:
    """"matmul", "sdpa" or "recurrent": the kind of site ``local`` (``matmul0``, ``sdpa1``,
    ``recurrent0``) or of a site's full name (``block.sdpa0``)."""
    return local.rpartition(".")[2].rstrip("0123456789")


@dataclass(eq=False)
class OperandSite:
    """One attention product (``kind`` "matmul" or "sdpa") or a recurrent layer's hidden state
    (``kind`` "recurrent"), rounded with ``fmt``."""

    name: str
    local: str  # name within the owner, e.g. "matmul0"
    kind: str
    fmt: FloatFormat
    observers: dict = field(default_factory=dict)  # operand -> observer, while calibrating
    tap: Callable | None = None  # tap(site, operand, value), while verifying
    trainers: dict = field(default_factory=dict)  # operand -> trainer, while training

    @property
    def operands(self) -> tuple[str, ...]:
        return {"matmul": MATMUL_OPERANDS, "sdpa": SDPA_OPERANDS,
                "recurrent": RECURRENT_OPERANDS}[self.kind]

    def bias_buffer(self, operand: str) -> str:
        return f"{self.local}_{operand}_exponent_bias"


_ACTIVE = threading.local()  # .frames: stack of [owner module, {kind: calls so far}, mode]


def _frames() -> list:
    if not hasattr(_ACTIVE, "frames"):
        _ACTIVE.frames = []
    return _ACTIVE.frames


@contextlib.contextmanager
def owners_closed():
    """Within: owners left by an exception that skips their always-called forward hooks are
    closed on leaving (their frames popped, the rounding mode exited). torch runs those hooks
    on ``Exception`` only: an analysis pass's early stop (a BaseException) or a
    KeyboardInterrupt would otherwise leave the mode active in the process and the owners
    referenced (measured: 52 frames and one mode left after a quantized 10M decoder in 26
    stopping passes)."""
    frames = _frames()
    depth = len(frames)
    try:
        yield
    finally:
        while len(frames) > depth:
            _, _, mode = frames.pop()
            if mode is not None:
                mode.__exit__(None, None, None)


def _is_activation(value) -> bool:
    return torch.is_tensor(value) and not isinstance(value, nn.Parameter) and \
        value.is_floating_point()


def _site_for(kind: str) -> tuple[nn.Module, OperandSite] | tuple[None, None]:
    owner, calls, _ = _frames()[-1]
    index = calls.get(kind, 0)
    calls[kind] = index + 1
    site = getattr(owner, SITES_ATTRIBUTE).get(f"{kind}{index}")
    return (owner, site) if site is not None else (None, None)


def _point(owner: nn.Module, site: OperandSite, operand: str, x: torch.Tensor) -> torch.Tensor:
    tap = None if site.tap is None else (lambda value: site.tap(site, operand, value))
    return quantize_point(x, site.fmt, getattr(owner, site.bias_buffer(operand)),
                          f"{site.name}.{operand}", site.observers.get(operand), tap,
                          site.trainers.get(operand))


class _SiteMode(TorchFunctionMode):
    """Rounds the operands of the attention products of the innermost running owner."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_FUNCTIONS and len(args) >= 2 and _is_activation(args[0]) \
                and _is_activation(args[1]):
            owner, site = _site_for("matmul")
            if site is not None:
                left, right = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else args[:2]
                left = _point(owner, site, "left", left)
                right = _point(owner, site, "right", right)
                return torch.matmul(left, right)
        elif func in SDPA_FUNCTIONS and len(args) >= 3 and all(_is_activation(a) for a in args[:3]):
            owner, site = _site_for("sdpa")
            if site is not None:
                return attention_by_definition(
                    *args, **kwargs,
                    round_operand=lambda name, x: _point(owner, site, name, x))
        elif func in RECURRENT_FUNCTIONS:
            owner, site = _site_for("recurrent")
            if site is not None:
                round_hidden = lambda x: _point(owner, site, "hidden", x)  # noqa: E731
                if func in CELL_FUNCTIONS:
                    return round_cell_hidden(func, args, kwargs, round_hidden)
                return recurrence_by_definition(func, args, kwargs, round_hidden)
        return func(*args, **kwargs)


def _enter_owner(module, args):
    frames = _frames()
    mode = None
    if not frames:  # one hfp8 mode at a time; inner owners share it
        mode = _SiteMode()
        mode.__enter__()
    frames.append([module, {}, mode])


def _leave_owner(module, args, output):
    frames = _frames()
    if frames and frames[-1][0] is module:
        _, _, mode = frames.pop()
        if mode is not None:
            mode.__exit__(None, None, None)


def attach_sites(owner: nn.Module, sites: list[OperandSite]) -> None:
    """Make ``owner`` round the operands of ``sites`` (all of its own forward's sites)."""
    if hasattr(owner, SITES_ATTRIBUTE):
        raise ValueError(f"{sites[0].name.rpartition('.')[0]!r} already has attention sites")
    device = next((t.device for t in (*owner.parameters(), *owner.buffers())),
                  torch.device("cpu"))
    for site in sites:
        for operand in site.operands:
            owner.register_buffer(site.bias_buffer(operand), torch.tensor(
                site.fmt.exponent_bias, dtype=torch.int64, device=device))
    setattr(owner, SITES_ATTRIBUTE, {site.local: site for site in sites})
    guard_hooks_under_compile()
    owner.register_forward_pre_hook(_enter_owner)
    owner.register_forward_hook(_leave_owner, always_call=True)


def operand_sites(model: nn.Module) -> dict[str, tuple[nn.Module, OperandSite]]:
    """Every attention site of ``model``: name -> (owner module, site)."""
    found = {}
    for module in model.modules():
        for site in getattr(module, SITES_ATTRIBUTE, {}).values():
            found[site.name] = (module, site)
    return found
