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

**Attention products and recurrent hidden states** are quantization *sites*
(:mod:`hfp8.ptq.operand_sites`), rounded by :func:`quantize_point` like a layer input.

Observers and taps are temporary slots: while ``observer`` is set the value passes unrounded and
is shown to it (calibration); ``tap`` sees every value before rounding (verification).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from hfp8.numerics.fake_quant import fake_quantize
from hfp8.numerics.formats import FloatFormat
from hfp8.numerics.ops import scale_for_bias
from hfp8.numerics.traced_rounding import round_at_bias, traceable
from hfp8.ptq.recurrent import RECURRENT_TYPES, weight_names

__all__ = ["QUANTIZABLE_TYPES", "LayerQuantization", "quantize_point", "attach_layer",
           "detach_layer", "quantized_layers", "layer_state", "is_quantizable",
           "weight_bias_buffer", "weight_names", "guard_hooks_under_compile"]

QUANTIZABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *RECURRENT_TYPES)
LAYER_ATTRIBUTE = "hfp8_quantization"


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZABLE_TYPES)


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
    if _eager(x):
        return fake_quantize(x, _at_bias(fmt, int(exponent_bias)))
    return torch.ops.hfp8.quantize_dequantize(
        x, scale_for_bias(fmt, exponent_bias), fmt.exponent_bits, fmt.mantissa_bits,
        fmt.specials, site)


def _fusable(x: torch.Tensor, fmt: FloatFormat) -> bool:
    """Under ``torch.compile`` (not ``torch.export``, whose graph must keep one node per point
    for the ONNX translation), inference rounds with plain torch ops that the compiler fuses into
    the surrounding elementwise work; the same values (:mod:`hfp8.numerics.traced_rounding`)."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not (x.requires_grad and torch.is_grad_enabled()) and traceable(fmt, x.dtype))


def _eager(x: torch.Tensor) -> bool:
    """A plain tensor outside every tracer (torch.export, TorchDynamo, TorchScript tracing, FX
    proxies) is rounded by :func:`hfp8.fake_quantize` directly: the operator would compute the
    same, with its gradient rule, but its dispatch costs about as much as rounding a small
    tensor. Tracers keep the operator: the exported graph needs one node per point."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())


@functools.lru_cache(maxsize=1024)
def _at_bias(fmt: FloatFormat, exponent_bias: int) -> FloatFormat:
    return fmt.with_bias(exponent_bias)


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


def guard_hooks_under_compile() -> None:
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
    guard_hooks_under_compile()
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
