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

from hfp8 import distributed
from hfp8.data.batches import HeldOutSplit, model_device, to_device
from hfp8.data.model_io import call_model, output_leaves, split_batch
from hfp8.ptq.operand_sites import owners_closed
from hfp8.ptq.report import report_of
from hfp8.training.augment import augment_inputs
from hfp8.training.config import TrainingConfig
from hfp8.training.hybrid import deployable_snapshot, finish_training, prepare_training

__all__ = ["finetune", "distillation_loss", "SCHEDULES"]


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


SCHEDULES = ("cosine", "constant")


@owners_closed()
def finetune(qmodel: nn.Module, teacher: nn.Module, batches, *, steps: int | None = None,
             epochs: int | None = None, lr: float = 1e-5, label_weight: float = 0.0,
             config: TrainingConfig = TrainingConfig(), communication: str = "e5m2",
             quiet: bool = False, validation=None, hold_out: bool = True, augment: bool = False,
             schedule: str = "cosine", patience: int | None = None) -> nn.Module:
    """Fine-tune ``qmodel`` (from :func:`hfp8.quantize_model`; not modified) toward ``teacher``
    on ``batches`` (re-iterable: a list, a DataLoader, a SampleFolder) for ``steps`` optimizer
    steps or ``epochs`` passes (default: one epoch). Returns the fine-tuned quantized model;
    its report (manifest) records the training: steps, skipped steps, and the distillation loss
    on ``batches`` of ``qmodel`` (``loss_before``) and of the returned model (``loss_after``).

    **Few samples.** With ``augment`` (off by default: on MobileNetV2 it raised agreement in
    some runs but never lowered KL, see docs/results.md) each step's image inputs are replaced
    by random resized
    crops and mirror images, the same views for teacher and student
    (:mod:`hfp8.training.augment`; seeded by ``config.seed``); inputs that are not images are
    used as they are. The learning rate follows ``schedule``: ``"cosine"`` decays it from ``lr``
    to 0 over the planned steps (Loshchilov & Hutter, SGDR, 2017), ``"constant"`` keeps it.

    **Never worse on held-out data; the best epoch is kept.** The distillation loss of the
    deployable model is measured on ``validation`` (batches never trained on) or, by default
    (``hold_out``), on every 4th batch of ``batches``, which training then skips
    (:class:`hfp8.data.batches.HeldOutSplit`): for ``qmodel`` before training and for
    the deployable model after every epoch (and after the last step). The model with the lowest
    held-out loss is returned (``qmodel``'s copy when no epoch beats it: checkpoint selection,
    the form of early stopping that costs no steps); with ``patience`` training also stops
    after that many epochs without a new best (held-out losses on few samples are noisy: on
    issue 20's small CNN two worse epochs came before the best one). The report's ``held_out`` lists every
    measurement and says which model was kept (``kept``: ``"fine-tuned"`` or ``"input"``,
    ``epoch``). With ``hold_out=False`` and no ``validation`` (or fewer than 2 batches) nothing
    is checked, every step is taken, and the report says so.

    With a ``torch.distributed`` process group, each rank passes its own shard of the batches;
    the student is wrapped in DistributedDataParallel and its gradients are averaged in 1-5-2
    with error feedback (``communication="e5m2"``, :mod:`hfp8.training.communication`) or in
    float32 (``"float32"``). Every rank takes the same number of steps (the smallest shard
    sets it), so uneven shards cannot hang the group; held-out losses are averaged over ranks,
    so every rank keeps the same epoch and returns the same model."""
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise ValueError("steps and epochs must be positive")
    if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if communication not in ("e5m2", "float32"):
        raise ValueError(f"communication must be 'e5m2' or 'float32', got {communication!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):
        raise ValueError(f"patience must be a positive int or None, got {patience!r}")
    batches, validation = _split(batches, validation, hold_out)
    student, training = prepare_training(qmodel, config=config)
    teacher = teacher.eval()
    student.eval()  # frozen BatchNorm statistics and no dropout; gradients still flow
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in student.parameters()], lr=lr)
    device = model_device(student)
    epoch_length = len(batches)
    total = steps if steps is not None else (epochs or 1) * epoch_length
    trained, state = _data_parallel(student, communication)
    if distributed.active():
        total = int(distributed.all_reduce(torch.tensor(total), "min"))
        epoch_length = int(distributed.all_reduce(torch.tensor(epoch_length), "min"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) \
        if schedule == "cosine" else None
    generator = torch.Generator().manual_seed(config.seed * 7919 + distributed.world()[0])
    stream = itertools.islice(itertools.chain.from_iterable(itertools.repeat(batches)), total)
    held, best = {"checked": validation is not None}, None  # best: (loss, model or None, epoch)
    if validation is not None:
        held.update(epochs=[], loss_before=_mean_loss(qmodel, teacher, validation, device))
        best = (held["loss_before"], None, 0)
    start, augmented = time.perf_counter(), False
    bar = tqdm(stream, total=total, desc="HFP8 fine-tuning", unit="step", disable=quiet,
               leave=False, dynamic_ncols=True)
    try:
        for index, batch in enumerate(bar, 1):
            args, kwargs, left = split_batch(student, to_device(batch, device))
            if augment:
                args, kwargs, viewed = augment_inputs(args, kwargs, generator)
                augmented = augmented or viewed
            with torch.no_grad():
                target = teacher(*args, **kwargs)
            output = trained(*args, **kwargs)
            loss = distillation_loss(target, output)
            if label_weight and left and torch.is_tensor(left[0]):
                logits = output_leaves(output)[0][1]
                loss = loss + label_weight * nn.functional.cross_entropy(logits, left[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.step(optimizer)
            if scheduler is not None:
                scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4g}", skipped=training.skipped)
            if validation is None or (index % epoch_length and index != total):
                continue
            epoch = math.ceil(index / epoch_length)
            snapshot = deployable_snapshot(training, qmodel, batches, quiet=True)
            loss_now = _mean_loss(snapshot, teacher, validation, device)
            held["epochs"].append({"epoch": epoch, "steps": index, "loss": loss_now})
            if loss_now < best[0]:
                best = (loss_now, snapshot, epoch)
            elif patience is not None and epoch - best[2] >= patience:
                held["stopped_early"] = True
                break
    finally:
        bar.close()
    finished = finish_training(training, batches, quiet=quiet) if best is None else best[1]
    kept = finished if finished is not None else copy.deepcopy(qmodel).eval()
    record = training.report()
    record.update({
        "kind": "distillation", "lr": lr, "schedule": schedule, "augmented": augmented,
        "seconds": time.perf_counter() - start,
        "loss_before": _mean_loss(qmodel, teacher, batches, device),
        "loss_after": _mean_loss(kept, teacher, batches, device)})
    if state is not None:
        record["communication"] = {
            "format": str(state.fmt), "error_feedback": state.error_feedback,
            "bytes_sent": state.bytes_sent, "float32_all_reduce_bytes": state.float32_bytes}
    if validation is not None:
        held.update({"kept": "input" if finished is None else "fine-tuned", "epoch": best[2],
                     "loss_after": best[0]})
    record["held_out"] = held
    report_of(kept).training = record
    return kept


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
    if distributed.active():
        total, count = distributed.all_reduce(total), distributed.all_reduce(count)
    return float(total / count.clamp_min(1))


def _data_parallel(student: nn.Module, communication: str):
    """(the module to call, the hook's state): DDP with the 1-5-2 hook under a process group."""
    if not distributed.active():
        return student, None
    from torch.nn.parallel import DistributedDataParallel

    from hfp8.training.communication import E5M2Communication, e5m2_hook

    parallel = DistributedDataParallel(student)
    if communication == "float32":
        return parallel, None
    state = E5M2Communication()
    parallel.register_comm_hook(state, e5m2_hook)
    return parallel, state
