"""FP8 E4M3 post-training quantization with two peer toolkits (benchmarks only).

Brevitas (AMD/Xilinx) and NVIDIA ModelOpt are NOT dependencies of hfp8: install them into a
separate environment from ``benchmarks/requirements-peers.txt`` (torch pinned to 2.13.0 first).
Both run on CPU in pure PyTorch.

Each function deep-copies ``model`` (the caller's module is never modified), puts the copy in
eval mode, quantizes and calibrates it with the peer's own PTQ flow on ``calibration_batches``
(an iterable of input tensors, or of ``(inputs, ...)`` tuples whose first item is the input),
and returns the fake-quantized copy in eval mode. The wall time of the peer's PTQ (quantizer
insertion + calibration, not the deep copy or the imports) is stored on the returned module as
``peer_ptq_seconds``; :func:`run_peer` returns it beside the model.

Both peers use *arbitrary float* per-tensor scales (``scale = amax / 448``), whereas hfp8
uses power-of-two scales (integer exponent biases). Neither peer re-estimates BatchNorm
statistics, and both calibrate activation ranges with every quantizer disabled (float weights
and float activations upstream); hfp8 calibrates with the quantized weights in place.

``exclude`` (both functions): exact module names to leave in float, e.g.
``hfp8_float_layers(model, batch)`` to quantize the same layer set as hfp8's default (which keeps the
first and last Conv/Linear layers in full precision). The peers' own default, used when
``exclude`` is empty, is to quantize every supported layer.
"""

from __future__ import annotations

import copy
import importlib.metadata
import time
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["PEERS", "brevitas_fp8_ptq", "modelopt_fp8_ptq", "peer_versions", "run_peer",
           "quantized_layers", "hfp8_float_layers"]

PEER_DISTRIBUTIONS = {"brevitas": "brevitas", "modelopt": "nvidia-modelopt"}
PINNED = {"brevitas": "0.13.4", "modelopt": "0.47.0"}

# Import-time warnings of the peers that say nothing about the quantization itself.
_IMPORT_NOISE = (
    "brevitas.fx is deprecated",                       # brevitas.graph imports its fx tracer
    "fast_hadamard_transform package not found",       # optional CUDA kernel, unused here
    "Cannot find transformers package",                # ModelOpt's HF export plugin
    "`torch.jit.script",                               # ModelOpt's decorators, torch 2.13
)


def _quiet_import(importer: Callable[[], object], peer: str):
    try:
        with warnings.catch_warnings():
            for message in _IMPORT_NOISE:
                warnings.filterwarnings("ignore", message=message)
            return importer()
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"{peer} is not installed in this environment ({error}); it is a benchmark-only "
            f"peer: install benchmarks/requirements-peers.txt into a separate venv") from error


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _copy_eval(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).eval()


def _check_exclude(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    exclude = list(exclude)
    names = dict(model.named_modules())
    missing = [name for name in exclude if name not in names]
    if missing:
        raise ValueError(f"exclude names no module: {missing}")
    return exclude


# --------------------------------------------------------------------------------------------
# Brevitas
# --------------------------------------------------------------------------------------------

def _import_brevitas():
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.float_quant_ocp import (Fp8e4m3OCPActPerTensorFloat,
                                                Fp8e4m3OCPWeightPerTensorFloat)
    return (qnn, calibration_mode, layerwise_quantize, Fp8e4m3OCPActPerTensorFloat,
            Fp8e4m3OCPWeightPerTensorFloat)


def brevitas_fp8_ptq(model: nn.Module, calibration_batches: Iterable,
                     *, exclude: Sequence[str] = ()) -> nn.Module:
    """Brevitas 0.13.4 FP8 E4M3 (OCP E4M3FN, max 448, saturating) PTQ of a copy of ``model``.

    API: ``brevitas.graph.quantize.layerwise_quantize(model, compute_layer_map=...,
    name_blacklist=exclude)`` (Brevitas's module-by-module graph PTQ flow, the one its ImageNet
    PTQ example uses with ``--target-backend layerwise``), then one pass over the batches inside
    ``brevitas.graph.calibrate.calibration_mode(model)`` under ``torch.no_grad()``.

    Config: every exact ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (hfp8's layer types) becomes
    ``brevitas.nn.QuantConv{1,2,3}d`` / ``QuantLinear`` with
      * ``weight_quant=Fp8e4m3OCPWeightPerTensorFloat``: per-tensor, scale = max|w| / 448
        (absmax statistic recomputed from the weight), float scale;
      * ``input_quant=Fp8e4m3OCPActPerTensorFloat``: per-tensor static scale = absmax / 448,
        where absmax is the library default statistic (max|x| of each batch) averaged over
        the calibration batches (``calibration_mode`` switches the default EMA to a true
        average), float scale (a learnable parameter after calibration, left as is);
      * ``bias_quant=None`` (layer biases stay float32, as in hfp8), ``output_quant`` none,
        ``return_quant_tensor=False`` (plain tensors flow between layers).
    BatchNorm, activations, pooling and everything else stay float and unchanged (no BN
    folding: that is the FX flow ``preprocess_for_quantize(merge_bn=True)`` + ``quantize``,
    not used here so that the quantization points match hfp8's). All layers are quantized,
    first and last included (library default; the ImageNet example script instead gives
    them a different 8-bit format), unless named in ``exclude``.
    """
    qnn, calibration_mode, layerwise_quantize, act_quant, weight_quant = \
        _quiet_import(_import_brevitas, "brevitas")
    qmodel = _copy_eval(model)
    exclude = _check_exclude(qmodel, exclude)
    kwargs = {"input_quant": act_quant, "weight_quant": weight_quant, "bias_quant": None,
              "return_quant_tensor": False}
    layer_map = {nn.Conv1d: (qnn.QuantConv1d, kwargs), nn.Conv2d: (qnn.QuantConv2d, kwargs),
                 nn.Conv3d: (qnn.QuantConv3d, kwargs), nn.Linear: (qnn.QuantLinear, kwargs)}
    start = time.perf_counter()
    qmodel = layerwise_quantize(qmodel, compute_layer_map=layer_map,
                                name_blacklist=exclude or None)
    qmodel.eval()
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in calibration_batches:
            qmodel(_inputs(batch))
    qmodel.eval()
    qmodel.peer_ptq_seconds = time.perf_counter() - start
    return qmodel


# --------------------------------------------------------------------------------------------
# NVIDIA ModelOpt
# --------------------------------------------------------------------------------------------

def _import_modelopt():
    import modelopt.torch.quantization as mtq
    return mtq


def modelopt_fp8_ptq(model: nn.Module, calibration_batches: Iterable,
                     *, exclude: Sequence[str] = ()) -> nn.Module:
    """NVIDIA ModelOpt 0.47.0 FP8 E4M3 PTQ of a copy of ``model``.

    API: ``modelopt.torch.quantization.quantize(model, FP8_DEFAULT_CFG, forward_loop)`` where
    ``forward_loop`` runs the copy (eval mode, ``torch.no_grad()``) over the batches.

    Config ``mtq.FP8_DEFAULT_CFG`` unchanged (plus one ``{"quantizer_name": "<name>.*",
    "enable": False}`` entry per ``exclude`` name): ``num_bits=(4, 3)`` (E4M3FN, max 448),
    ``axis=None`` (per-tensor) for every ``*weight_quantizer`` and ``*input_quantizer``;
    ``algorithm="max"``: weight amax = max|w|, input amax = max|x| over all calibration batches
    (quantizers disabled while collecting); scale = amax / 448, a float. Output quantizers
    are off. ModelOpt swaps every module type it registers: Conv1d/2d/3d, ConvTranspose, Linear
    get input + weight quantizers; pooling layers (Avg/Max/Adaptive) get an input quantizer,
    which the default config ENABLES (so e.g. the input of a global average pool is rounded
    to E4M3 too, which hfp8 and the Brevitas flow above do not do); BatchNorm and LeakyReLU
    quantizers are disabled by the config, and its LLM-specific name patterns (``*lm_head*``,
    ``*router*``, ``output.*``, ...) keep matching layers float. First and last layers are
    quantized (library default) unless named in ``exclude``.

    On CPU the fake quantization is ModelOpt's own pure-PyTorch path
    (``tensor_quant._fp8_eager``: ``(x * 448 / amax).clamp(-448, 448).to(torch.float8_e4m3fn)``
    then back, round-to-nearest-even, saturating); its CUDA extension and Triton kernels are
    used only for CUDA tensors, so no compiler or GPU is needed.
    """
    mtq = _quiet_import(_import_modelopt, "nvidia-modelopt")
    qmodel = _copy_eval(model)
    exclude = _check_exclude(qmodel, exclude)
    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    config["quant_cfg"] = list(config["quant_cfg"]) + [
        {"quantizer_name": f"{name}.*", "enable": False} for name in exclude]
    batches = calibration_batches

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(_inputs(batch))

    start = time.perf_counter()
    with warnings.catch_warnings():
        for message in _IMPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        qmodel = mtq.quantize(qmodel, config, forward_loop)
    qmodel.eval()
    qmodel.peer_ptq_seconds = time.perf_counter() - start
    return qmodel


# --------------------------------------------------------------------------------------------

PEERS: dict[str, Callable[..., nn.Module]] = {
    "brevitas": brevitas_fp8_ptq,
    "modelopt": modelopt_fp8_ptq,
}


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peers and of torch (None where not installed)."""
    versions: dict[str, str | None] = {}
    for peer, distribution in {**PEER_DISTRIBUTIONS, "torch": "torch"}.items():
        try:
            versions[peer] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[peer] = None
    return versions


def run_peer(name: str, model: nn.Module, calibration_batches: Iterable,
             **kwargs) -> tuple[nn.Module, float]:
    """``PEERS[name](model, calibration_batches, **kwargs)`` and its PTQ wall time in seconds."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
    qmodel = PEERS[name](model, calibration_batches, **kwargs)
    return qmodel, qmodel.peer_ptq_seconds


def quantized_layers(qmodel: nn.Module) -> dict[str, dict[str, str]]:
    """For each module of a peer-quantized model with an enabled quantizer: which tensors are
    quantized (``"weight"``, ``"input"``) and how, read from the peer's own modules."""
    layers: dict[str, dict[str, str]] = {}
    for name, module in qmodel.named_modules():
        found: dict[str, str] = {}
        # Brevitas: QuantWBIOL layers carry weight_quant / input_quant proxies.
        for role, attr in (("weight", "weight_quant"), ("input", "input_quant")):
            proxy = getattr(module, attr, None)
            if proxy is not None and getattr(proxy, "is_quant_enabled", False):
                scale = proxy.scale()
                fmt = (f"E{int(proxy.exponent_bit_width())}"
                       f"M{int(proxy.mantissa_bit_width())}")
                found[role] = (f"{fmt} per-tensor scale={float(scale.detach().flatten()[0]):.4g}"
                               if scale is not None and scale.numel() == 1 else fmt)
        # ModelOpt: TensorQuantizer children named weight_quantizer / input_quantizer.
        for role, attr in (("weight", "weight_quantizer"), ("input", "input_quantizer")):
            quantizer = getattr(module, attr, None)
            if quantizer is not None and getattr(quantizer, "is_enabled", False):
                amax = getattr(quantizer, "amax", None)
                bits = getattr(quantizer, "num_bits", None)
                fmt = f"E{bits[0]}M{bits[1]}" if isinstance(bits, tuple) else f"{bits}-bit"
                found[role] = (f"{fmt} per-tensor scale={float(amax) / 448.0:.4g}"
                               if amax is not None and amax.numel() == 1 else fmt)
        if found:
            layers[name] = found
    return layers


def hfp8_float_layers(model: nn.Module, example_batch, config=None) -> list[str]:
    """Names of the Conv/Linear layers hfp8 keeps in float under ``config`` (default
    ``hfp8.QuantConfig()``: the first and last, by position in the graph, which one forward
    pass on ``example_batch`` finds), for ``exclude=`` of the peer functions."""
    import hfp8
    from hfp8.ptq.graph_probe import probe_model
    from hfp8.ptq.pipeline import plan_quantization

    layers, _ = plan_quantization(model, config if config is not None else hfp8.QuantConfig(),
                                  probe_model(model, example_batch))
    return [name for name, reason in layers.items() if reason is not None]
