"""What autograd saves for backward, counted: the bytes a forward holds until its backward.

Used by :mod:`hfp8.ptq.sensitivity` to size its chunks of samples; CPU tensors have no
allocator statistics to read, so the saved tensors themselves are counted (each storage once,
the model's weights not at all).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["SavedTensors"]


class SavedTensors:
    """Within: counts the bytes of the storages autograd saves for backward (``model``'s
    weights not counted). The tensors are held here and the graph keeps weak references to
    them: a graph holding an output it saves through a hook would be a reference cycle through
    C++ that Python's collector cannot free, should the graph never be back-propagated.
    :meth:`release` drops them."""

    def __init__(self, model: nn.Module) -> None:
        self._weights = {t.untyped_storage().data_ptr()
                         for t in (*model.parameters(), *model.buffers())}
        self._storages: dict[int, int] = {}
        self._kept: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor):
        storage = tensor.untyped_storage()  # held below: pointers stay unique
        if storage.data_ptr() not in self._weights:
            self._storages[storage.data_ptr()] = storage.nbytes()
        self._kept.append(tensor)
        return weakref.ref(tensor)

    @staticmethod
    def _unpack(reference):
        return reference()

    def release(self) -> None:
        self._kept.clear()

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
