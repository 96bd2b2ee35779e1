"""HFP8 fine-tuning after PTQ: distil the float model into the quantized one on unlabelled samples.

The teacher is the float model, the student the quantized one trained in HFP8
(:mod:`hfp8.training.hybrid`: 1-4-3 forward, 1-5-2 backward). Loss per output leaf:
classifier-shaped outputs (``(N, classes)``) use KL(teacher || student) of their softmax
(Hinton's soft targets, temperature 1); every other output the mean squared error divided by
the teacher output's variance, so that leaves of any scale weigh alike. With labelled batches
(``(inputs, target)``) and ``label_weight > 0`` the student's cross-entropy is added.

BatchNorm statistics stay frozen (eval mode) throughout: they were re-estimated by PTQ on the
same samples, and batch statistics of small batches would make the student's forward differ
from what it deploys. Dropout is off for the same reason. Adam updates the float32 master
weights. At the end the weights are rounded onto their grids and the input biases re-chosen on
the samples (:func:`hfp8.training.finish_training`); the result is a normal quantized model.
"""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from hfp8.calibration import collective
from hfp8.calibration.batches import HeldOutSplit, model_device, to_device
from hfp8.model_io import call_model, output_leaves, split_batch
from hfp8.ptq.config import REPORT_ATTRIBUTE
from hfp8.training.config import TrainingConfig
from hfp8.training.hybrid import finish_training, prepare_training

__all__ = ["finetune", "distillation_loss"]


def distillation_loss(teacher_output, student_output) -> torch.Tensor:
    """Sum over output leaves (see the module docstring)."""
    total = 0.0
    for (_, teacher), (_, student) in zip(output_leaves(teacher_output), output_leaves(student_output)):
        if not student.is_floating_point():
            continue
        teacher = teacher.detach().float()
        if teacher.dim() == 2 and teacher.shape[1] >= 2:
            total = total + nn.functional.kl_div(student.float().log_softmax(1),
                                                 teacher.log_softmax(1), log_target=True,
                                                 reduction="batchmean")
        else:
            total = total + (student.float() - teacher).square().mean() / teacher.var().clamp_min(1e-12)
    return total


def finetune(qmodel: nn.Module, teacher: nn.Module, batches, *, steps: int | None = None,
             epochs: int | None = None, lr: float = 1e-5, label_weight: float = 0.0,
             config: TrainingConfig = TrainingConfig(), communication: str = "e5m2",
             quiet: bool = False, validation=None, hold_out: bool = True) -> nn.Module:
    """Fine-tune ``qmodel`` (from :func:`hfp8.quantize_model`; not modified) toward ``teacher``
    on ``batches`` (re-iterable: a list, a DataLoader, a SampleFolder) for ``steps`` optimizer
    steps or ``epochs`` passes (default: one epoch). Returns the fine-tuned quantized model;
    its report (manifest) records the training: steps, skipped steps, and the distillation loss
    on ``batches`` of ``qmodel`` (``loss_before``) and of the returned model (``loss_after``).

    With a ``torch.distributed`` process group, each rank passes its own shard of the batches;
    the student is wrapped in DistributedDataParallel and its gradients are averaged in 1-5-2
    with error feedback (``communication="e5m2"``, :mod:`hfp8.training.communication`) or in
    float32 (``"float32"``). Every rank takes the same number of steps (the smallest shard
    sets it), so uneven shards cannot hang the group; every rank returns the same model.

    **Never worse on held-out data.** The distillation loss of the deployable model is measured
    on ``validation`` (batches never trained on) or, by default (``hold_out``), on every 4th
    batch of ``batches``, which training then skips
    (:class:`hfp8.calibration.batches.HeldOutSplit`). Unless the fine-tuned model's held-out
    loss is lower than ``qmodel``'s, a copy of ``qmodel`` is returned instead; the report's
    ``held_out`` says which (``kept``: ``"fine-tuned"`` or ``"input"``) with both losses.
    With ``hold_out=False`` and no ``validation`` (or fewer than 2 batches) nothing is checked,
    and the report says so."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise ValueError("steps and epochs must be positive")
    if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if communication not in ("e5m2", "float32"):
        raise ValueError(f"communication must be 'e5m2' or 'float32', got {communication!r}")
    batches, validation = _split(batches, validation, hold_out)
    student, training = prepare_training(qmodel, config=config)
    teacher = teacher.eval()
    student.eval()  # frozen BatchNorm statistics and no dropout; gradients still flow
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in student.parameters()], lr=lr)
    device = model_device(student)
    total = steps if steps is not None else (epochs or 1) * len(batches)
    trained, state = _data_parallel(student, communication)
    if collective.active():
        total = int(collective.all_reduce(torch.tensor(total), "min"))
    schedule = itertools.islice(itertools.chain.from_iterable(itertools.repeat(batches)), total)
    losses = []
    start = time.perf_counter()
    bar = tqdm(schedule, total=total, desc="HFP8 fine-tuning", unit="step", disable=quiet,
               leave=False, dynamic_ncols=True)
    try:
        for batch in bar:
            batch = to_device(batch, device)
            with torch.no_grad():
                target = call_model(teacher, batch)
            output = call_model(trained, batch)
            loss = distillation_loss(target, output)
            _, _, left = split_batch(student, batch)
            if label_weight and left and torch.is_tensor(left[0]):
                logits = output_leaves(output)[0][1]
                loss = loss + label_weight * nn.functional.cross_entropy(logits, left[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.step(optimizer)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}", skipped=training.skipped)
    finally:
        bar.close()
    finished = finish_training(training, batches, quiet=quiet)
    record = finished.hfp8_report["training"]
    record.update({
        "kind": "distillation", "lr": lr, "seconds": time.perf_counter() - start,
        "loss_before": _mean_loss(qmodel, teacher, batches, device),
        "loss_after": _mean_loss(finished, teacher, batches, device)})
    if state is not None:
        record["communication"] = {
            "format": str(state.fmt), "error_feedback": state.error_feedback,
            "bytes_sent": state.bytes_sent, "float32_all_reduce_bytes": state.float32_bytes}
    if validation is None:
        record["held_out"] = {"checked": False}
        return finished
    before = _mean_loss(qmodel, teacher, validation, device)
    after = _mean_loss(finished, teacher, validation, device)
    kept = "fine-tuned" if after < before else "input"
    record["held_out"] = {"checked": True, "loss_before": before, "loss_after": after,
                          "kept": kept}
    if kept == "fine-tuned":
        return finished
    unchanged = copy.deepcopy(qmodel).eval()  # the caller's model stays as it was
    getattr(unchanged, REPORT_ATTRIBUTE)["training"] = record
    return unchanged


def _split(batches, validation, hold_out: bool):
    """(batches to train on, batches to judge on or None); see :func:`finetune`."""
    if validation is not None or not hold_out:
        return batches, validation
    try:
        split = HeldOutSplit(batches)
    except TypeError:
        return batches, None  # an iterator, or no length: nothing to hold out by position
    return (split.train, split.held_out) if split.total >= 2 else (batches, None)


@torch.no_grad()
def _mean_loss(student: nn.Module, teacher: nn.Module, batches, device) -> float:
    """Distillation loss of a deployable model, averaged over the batches (and over ranks).
    The losses seen during training are not used for the report: they come from the training
    form (delayed biases, float32 master weights), not from the model that is returned."""
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    flags = [(module, module.training) for module in student.modules()]
    student.eval()  # the deployed form; and a caller's model in train mode keeps its BN statistics
    try:
        for batch in batches:
            batch = to_device(batch, device)
            total += float(distillation_loss(call_model(teacher, batch), call_model(student, batch)))
            count += 1
    finally:
        for module, flag in flags:
            module.training = flag
    if collective.active():
        total, count = collective.all_reduce(total), collective.all_reduce(count)
    return float(total / count.clamp_min(1))


def _data_parallel(student: nn.Module, communication: str):
    """(the module to call, the hook's state): DDP with the 1-5-2 hook under a process group."""
    if not collective.active():
        return student, None
    from torch.nn.parallel import DistributedDataParallel

    from hfp8.training.communication import E5M2Communication, e5m2_hook

    parallel = DistributedDataParallel(student)
    if communication == "float32":
        return parallel, None
    state = E5M2Communication()
    parallel.register_comm_hook(state, e5m2_hook)
    return parallel, state
