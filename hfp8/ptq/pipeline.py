"""quantize_model: a pretrained float model in, a fake-quantized HFP8 model out.

The data flow, in this order, and why:

0. **Probe** (first calibration batch, float model): where each Conv/Linear sits in the data
   flow (first and last layers by graph position) and which attention products exist
   (:mod:`hfp8.ptq.graph_probe`). Layers are then quantized in place
   (:mod:`hfp8.ptq.quantizers`): the model keeps its classes and forward code.
1. **Weights, round to nearest** (no data needed): each weight matrix (Conv/Linear; a
   recurrent layer's input, hidden and projection matrices each) with its own exponent bias,
   chosen from the weight itself (per tensor or per output channel).
2. **Analysis pass** over the first ``analysis_batches`` batches (:mod:`hfp8.ptq.calibrate`):
   each layer's input second moments and provisional input ranges; past ``MOMENTS_BYTES`` of
   moments, one more pass (moments only) per further group of layers, from the last group to
   the first, each group rounded (step 3) before the next is measured (the same weights as one
   pass; each further pass replays what the first computed before its group and stops its
   forward once its layers are measured, :mod:`hfp8.ptq.prefix_replay`).
3. **Refinement** (:mod:`hfp8.ptq.refinement`): weights re-rounded onto the same grid with error
   compensation under those moments; then every layer's effect on the output estimated (one
   forward and one backward pass) and the most harmful ones kept float within the budget.
4. **BatchNorm statistics and input ranges, in one pass** over all the calibration data, with
   the final weights and the final set of quantized layers. Weight rounding shifts each
   channel's output deterministically; BN re-estimation corrects that shift, so it must see the
   final weights. During the pass every BN layer normalizes with batch statistics (the
   statistics re-estimation averages), so the streaming observers on each quantization point
   see activations normalized the way the re-estimated model normalizes them, not the way the
   stale statistics would (a channel whose running variance was near zero can blow up by orders
   of magnitude until re-estimated). Inputs are not rounded during the pass: their biases do not
   exist yet, and rounding adds nearly zero-mean noise of about 2^-4 of each value, which barely
   moves BN statistics. The float reference of the "shift" runs on every
   ``config.bn_shift_stride``-th batch only, where the shift is measured.
5. **Input (activation) biases**, chosen from the observers; BN statistics written.

One main pass instead of two (statistics first, then ranges under the final statistics):
measured on ImageNet MobileNetV2 with 128 calibration crops, the two-pass order gave the same
fidelity (top-1 agreement 0.852 vs 0.844, KL 0.091 vs 0.093 on 256 evaluation crops) at about
1.5x the time. Without BN re-estimation (or BatchNorm) the pass runs the model in eval mode.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from hfp8 import distributed
from hfp8.calibration.batchnorm import batchnorm_layers
from hfp8.data.batches import Peeked
from hfp8.data.model_io import describe, describe_batch, slice_batch, split_batch
from hfp8.numerics.bias_selection import select_exponent_bias
from hfp8.numerics.fake_quant import quantize_weight
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.calibrate import (
    analysis_pass,
    calibration_pass,
    choose_input_biases,
    moment_groups,
    refuse_non_finite,
)
from hfp8.ptq.config import REPORT_ATTRIBUTE, QuantConfig
from hfp8.ptq.graph_probe import ProbeResult, probe_model
from hfp8.ptq.operand_sites import (
    OperandSite,
    attach_sites,
    operand_sites,
    owners_closed,
    site_kind,
)
from hfp8.ptq.plan import plan_quantization
from hfp8.ptq.prefix_replay import PrefixOutputs
from hfp8.ptq.quantizers import (
    attach_layer,
    is_quantizable,
    quantized_layers,
    weight_bias_buffer,
)
from hfp8.ptq.refinement import compensate_weights, keep_sensitive_layers_float
from hfp8.ptq.report import QuantReport

__all__ = ["quantize_model", "plan_quantization", "quantized_layers", "attach_planned_sites",
           "REPORT_ATTRIBUTE", "MOMENTS_BYTES", "REPLAY_BYTES"]

# The second moments compensated rounding needs, held at once (float64): past this, the analysis
# pass is repeated per group of layers (moments only), so memory does not grow with the model.
# The passes replay what comes before their group (hfp8.ptq.prefix_replay): the 150M decoder in
# 5 groups took 33.8-37.8 s against 35.6-37.9 s in 2 groups of 1 GiB side by side (benchmarks/
# scaling.py --moments-mib 1024 256), peak 3.1 -> 2.55 GiB. 128 MiB (below one of its blocks'
# 152 MiB: 12 groups) with 128 MiB rounding runs: peak 2.00-2.03 against 2.17-2.25 GiB at
# 256 MiB, in 35.7-38.1 s against 38.7-39.3 s (once the steps around them stopped growing the
# heap: before, 128 MiB gave no lower peak and took 10% longer).
MOMENTS_BYTES = 128 << 20
# The most the outputs recorded for those passes to replay may hold (the 150M decoder's: 48 MiB;
# a CNN's early maps at a large batch could hold more than the moments the groups save).
REPLAY_BYTES = 256 << 20
# Elements per block of the weight-rounding summary's float64 sums (2 MiB per temporary).
SUMS_BLOCK = 1 << 18


def _weight_bias(weight: torch.Tensor, config: QuantConfig):
    fmt = config.weight_format
    axis = 0 if config.weight_granularity == "per_channel" else None
    return select_exponent_bias(weight, fmt, config.weight_bias_method, axis=axis)


def _rounding_sums(original: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """(non-finite values, non-zero values, of them flushed to zero, sum w^2,
    sum (w - fq(w))^2) of one weight matrix, float64, summed block by block: the temporaries
    are one block's, so rounding a large matrix does not grow the process's heap (glibc keeps
    what a step grew it by)."""
    sums = torch.zeros(5, dtype=torch.float64, device=original.device)
    # (.double() of a float64 block is the block itself: nothing below writes in place)
    flat_original, flat_rounded = original.reshape(-1), rounded.reshape(-1)
    for start in range(0, flat_original.numel(), SUMS_BLOCK):
        block = flat_original[start:start + SUMS_BLOCK].double()
        rounded_block = flat_rounded[start:start + SUMS_BLOCK].double()
        nonzero = block != 0
        flushed = nonzero & (rounded_block == 0)
        sums += torch.stack([(~torch.isfinite(block)).sum().double(), nonzero.sum().double(),
                             flushed.sum().double(), block.square().sum(),
                             (rounded_block - block).square().sum()])
    return sums.cpu()


def _weight_summary(sums: torch.Tensor) -> dict:
    """What rounding did to a layer's weights, from their :func:`_rounding_sums` added up: the
    fraction of non-zero values flushed to zero and the SQNR
    ``10 log10(sum w^2 / sum (w - fq(w))^2)`` in dB (+inf when exact)."""
    _, nonzero, flushed, signal, error = (float(v) for v in sums)
    return {"flushed_fraction": flushed / max(nonzero, 1.0), "sqnr_db": sqnr_db(signal, error)}


def _quantize_weights(qmodel: nn.Module, layer_plan: dict, config: QuantConfig) -> dict:
    """Attaches every planned layer and rounds its weight matrices to nearest at their chosen
    biases, one matrix at a time (the working set is one matrix's rounded copy and blocks of
    work, whatever the layer: an LSTM's six matrices are not held side by side)."""
    summaries = {}
    for name, reason in layer_plan.items():
        if reason is not None:
            continue
        layer = qmodel.get_submodule(name)
        per_channel = config.weight_granularity == "per_channel"
        state = attach_layer(layer, name, config.weight_format, config.activation_format,
                             per_channel)
        if config.weight_format is None:
            continue
        sums = torch.zeros(5, dtype=torch.float64)
        for weight_name in state.weights:
            weight = layer.get_parameter(weight_name).detach()
            bias = _weight_bias(weight, config)
            rounded = quantize_weight(weight, config.weight_format, bias)
            weight_sums = _rounding_sums(weight, rounded)
            if weight_sums[0]:
                raise ValueError(f"layer {name!r} has NaN or Inf weights ({weight_name}); "
                                 "refusing to quantize")
            with torch.no_grad():
                weight.copy_(rounded)
                getattr(layer, weight_bias_buffer(weight_name)).copy_(torch.as_tensor(bias))
            del rounded
            sums += weight_sums
        summaries[name] = _weight_summary(sums)
    return summaries


def attach_planned_sites(qmodel: nn.Module, site_plan: dict, probe: ProbeResult, config) -> None:
    """Attach the attention sites that ``site_plan`` (from :func:`plan_quantization`) quantizes,
    in ``config.activation_format``, to their owners found by ``probe``."""
    for owner, locals_ in probe.sites.items():
        chosen = [OperandSite(f"{owner}.{local}" if owner else local, local,
                              site_kind(local), config.activation_format)
                  for local in locals_ if site_plan[f"{owner}.{local}" if owner else local] is None]
        if chosen:
            attach_sites(qmodel.get_submodule(owner), chosen)


def quantize_model(model: nn.Module, calibration, config: QuantConfig = QuantConfig(), *,
                   quiet: bool = False) -> nn.Module:
    """Quantize a copy of ``model`` to HFP8; ``model`` itself is never modified.

    ``calibration``: an iterable of batches (tensors, tuples, mappings; see
    :mod:`hfp8.data.model_io`): a list, a DataLoader, an :class:`hfp8.data.SampleFolder`, a
    generator. It is read once (its first ``config.analysis_batches`` batches are kept in memory
    for the analysis); labels are never used. Returns the quantized copy in eval mode; it keeps
    the model's classes and forward code, and its forward pass is what deployment computes.
    ``quiet`` hides the progress bars. See the module docstring for the steps.

    With a ``torch.distributed`` process group, each rank passes its own shard of the data and
    every statistic is reduced across ranks: all ranks end with the same model, the one a single
    process would make from the union of the shards (:mod:`hfp8.distributed`).
    """
    # owners_closed: an interrupt inside a forward leaves no attention owner open in the process
    with distributed.agreed(), owners_closed():  # with a process group: all ranks end together
        return _quantize(model, calibration, config, quiet)


def _quantize(model: nn.Module, calibration, config: QuantConfig, quiet: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an hfp8.QuantConfig, got {type(config).__name__}")
    if not any(is_quantizable(m) for m in model.modules()):
        raise ValueError("the model has no Conv1d/2d/3d, Linear or recurrent (LSTM/GRU/RNN) "
                         "layer to quantize")
    for name, bn in batchnorm_layers(model).items():
        if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
            raise ValueError(f"BatchNorm {name!r} has NaN or Inf running statistics; refusing to "
                             "quantize a broken model")
    batches = Peeked(calibration, config.analysis_batches)
    if batches.first is None:
        raise ValueError("the calibration data holds no batch")
    qmodel = copy.deepcopy(model).eval()
    _, _, left = split_batch(qmodel, batches.first)
    if left:
        warnings.warn(f"calibration batches carry {len(left)} item(s) beyond the inputs the "
                      f"model's forward takes ({describe(left[0])} first); they are not passed "
                      "(taken for targets)", stacklevel=2)
    try:  # the data flow does not depend on the batch size: a slice of two samples suffices
        probe = probe_model(qmodel, slice_batch(batches.first, 2))
    except Exception as error:  # noqa: BLE001 - the model's own code raises anything
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"the model rejects the first calibration batch ({describe_batch(batches.first)}): "
                         f"{type(error).__name__}: {' '.join(lines) or '-'}") from error
    layer_plan, site_plan = plan_quantization(qmodel, config, probe)
    weight_summaries = _quantize_weights(qmodel, layer_plan, config)
    attach_planned_sites(qmodel, site_plan, probe, config)
    sensitivity = _refine(qmodel, model, batches, config, quiet, probe)
    observers, bn_report, samples = calibration_pass(qmodel, model, batches, config, quiet)
    summaries = choose_input_biases(qmodel, observers, config)
    kept = {name: reason for name, reason in layer_plan.items() if reason is not None}
    for name, entry in sensitivity.items():
        if entry["float"]:
            kept[name] = (f"sensitive: predicted output SQNR {entry['sqnr_db']:.1f} dB with only "
                          f"this layer quantized (kept float within float_budget "
                          f"{config.float_budget:g} of {config.budget_unit})")
            weight_summaries.pop(name, None)
    setattr(qmodel, REPORT_ATTRIBUTE, QuantReport(
        config=config.to_dict(), kept_float=kept,
        sites_kept_float={n: r for n, r in site_plan.items() if r is not None},
        observers=summaries, weights=weight_summaries, sensitivity=sensitivity,
        batchnorm=bn_report, calibration_samples=samples,
        graph={"first": sorted(probe.first), "last": sorted(probe.last),
               "not_run": sorted(set(layer_plan) - set(probe.executed))}))
    if not quantized_layers(qmodel) and not operand_sites(qmodel):
        policy = any(reason.startswith(("first layer", "last layer")) for reason in kept.values())
        warnings.warn("no layer was quantized: " + "; ".join(
            f"{name}: {reason}" for name, reason in list(kept.items())[:3]) + (
            " (to quantize the first and last layers too: QuantConfig(keep_first_and_last="
            "False), or include=('name', ...) for chosen ones)" if policy else ""),
            stacklevel=2)
    return qmodel.eval()


def _refine(qmodel, model, batches, config: QuantConfig, quiet: bool, probe: ProbeResult) -> dict:
    """Analysis pass, compensated weight rounding, sensitive layers back to float."""
    compensate = config.weight_rounding == "compensated" and config.weight_format is not None
    select = config.float_budget > 0 or config.target_sqnr_db is not None
    if not quantized_layers(qmodel) or not (compensate or select):
        return {}
    groups = moment_groups(qmodel, MOMENTS_BYTES, probe.executed) if compensate else [[]]
    # past two groups, the first pass records what each later pass would compute before its
    # group, and that pass replays it (with two, the other group is the first: nothing before)
    prefix = PrefixOutputs(qmodel, [group[0] for group in groups[1:]], REPLAY_BYTES) \
        if len(groups) > 2 else None
    observers, moments = analysis_pass(qmodel, batches, config.analysis_batches, groups[0], quiet,
                                       prefix=prefix)
    refuse_non_finite(observers)  # before the moments feed the weights
    if compensate:
        compensate_weights(qmodel, model, moments)
        # a model whose moments exceed MOMENTS_BYTES: one more (moments only) pass per group,
        # from the last group to the first (see moment_groups); each stops its forward once
        # its layers have seen their inputs, unless one of them runs more than once per
        # forward in the probe (a shared or recurrent layer: its later calls count too)
        for group in groups[1:]:
            once = all(probe.calls.get(name) == 1 for name in group)
            _, moments = analysis_pass(qmodel, batches, config.analysis_batches, group, quiet,
                                       observe=False, stop_early=once, prefix=prefix,
                                       cut=group[0])
            compensate_weights(qmodel, model, moments)
    if not select:
        return {}
    choose_input_biases(qmodel, observers, config, warn=False)  # provisional, for the estimate
    return keep_sensitive_layers_float(qmodel, model, batches, config, batches.first, quiet)
