"""Iterating over calibration data: batches of any structure, on the model's device, with a
progress bar. How a batch is passed to the model is :mod:`hfp8.model_io`'s business."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from hfp8.model_io import map_tensors

__all__ = ["calibration_batches", "model_device", "Peeked", "to_device", "HeldOutSplit"]


def model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch, device: torch.device):
    return map_tensors(batch, lambda tensor: tensor.to(device))


def _length(calibration, num_batches: int | None) -> int | None:
    try:
        length = len(calibration)
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)


class Peeked:
    """An iterable read once whose first ``count`` items were already taken (and are kept):
    iterating gives them back first, then the rest, so a one-shot source (a generator, any
    iterator) is read once; re-iterable sources (lists, DataLoaders, sample folders) are simply
    iterated anew. Keeps ``len`` when the source has one (for progress bars)."""

    def __init__(self, source: Iterable, count: int = 1) -> None:
        self._source = source
        self._one_shot = isinstance(source, Iterator)
        self._iterator = iter(source)
        self.head = list(itertools.islice(self._iterator, count))
        self.first = self.head[0] if self.head else None

    def __iter__(self):
        if not self._one_shot:
            return iter(self._source)
        return itertools.chain(self.head, self._iterator)

    def __len__(self) -> int:
        return len(self._source)


def calibration_batches(calibration, num_batches: int | None, device: torch.device,
                        description: str, quiet: bool) -> Iterator:
    """Yields at most ``num_batches`` batches moved to ``device``, behind a tqdm bar."""
    if not isinstance(calibration, Iterable) or torch.is_tensor(calibration):
        raise TypeError("calibration must be an iterable of input batches (a list of tensors, a "
                        f"DataLoader, a SampleFolder), got {type(calibration).__name__}")
    batches = calibration if num_batches is None else itertools.islice(calibration, num_batches)
    bar = tqdm(batches, total=_length(calibration, num_batches), desc=description, unit="batch",
               disable=quiet, leave=False, dynamic_ncols=True)
    try:
        for batch in bar:
            yield to_device(batch, device)
    finally:
        bar.close()


class HeldOutSplit:
    """Re-iterable views of ``batches`` that hold part of them out: batch ``u`` (counted over
    the whole data set) is held out when ``u % 4 == 3``, or, with 2 or 3 batches in all, when it
    is the last. ``train`` and ``held_out`` iterate the source anew each time (it must be
    re-iterable: a list, a DataLoader, a SampleFolder). Sharded (torch.distributed), batch ``i``
    of rank ``r`` is batch ``i * world + r`` of the whole, the round-robin order of
    :class:`hfp8.calibration.SampleFolder`'s shards; ``total`` is the whole count."""

    def __init__(self, batches: Iterable, total: int, rank: int = 0, world: int = 1) -> None:
        if isinstance(batches, Iterator):
            raise TypeError("holding batches out needs a re-iterable source (a list, a "
                            "DataLoader, a SampleFolder), not an iterator")
        self.batches, self.total, self.rank, self.world = batches, total, rank, world
        self.train, self.held_out = _Filtered(self, False), _Filtered(self, True)

    def is_held_out(self, index: int) -> bool:
        if self.total < 2:
            return False
        return index % 4 == 3 if self.total >= 4 else index == self.total - 1


class _Filtered:
    def __init__(self, split: HeldOutSplit, held_out: bool) -> None:
        self.split, self.wanted = split, held_out

    def __iter__(self):
        split = self.split
        for index, batch in enumerate(split.batches):
            if split.is_held_out(index * split.world + split.rank) == self.wanted:
                yield batch

    def __len__(self) -> int:
        split = self.split
        mine = range(split.rank, split.total, split.world)
        return sum(split.is_held_out(u) == self.wanted for u in mine)
