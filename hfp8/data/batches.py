"""Iterating over calibration data: batches of any structure, on the model's device, with a
progress bar. How a batch is passed to the model is :mod:`hfp8.data.model_io`'s business."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from hfp8 import distributed
from hfp8.data.model_io import map_tensors

__all__ = ["calibration_batches", "current_batch", "model_device", "Peeked", "to_device",
           "HeldOutSplit"]


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


_current_batch: int | None = None  # the batch a pass is running, counted over all ranks


def current_batch() -> int | None:
    """Index of the batch the running pass is on, counted over the whole data set (batch ``i``
    of rank ``r`` of ``w`` is ``i * w + r``), or None outside a pass. Seeded sampling derives its
    seed from it (:meth:`HistogramObserver.observe`, :meth:`InputMoments.observe`), so that a
    batch draws the same samples whichever rank runs it: sharded results equal one process's."""
    return _current_batch


def reseed_for_batch(owner) -> None:
    """Re-seed ``owner.generator`` from ``owner.seed`` and the running batch's index, once per
    batch (``owner._batch`` remembers it); outside a pass the generator runs on unchanged."""
    batch = _current_batch
    if batch is not None and batch != owner._batch:
        owner._batch = batch
        owner.generator.manual_seed(owner.seed * 1_000_003 + batch)


def calibration_batches(calibration, num_batches: int | None, device: torch.device,
                        description: str, quiet: bool) -> Iterator:
    """Yields the batches moved to ``device``, behind a tqdm bar: at most ``num_batches`` over
    the whole data set, that is, under torch.distributed the local batches ``i`` with
    ``i * world + rank < num_batches`` (one process: the first ``num_batches``). While a batch
    is out, :func:`current_batch` gives its index over the whole data set."""
    global _current_batch
    if not isinstance(calibration, Iterable) or torch.is_tensor(calibration):
        raise TypeError("calibration must be an iterable of input batches (a list of tensors, a "
                        f"DataLoader, a SampleFolder), got {type(calibration).__name__}")
    rank, world = distributed.world()
    local = None if num_batches is None else max(0, -(-(num_batches - rank) // world))
    batches = calibration if local is None else itertools.islice(calibration, local)
    bar = tqdm(batches, total=_length(calibration, local), desc=description, unit="batch",
               disable=quiet, leave=False, dynamic_ncols=True)
    outer = _current_batch
    try:
        for index, batch in enumerate(bar):
            _current_batch = index * world + rank
            yield to_device(batch, device)
    finally:
        _current_batch = outer
        bar.close()


class HeldOutSplit:
    """Re-iterable views of ``batches`` that hold part of them out: batch ``u`` (counted over
    the whole data set) is held out when ``u % 4 == 3``, or, with 2 or 3 batches in all, when it
    is the last; with one batch, none is. ``train`` and ``held_out`` iterate the source anew each
    time (it must be re-iterable and have a length: a list, a DataLoader, a SampleFolder).
    Sharded (torch.distributed), batch ``i`` of rank ``r`` is batch ``i * world + r`` of the
    whole, the round-robin order of :class:`hfp8.data.SampleFolder`'s shards; ``total``,
    the whole count, is summed over ranks."""

    def __init__(self, batches: Iterable) -> None:
        if isinstance(batches, Iterator):
            raise TypeError("holding batches out needs a re-iterable source (a list, a "
                            "DataLoader, a SampleFolder), not an iterator")
        self.batches = batches
        self.rank, self.world = distributed.world()
        count = torch.tensor(len(batches))
        self.total = int(distributed.all_reduce(count)) if distributed.active() else int(count)
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
