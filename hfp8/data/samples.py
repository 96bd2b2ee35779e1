"""Batches of calibration / evaluation samples read from a folder.

Files are found recursively (hidden files and hidden folders skipped) and sorted by their path
components, so the order does not depend on the file system. Supported files:

* images (``.jpg .jpeg .png .bmp .webp``, any case): decoded with PIL and passed through
  ``preprocess_image`` (resize, centre crop, normalize; see ``image_preprocessing``), giving
  ``(channels, crop, crop)`` float32 tensors;
* ``.npy`` (``numpy.load(allow_pickle=False)``) and ``.pt`` (``torch.load(weights_only=True)``,
  one tensor or a dict of named tensors): used as they are (see ``sample_files``). Each file is
  ONE sample of any shape; a leading batch dimension is not unwrapped (a ``(1, 3, 224, 224)``
  file gives batches of shape ``(B, 1, 3, 224, 224)``), so save one sample per file. Dict samples
  give dict batches (each entry stacked), passed to the model as keyword arguments.

With ``labels=True`` the samples are those inside the class sub-folders; files directly in the
folder are ignored. Linked folders are not followed (linked class folders are).

Every sample must have the shape of the first one; a different shape raises ``SampleError``.
Files that cannot be decoded, that are too large to decode safely or that hold NaN or Inf are
skipped (``strict=False``) or raise ``SampleError``. Skipped
files are remembered by the reader: one ``RuntimeWarning`` is issued by the pass that first meets
them, and later passes leave them out silently. ``len()`` and ``num_samples`` assume every file
decodes until a pass has found otherwise.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hfp8.data.image_preprocessing import preprocess_image
from hfp8.data.sample_config import SampleConfig
from hfp8.data.sample_files import (
    IMAGE_EXTENSIONS,
    TENSOR_EXTENSIONS,
    SampleError,
    discover_samples,
    read_sample,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "TENSOR_EXTENSIONS",
    "SampleError",
    "SampleFolder",
]

_WARN_NAMES = 3


def _shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        from hfp8 import distributed

        return distributed.world()
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise SampleError(f"give both rank and world_size, with 0 <= rank < world_size; got "
                          f"{rank!r} and {world_size!r}")
    return rank, world_size


class SampleFolder:
    """Re-iterable batches of the samples in ``path`` (see the module docstring).

    Sharded for distributed calibration: rank ``r`` of ``w`` reads batches ``r, r + w, r + 2w,
    ...`` of the batches one process would read (whole batches, so that BatchNorm's batch
    statistics, and with them everything measured downstream, are the same as in one process;
    a batch with an unusable file is just smaller). ``rank``/``world_size`` default to the
    initialized ``torch.distributed`` process group, if any (``rank=0, world_size=1`` reads
    everything).

    Each ``iter()`` starts over and yields the same batches in the same order: float32 tensors of
    shape ``(B, *sample_shape)`` (``(B, C, H, W)`` for images), or ``(inputs, targets)`` with
    int64 ``targets`` of shape ``(B,)`` when ``config.labels``. All batches hold ``batch_size``
    samples except possibly the last.
    """

    def __init__(self, path: str | os.PathLike, config: SampleConfig | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.path = Path(path)
        self.config = config if config is not None else SampleConfig()
        files, targets, self._class_names = discover_samples(self.path, self.config.recursive,
                                                             self.config.labels)
        count = self.config.num_samples
        if count is not None and count < len(files):
            keep = sorted(random.Random(self.config.seed).sample(range(len(files)), count))
            files, targets = [files[i] for i in keep], [targets[i] for i in keep]
        self.rank, self.world_size = _shard(rank, world_size)
        self._batch_ends: frozenset[int] = frozenset()
        if self.world_size > 1:  # this rank's shard: every world_size-th batch of the whole list
            size = self.config.batch_size
            batches = -(-len(files) // size)
            if batches < self.world_size:  # every rank sees the same files, so all refuse alike
                made = f"{batches} batch{'' if batches == 1 else 'es'} of {size}"
                raise SampleError(f"rank {self.world_size - 1} of {self.world_size} gets no "
                                  f"sample from {self.path}: {len(files)} samples make {made}, "
                                  f"fewer than the {self.world_size} ranks (a smaller batch "
                                  "size gives every rank one)")
            starts = list(range(self.rank * size, len(files), size * self.world_size))
            chunks = [range(start, min(start + size, len(files))) for start in starts]
            files = [files[i] for chunk in chunks for i in chunk]
            targets = [targets[i] for chunk in chunks for i in chunk]
            ends = [sum(len(c) for c in chunks[:k + 1]) - 1 for k in range(len(chunks))]
            self._batch_ends = frozenset(ends)
        self._files = tuple(files)
        self._targets = tuple(targets)
        self._skipped: dict[Path, str] = {}  # unreadable file -> reason, filled by passes
        self._first: tuple[Path, tuple[int, ...]] | None = None  # reference sample and shape
        c = self.config
        self._preprocess = functools.partial(preprocess_image, channels=c.channels,
                                             resize=c.resize, crop=c.crop, mean=c.mean, std=c.std)

    @property
    def files(self) -> tuple[Path, ...]:
        """The selected sample files in iteration order, unreadable ones included."""
        return self._files

    @property
    def skipped(self) -> dict[Path, str]:
        """Files found unreadable so far, with the reason (a copy)."""
        return dict(self._skipped)

    @property
    def num_samples(self) -> int:
        """Samples a pass yields (files not yet known to be unreadable)."""
        return len(self._files) - len(self._skipped)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Sorted class sub-folder names (index = class id); ``None`` without ``labels``."""
        return self._class_names if self.config.labels else None

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.config.batch_size)

    def __repr__(self) -> str:
        return (f"SampleFolder({str(self.path)!r}, samples={self.num_samples}, "
                f"batches={len(self)})")

    def _decoded(self, todo: list[int]) -> Iterator[tuple[int, torch.Tensor | None, str]]:
        """``(index, tensor or None, reason)`` for each index in ``todo``, in order."""
        if self.config.workers == 0:
            for i in todo:
                yield (i, *read_sample(self._files[i], self._preprocess))
            return
        # Bounded look-ahead keeps memory flat on large folders (Executor.map would submit all).
        ahead = self.config.batch_size + 2 * self.config.workers
        pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="hfp8-samples")

        def submit(j: int):
            return j, pool.submit(read_sample, self._files[j], self._preprocess)

        try:
            queue = iter(todo)
            pending = deque(submit(j) for j in itertools.islice(queue, ahead))
            while pending:
                i, future = pending.popleft()
                pending.extend(submit(j) for j in itertools.islice(queue, 1))
                yield (i, *future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_shape(self, path: Path, tensor) -> None:
        shape = {k: tuple(v.shape) for k, v in tensor.items()} if isinstance(tensor, dict) \
            else tuple(tensor.shape)
        if self._first is None:
            self._first = (path, shape)
        elif shape != self._first[1]:
            first, expected = self._first
            raise SampleError(f"{path} has shape {shape} but {first} has {expected}; "
                              f"all samples must share one shape")

    def _batch(self, tensors: list, targets: list[int]):
        if isinstance(tensors[0], dict):
            inputs = {key: torch.stack([t[key] for t in tensors]) for key in tensors[0]}
        else:
            inputs = torch.stack(tensors)
        if self.config.labels:
            return inputs, torch.tensor(targets, dtype=torch.int64)
        return inputs

    def _warn(self, new: list[Path]) -> None:
        names = ", ".join(f"{p.relative_to(self.path).as_posix()} ({self._skipped[p]})"
                          for p in new[:_WARN_NAMES])
        more = ", ..." if len(new) > _WARN_NAMES else ""
        noun = "file" if len(new) == 1 else "files"
        warnings.warn(f"skipped {len(new)} unusable sample {noun} in {self.path}: "
                      f"{names}{more} (strict=True raises instead)", RuntimeWarning, stacklevel=3)

    def __iter__(self):
        todo = [i for i, p in enumerate(self._files) if p not in self._skipped]
        return self._pass(todo)

    def _pass(self, todo: list[int]):
        tensors: list[torch.Tensor] = []
        targets: list[int] = []
        produced = 0
        new_skips: list[Path] = []
        decoded = self._decoded(todo)
        try:
            for i, tensor, reason in decoded:
                path = self._files[i]
                if tensor is None:
                    if self.config.strict:
                        raise SampleError(f"cannot use sample {path}: {reason}")
                    self._skipped[path] = reason
                    new_skips.append(path)
                else:
                    self._check_shape(path, tensor)
                    tensors.append(tensor)
                    targets.append(self._targets[i])
                if tensors and (len(tensors) == self.config.batch_size or i in self._batch_ends):
                    produced += len(tensors)
                    batch = self._batch(tensors, targets)
                    tensors, targets = [], []
                    yield batch
            produced += len(tensors)
            if produced == 0:
                first, reason = next(iter(self._skipped.items()))
                new_skips = []  # the error below says it all; no warning on top
                name = first.relative_to(self.path).as_posix()
                raise SampleError(f"all {len(self._files)} sample files in {self.path} are "
                                  f"unusable (first: {name}: {reason})")
            if tensors:
                yield self._batch(tensors, targets)
        finally:
            decoded.close()  # stops the thread pool now, not whenever this frame is collected
            if new_skips:  # also when the caller stops early: report what this pass found
                self._warn(new_skips)
