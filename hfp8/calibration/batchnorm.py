"""BatchNorm re-estimation: recompute running statistics from the model's own activations.

During one pass over the calibration data every BatchNorm layer normalizes with the statistics
of the current batch (as in training: weights frozen, no gradients), while a hook accumulates,
per channel, the exact mean and variance of its inputs over all batches (Chan et al.'s pairwise
merge, float64): a cumulative average over every value, not an exponential moving average, so
batch order and unequal batch sizes do not matter. Only at the end are the running statistics
replaced; momentum and the batch counter are restored.

Methods:

* ``"full"`` (the HFP8 paper): running_mean, running_var := mean, unbiased variance measured on
  the calibration data.
* ``"shift"``: measures the same statistics on a float ``reference`` model over the same batches
  and adds only the difference that quantization makes to the reference's own statistics::

      running_mean := reference.running_mean + (mean_quantized - mean_reference)
      running_var  := max(reference.running_var + (var_quantized - var_reference), 0)

  The data-dependent part cancels, so a few hundred unrepresentative samples still give the
  right correction, while ``"full"`` would replace ImageNet-scale statistics by those of a small
  calibration set. The base is the reference's statistics, not the model's current ones, so
  running it again on an already corrected model does not add the shift twice.

``measure_every=k`` measures both models on every k-th batch only (the model still runs on the
others, for its caller's hooks): the shift is a difference on the same samples, so fewer of them
estimate it nearly as well, and the reference's cost falls by k.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hfp8 import distributed
from hfp8.data.batches import calibration_batches, model_device, to_device
from hfp8.data.model_io import batch_size, call_model

__all__ = ["reestimate_batchnorm", "BN_MODES", "batchnorm_layers", "batch_statistics"]

# the BatchNorm re-estimation modes, everywhere (QuantConfig.bn_recalibration, the CLI's
# --bn-recalibration, recalibrate_batchnorm's method); "none" leaves the statistics as they are
BN_MODES = ("shift", "full", "none")


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm layers that keep running statistics, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
            and module.running_mean is not None}


class _ChannelMoments:
    """Forward hook: merges each call's batch mean and variance into running totals (float64).

    While measuring, BatchNorm runs with ``momentum=1.0``, so right after each call its
    ``running_mean``/``running_var`` hold exactly that batch's mean and unbiased variance, which
    BatchNorm computed anyway; no second pass over the activations is needed.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = None
        self.m2 = None
        self.enabled = True  # off: the call is not counted (a batch run for its hooks only)

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        if not self.enabled:
            return
        x = args[0]
        batch_count = x.numel() // x.shape[1]
        batch_mean = module.running_mean.double()
        batch_m2 = module.running_var.double() * (batch_count - 1)
        self._merge(batch_count, batch_mean, batch_m2)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the moments of ``count`` more values (their mean and sum of squared deviations),
        by Chan et al.'s pairwise update: exact in any grouping, up to float64 rounding."""
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def reduce(self, channels: int) -> None:
        """Merge with the other ranks' moments of this layer, in rank order, so that every rank
        holds the same result, equal (to float64 rounding) to one pass over all their batches."""
        if not distributed.active():
            return
        mine = torch.zeros(1 + 2 * channels, dtype=torch.float64)
        if self.mean is not None:
            mine[0], mine[1:1 + channels], mine[1 + channels:] = self.count, self.mean.cpu(), self.m2.cpu()
        device = None if self.mean is None else self.mean.device
        self.count, self.mean, self.m2 = 0, None, None
        for other in distributed.all_gather(mine):
            count = int(other[0])
            if count == 0:
                continue
            mean, m2 = other[1:1 + channels], other[1 + channels:]
            if device is not None:
                mean, m2 = mean.to(device), m2.to(device)
            self._merge(count, mean, m2)

    def variance(self) -> torch.Tensor:
        """Unbiased variance, as BatchNorm's running_var stores it."""
        return self.m2 / max(self.count - 1, 1)


@contextlib.contextmanager
def batch_statistics(models: list[nn.Module]):
    """Within: every model in eval mode except its BatchNorm layers, which normalize with the
    statistics of each batch (``momentum=1``: running stats hold the last batch's, as the moment
    hooks read them). Everything (flags, momentum, running stats, counters) is restored after,
    also on errors."""
    saved_training = [{m: m.training for m in model.modules()} for model in models]
    saved_state = {}  # bn -> (momentum, running_mean, running_var, num_batches_tracked)
    try:
        for model in models:
            model.eval()
            for bn in batchnorm_layers(model).values():
                saved_state[bn] = (bn.momentum, bn.running_mean.clone(), bn.running_var.clone(),
                                   None if bn.num_batches_tracked is None
                                   else bn.num_batches_tracked.clone())
                bn.train()  # normalize with batch statistics; weights stay frozen (no grad)
                bn.momentum = 1.0
        yield
    finally:
        with torch.no_grad():
            for bn, (momentum, mean, var, tracked) in saved_state.items():
                bn.momentum = momentum
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if tracked is not None:
                    bn.num_batches_tracked.copy_(tracked)
        for training in saved_training:
            for module, value in training.items():
                module.train(value)


def _measure(models: list[nn.Module], calibration, num_batches, quiet,
             measure_every: int) -> tuple[list, dict]:
    """One pass; returns per model {bn name: moments} and the counts: batches and samples run
    (``models[0]`` runs every batch), and those measured (batch 0, then every
    ``measure_every``-th: the only ones the other models run on). With a process group, batch
    ``i`` of rank ``r`` counts as batch ``i * world + r`` of the union: the round-robin order
    in which SampleFolder shards, so that ranks measure what one process would."""
    rank, world = distributed.world()
    handles = []
    moments = [{} for _ in models]
    counts = torch.zeros(4, dtype=torch.int64)  # batches, samples, measured batches, samples
    try:
        with batch_statistics(models):
            for index, model in enumerate(models):
                for name, bn in batchnorm_layers(model).items():
                    moments[index][name] = _ChannelMoments()
                    handles.append(bn.register_forward_hook(moments[index][name]))
            devices = [model_device(model) for model in models]
            with torch.no_grad():
                for step, batch in enumerate(calibration_batches(
                        calibration, num_batches, devices[0], "BatchNorm re-estimation", quiet)):
                    measured = (step * world + rank) % measure_every == 0
                    for hook in moments[0].values():
                        hook.enabled = measured
                    for model, device in zip(models if measured else models[:1], devices):
                        try:
                            call_model(model, to_device(batch, device))
                        except ValueError as error:
                            if "more than 1 value per channel" in str(error):
                                raise ValueError(
                                    "BatchNorm re-estimation needs more than one value per channel "
                                    "in each batch (use batches of 2 or more samples)") from None
                            raise
                    size = batch_size(batch)
                    counts += torch.tensor([1, size, int(measured), size * int(measured)])
    finally:
        for handle in handles:
            handle.remove()
    for index, model in enumerate(models):  # every rank: the moments of all ranks' batches
        for name, bn in batchnorm_layers(model).items():
            moments[index][name].reduce(bn.num_features)
    counts = distributed.all_reduce(counts)
    return moments, dict(zip(("batches", "samples", "measured_batches", "measured_samples"),
                             (int(c) for c in counts)))


def reestimate_batchnorm(
    model: nn.Module,
    calibration,
    num_batches: int | None = None,
    *,
    method: str = "full",
    reference: nn.Module | None = None,
    quiet: bool = False,
    measure_every: int = 1,
) -> dict:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` in place.

    ``calibration``: an iterable of input batches (tensors or ``(inputs, ...)`` tuples); at most
    ``num_batches`` are used. ``method="shift"`` needs ``reference``, the float model with the
    same BatchNorm layer names (see the module docstring). ``measure_every=k`` measures the
    statistics on batch 0 and every k-th batch after it only, and runs ``reference`` on those
    only: ``model`` still runs every batch (normalizing with batch statistics), so that hooks of
    the caller (:func:`hfp8.quantize_model`'s range observers) see all of them at about half the
    cost of the float reference with ``k=2``. Sharded (torch.distributed), batch ``i`` of rank
    ``r`` counts as batch ``i * world + r``: the round-robin order of
    :class:`hfp8.data.SampleFolder`'s shards. Train/eval flags and every other
    piece of state are restored, also when the pass fails; on failure no statistic changes.
    Non-finite measured statistics (NaN or Inf reached a BatchNorm input) are an error naming
    the layer, and nothing is written.
    Returns a report: method, BatchNorm layers updated, batches and samples run, those measured,
    and the layers that never ran (left unchanged). (The public
    :func:`hfp8.recalibrate_batchnorm` also records it in a quantized model's report.)
    """
    if method not in BN_MODES or method == "none":
        raise ValueError(f"method must be 'shift' or 'full', got {method!r} (for 'none', do not "
                         "call it)")
    if isinstance(measure_every, bool) or not isinstance(measure_every, int) or measure_every < 1:
        raise ValueError(f"measure_every must be a positive int, got {measure_every!r}")
    layers = batchnorm_layers(model)
    report = {"method": method, "batchnorm_layers": len(layers), "batches": 0, "samples": 0,
              "measured_batches": 0, "measured_samples": 0, "not_reached": []}
    if not layers:
        return report
    models, reference_layers = [model], {}
    if method == "shift":
        if reference is None:
            raise ValueError("method='shift' needs the float reference model (reference=...)")
        reference_layers = batchnorm_layers(reference)
        missing = sorted(set(layers) - set(reference_layers))
        if missing:
            raise ValueError(f"reference model has no BatchNorm layer named {missing[0]!r}")
        models.append(reference)
    with distributed.agreed():
        moments, counts = _measure(models, calibration, num_batches, quiet, measure_every)
    report.update(counts)
    for index, model_moments in enumerate(moments):  # check every layer before writing any
        for name, measured in model_moments.items():
            if measured.mean is not None and not (torch.isfinite(measured.mean).all()
                                                  and torch.isfinite(measured.variance()).all()):
                which = "the float reference's" if index else "its"
                raise ValueError(f"BatchNorm {name!r}: {which} input held NaN or Inf during "
                                 "re-estimation; no statistic was changed (check the samples "
                                 "and the model's weights)")
    with torch.no_grad():
        for name, bn in layers.items():
            measured = moments[0][name]
            baseline = moments[1][name] if method == "shift" else measured
            if measured.mean is None or baseline.mean is None:
                report["not_reached"].append(name)
                continue
            mean, variance = measured.mean, measured.variance()
            if method == "shift":
                base = reference_layers[name]
                mean = base.running_mean.double() + (mean - baseline.mean)
                variance = (base.running_var.double() + (variance - baseline.variance())).clamp_min(0)
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(variance.to(bn.running_var))
    return report
