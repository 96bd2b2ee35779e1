"""How a layer gets its FP8 steps, in place, without replacing its forward.

**Conv1d/2d/3d, Linear and recurrent layers** (``nn.LSTM``/``GRU``/``RNN`` and their cells;
found by ``isinstance``, subclasses with their own forward included) keep their class and
forward. Quantizing one adds:

* each weight matrix (:func:`hfp8.ptq.recurrent.weight_names`: ``weight``, or a recurrent
  layer's ``weight_ih_l0``, ``weight_hh_l0``, ...; the same Parameters) holds the rounded values
  ``fq(w; {weight}_exponent_bias)``, so whatever the forward does with them uses the FP8
  weights; one int64 buffer ``{weight}_exponent_bias`` per matrix, shape ``()`` or ``(rows,)``;
* a forward pre-hook that rounds the layer's input (its first argument; a packed sequence's
  data) with ``hfp8::quantize_dequantize`` at int64 buffer ``input_exponent_bias``;
* a plain attribute ``hfp8_quantization`` (:class:`LayerQuantization`): formats and the
  temporary observer/tap slots.

**Attention products** (``torch.matmul``/``@``/``bmm`` of two activations, and
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

Observers and taps are temporary slots: while ``observer`` is set the value passes unrounded and
is shown to it (calibration); ``tap`` sees every value before rounding (verification).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from hfp8.numerics.formats import FloatFormat
from hfp8.numerics.ops import scale_for_bias
from hfp8.numerics.traced_rounding import round_at_bias, traceable
from hfp8.ptq.attention import attention_by_definition
from hfp8.ptq.recurrent import (
    CELL_FUNCTIONS,
    RECURRENT_FUNCTIONS,
    RECURRENT_TYPES,
    recurrence_by_definition,
    round_cell_hidden,
    weight_names,
)

__all__ = ["QUANTIZABLE_TYPES", "LayerQuantization", "OperandSite", "quantize_point",
           "attach_layer", "detach_layer", "attach_sites", "quantized_layers", "operand_sites",
           "is_quantizable", "site_kind", "MATMUL_FUNCTIONS", "SDPA_FUNCTIONS", "SDPA_OPERANDS",
           "MATMUL_OPERANDS", "RECURRENT_OPERANDS", "weight_bias_buffer", "weight_names"]

QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *RECURRENT_TYPES)
LAYER_ATTRIBUTE = "hfp8_quantization"
SITES_ATTRIBUTE = "hfp8_sites"
MATMUL_OPERANDS = ("left", "right")
SDPA_OPERANDS = ("query", "key", "probs", "value")
RECURRENT_OPERANDS = ("hidden",)
MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                    torch.Tensor.bmm, torch.Tensor.__rmatmul__}
SDPA_FUNCTIONS = {nn.functional.scaled_dot_product_attention}


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZABLE_TYPES)


def site_kind(local: str) -> str:
    """"matmul", "sdpa" or "recurrent": the kind of site ``local`` (``matmul0``, ``sdpa1``,
    ``recurrent0``) or of a site's full name (``block.sdpa0``)."""
    return local.rpartition(".")[2].rstrip("0123456789")


def weight_bias_buffer(weight: str) -> str:
    """The int64 buffer holding weight matrix ``weight``'s exponent bias(es)."""
    return f"{weight}_exponent_bias"


@dataclass(eq=False)
class LayerQuantization:
    """The ``hfp8_quantization`` attribute of a quantized layer; ``weights``: its weight
    matrices' names."""

    name: str
    weight_format: FloatFormat | None
    input_format: FloatFormat | None
    observer: object | None = None
    tap: Callable | None = None
    trainer: Callable | None = None  # while training: rounds forward and backward (hfp8.training)
    weights: tuple[str, ...] = ("weight",)


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


def quantize_point(x: torch.Tensor, fmt: FloatFormat | None, exponent_bias: torch.Tensor,
                   site: str, observer=None, tap=None, trainer=None) -> torch.Tensor:
    """One quantization point: tap, observe (value passes unrounded), train (the trainer rounds
    forward and backward, see :mod:`hfp8.training`) or round."""
    if tap is not None:
        tap(x)
    if observer is not None:
        observer.observe(x)
        return x
    if trainer is not None and torch.is_tensor(x) and x.is_floating_point():
        return trainer(x)
    if fmt is None or not torch.is_tensor(x) or not x.is_floating_point():
        return x
    if _fusable(x, fmt):
        return round_at_bias(x, fmt, exponent_bias)
    return torch.ops.hfp8.quantize_dequantize(
        x, scale_for_bias(fmt, exponent_bias), fmt.exponent_bits, fmt.mantissa_bits,
        fmt.specials, site)


def _fusable(x: torch.Tensor, fmt: FloatFormat) -> bool:
    """Under ``torch.compile`` (not ``torch.export``, whose graph must keep one node per point
    for the ONNX translation), inference rounds with plain torch ops that the compiler fuses into
    the surrounding elementwise work; the same values (:mod:`hfp8.numerics.traced_rounding`)."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not (x.requires_grad and torch.is_grad_enabled()) and traceable(fmt, x.dtype))


# -- Conv / Linear ----------------------------------------------------------------------------
def _quantize_layer_input(module, args, kwargs):
    state: LayerQuantization = getattr(module, LAYER_ATTRIBUTE)

    def point(x):
        if isinstance(x, PackedSequence):  # a recurrent layer's packed input: its data
            return x._replace(data=point(x.data))
        return quantize_point(x, state.input_format, module.input_exponent_bias, state.name,
                              state.observer, state.tap, state.trainer)
    if args:
        return (point(args[0]), *args[1:]), kwargs
    for key, value in kwargs.items():  # forward(input=...) called by keyword
        if torch.is_tensor(value) or isinstance(value, PackedSequence):
            return args, {**kwargs, key: point(value)}
    return args, kwargs


def _guard_hooks_under_compile() -> None:
    """A quantized layer keeps its class and forward; its rounding lives in forward hooks.
    TorchDynamo by default does not guard on hooks, so a graph it compiled for a float model
    would be reused for the quantized copy (same class, same shapes) and silently skip the
    rounding (measured on MobileNetV2: the compiled "quantized" model partly float). From the
    first quantized layer on, it guards on hooks; graphs it compiled before without those
    guards are dropped (``torch._dynamo.reset()``: they recompile, with them, on their next
    call). Not at ``import hfp8``: importing TorchDynamo takes about 1 s, which commands that
    never build a quantized model should not pay."""
    already_loaded = "torch._dynamo" in sys.modules
    import torch._dynamo

    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        if already_loaded:  # something may have been compiled without the guards
            torch._dynamo.reset()


def attach_layer(module: nn.Module, name: str, weight_format: FloatFormat | None,
                 input_format: FloatFormat | None, per_channel: bool) -> LayerQuantization:
    """Give ``module`` (a Conv/Linear or recurrent layer) its buffers, pre-hook and state;
    biases start at the formats' own. The weights are not touched here (see
    :func:`hfp8.ptq.pipeline`)."""
    if hasattr(module, LAYER_ATTRIBUTE):
        raise ValueError(f"layer {name!r} is already quantized")
    weights = weight_names(module)
    device = module.get_parameter(weights[0]).device
    for weight in weights:
        shape = (module.get_parameter(weight).shape[0],) if per_channel else ()
        module.register_buffer(weight_bias_buffer(weight), torch.full(
            shape, weight_format.exponent_bias if weight_format else 0, dtype=torch.int64,
            device=device))
    module.register_buffer("input_exponent_bias", torch.tensor(
        input_format.exponent_bias if input_format else 0, dtype=torch.int64, device=device))
    state = LayerQuantization(name, weight_format, input_format, weights=weights)
    setattr(module, LAYER_ATTRIBUTE, state)
    _guard_hooks_under_compile()
    module.register_forward_pre_hook(_quantize_layer_input, with_kwargs=True)
    return state


def detach_layer(module: nn.Module, float_module: nn.Module) -> None:
    """Undo :func:`attach_layer`: the float weights back (from ``float_module``, the same layer
    of the float model), buffers, hook and state removed."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _quantize_layer_input:  # ours, found by identity (handles do not survive copies)
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    weights = layer_state(module).weights
    for name in (*map(weight_bias_buffer, weights), "input_exponent_bias"):
        del module._buffers[name]
    delattr(module, LAYER_ATTRIBUTE)
    with torch.no_grad():
        for weight in weights:
            module.get_parameter(weight).copy_(float_module.get_parameter(weight))


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized Conv/Linear layers of ``model`` by name, in registration order."""
    return {name: m for name, m in model.named_modules() if hasattr(m, LAYER_ATTRIBUTE)}


def layer_state(module: nn.Module) -> LayerQuantization:
    return getattr(module, LAYER_ATTRIBUTE)


# -- attention products -----------------------------------------------------------------------
_ACTIVE = threading.local()  # .frames: stack of [owner module, {kind: calls so far}, mode]


def _frames() -> list:
    if not hasattr(_ACTIVE, "frames"):
        _ACTIVE.frames = []
    return _ACTIVE.frames


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
    _guard_hooks_under_compile()
    owner.register_forward_pre_hook(_enter_owner)
    owner.register_forward_hook(_leave_owner, always_call=True)


def operand_sites(model: nn.Module) -> dict[str, tuple[nn.Module, OperandSite]]:
    """Every attention site of ``model``: name -> (owner module, site)."""
    found = {}
    for module in model.modules():
        for site in getattr(module, SITES_ATTRIBUTE, {}).values():
            found[site.name] = (module, site)
    return found
