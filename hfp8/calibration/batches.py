"""Iterating over calibration data: inputs only, on the model's device, with a progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["model_inputs", "calibration_batches", "model_device"]


def model_inputs(batch) -> torch.Tensor:
    """The model input of one calibration batch: a tensor, or the first item of a tuple/list
    (``(inputs, targets)`` from a labelled DataLoader; targets are never used)."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(
        "each calibration batch must be a tensor or a (inputs, ...) tuple/list whose first item "
        f"is a tensor; got {type(batch).__name__}"
    )


def model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _length(calibration, num_batches: int | None) -> int | None:
    try:
        length = len(calibration)
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)


def calibration_batches(calibration, num_batches: int | None, device: torch.device,
                        description: str, quiet: bool) -> Iterator[torch.Tensor]:
    """Yields at most ``num_batches`` model inputs moved to ``device``, behind a tqdm bar."""
    if not isinstance(calibration, Iterable) or torch.is_tensor(calibration):
        raise TypeError("calibration must be an iterable of input batches (a list of tensors, a "
                        f"DataLoader, a SampleFolder), got {type(calibration).__name__}")
    batches = calibration if num_batches is None else itertools.islice(calibration, num_batches)
    bar = tqdm(batches, total=_length(calibration, num_batches), desc=description, unit="batch",
               disable=quiet, leave=False, dynamic_ncols=True)
    try:
        for batch in bar:
            yield model_inputs(batch).to(device)
    finally:
        bar.close()
