"""Replaying what comes before a group: moments-only analysis passes skip the model's start.

A model whose second moments exceed ``MOMENTS_BYTES`` is measured group by group, from the last
group to the first (:func:`hfp8.ptq.calibrate.moment_groups`). Everything a pass computes before
its group's first layer is the same in every pass: the same batches, and every layer up there
still rounded to nearest with its values passing unrounded. So the first pass records, batch by
batch, the outputs of the modules that have finished when each later group's first layer (its
*cut*) is first called, and the pass of that group returns them instead of running those
modules. Without this, pass ``g`` of ``G`` runs the first ``g / G`` of the forward, about
``G / 2`` forwards in all; with it, each pass runs about its own group, about two forwards in
all, whatever ``G``.

**What is recorded for a cut**: the *frontier* when its layer is first called, that is, every
module that has returned while a module that called it (or the model) is still running, taken
at the coarsest level: a module's own children are forgotten when it returns (the decoder's
embeddings and finished blocks, and the first modules of the block holding the cut). Outputs are
kept by reference, not copied, up to a byte limit over all cuts and batches (past it, a module
runs).

**Replay is only a shortcut**: any module left out simply runs, so it leaves out (runs) every
module whose replay could differ from running it:

* called more than once in a forward (the same output would be handed to every call);
* one whose forward changed a tensor it was given (``_version`` of its inputs), or whose output
  changed after it returned (a later ``+=``; views share the counter): the replayed value would
  miss the change;
* an output other than a tensor or tuples of tensors, ``None`` and numbers (a list or dict
  could be changed in place unseen);
* with a global module hook in the process, every module (nothing is recorded).

A replayed module's own hooks run as when it runs: its pre-hooks (their effect on its inputs
goes unused), then its forward hooks on the recorded output, which is what its forward
returned, taken before them (the recorder's hook goes first). An attention owner's hooks, which
open and close the rounding of its products, pair up as usual. It assumes a deterministic
forward, as the passes' stopping point already does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils._pytree import tree_flatten

from hfp8.data.batches import current_batch

__all__ = ["PrefixOutputs"]

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _leaves(value) -> list | None:
    """The leaves of an output made of tensors, plain values and tuples, or None if it holds
    anything else (a list, a dict, an object)."""
    if torch.is_tensor(value) or isinstance(value, _PLAIN):
        return [value]
    if type(value) is tuple:
        leaves = []
        for item in value:
            found = _leaves(item)
            if found is None:
                return None
            leaves += found
        return leaves
    return None


def _versions(tensors) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


@dataclass(eq=False)
class _Call:
    """One running module: its inputs' versions, and the outputs of the calls it has seen return
    (``finished``: module -> (output, output tensors, their versions))."""

    module: nn.Module | None
    inputs: list = field(default_factory=list)
    versions: tuple = ()
    finished: dict = field(default_factory=dict)


class PrefixOutputs:
    """Records (:meth:`recording`), during one pass, the frontier of each cut layer of
    ``model`` per batch; replays (:meth:`replaying`) one cut's in a later pass. ``cuts``: names of
    the first layers of the groups measured after the first pass; ``limit_bytes``: the most
    the recorded outputs may hold (a CNN's early maps at a large batch could otherwise hold
    more than the moments the groups save)."""

    def __init__(self, model: nn.Module, cuts, limit_bytes: int) -> None:
        self.model, self.limit_bytes = model, limit_bytes
        self.cuts = {model.get_submodule(name): name for name in cuts}
        self.saved: dict[int, dict[str, dict]] = {}  # batch -> cut -> {module: output}
        self._held: dict[int, int] = {}  # storage address -> bytes, of every output recorded
        self.bytes_held = 0

    # -- recording ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self):
        """Within: every forward of ``model`` records its batch's frontiers (see the module
        docstring); call :meth:`batch_done` after each forward that completed."""
        self._stack, self._calls, self._frontiers = [_Call(None)], {}, {}
        self._active = not (module_globals._global_forward_hooks or
                            module_globals._global_forward_pre_hooks)
        handles = []
        try:
            for module in self.model.modules() if self._active else ():
                if module is not self.model:
                    handles.append(module.register_forward_pre_hook(self._entering,
                                                                    with_kwargs=True))
                    # first among its forward hooks: the forward's own return is recorded
                    handles.append(module.register_forward_hook(self._returned, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._stack, self._calls, self._frontiers = [_Call(None)], {}, {}

    def _entering(self, module, args, kwargs) -> None:
        self._calls[module] = self._calls.get(module, 0) + 1
        name = self.cuts.get(module)
        if name is not None and name not in self._frontiers:
            self._frontiers[name] = {m: entry for call in self._stack
                                     for m, entry in call.finished.items()}
        inputs, _ = tree_flatten((args, kwargs))
        tensors = [t for t in inputs if torch.is_tensor(t)]
        self._stack.append(_Call(module, tensors, _versions(tensors)))

    def _returned(self, module, args, output) -> None:
        if self._stack[-1].module is not module:
            # a call that never returned (caught inside the model): what was running is
            # unknown, so nothing finishing from here on sits inside a known call
            self._stack = [_Call(None)]
            return
        call = self._stack.pop()
        leaves = _leaves(output)
        if leaves is None or _versions(call.inputs) != call.versions:
            return
        tensors = [t for t in leaves if torch.is_tensor(t)]
        self._stack[-1].finished[module] = (output, tensors, _versions(tensors))

    def batch_done(self) -> None:
        """Keeps the frontiers of the batch just run (:func:`current_batch`), less the entries
        that turned out not to be replayable (called more than once, or changed after they
        returned) and those past ``limit_bytes`` held in all (tensor storages counted once;
        the latest cut's frontier first: it spares its pass the most)."""
        if self._active:
            kept = {}
            for name, frontier in reversed(self._frontiers.items()):
                kept[name] = {}
                for module, (output, tensors, versions) in frontier.items():
                    if self._calls.get(module) == 1 and _versions(tensors) == versions and \
                            self._hold(tensors):
                        kept[name][module] = output
            self.saved[current_batch()] = kept
        self._stack, self._calls, self._frontiers = [_Call(None)], {}, {}

    def _hold(self, tensors) -> bool:
        """Counts the storages of ``tensors`` not yet held; False (nothing counted) if they
        would take the bytes held past ``limit_bytes``."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        new = {key: size for key, size in storages.items() if key not in self._held}
        if self.bytes_held + sum(new.values()) > self.limit_bytes:
            return False
        self._held.update(new)
        self.bytes_held += sum(new.values())
        return True

    # -- replay ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def replaying(self, cut: str):
        """Within: each module recorded for ``cut`` returns, in the batch it was recorded in
        (:func:`current_batch`), its recorded output instead of running; the records of ``cut``
        are released on leaving."""
        modules = {module for batch in self.saved.values() for module in batch.get(cut, {})}
        overridden = {}
        try:
            for module in modules:
                overridden[module] = module.__dict__.get("forward")
                module.forward = self._replayed(module, module.forward, cut)
            yield
        finally:
            for module, previous in overridden.items():
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            for batch in self.saved.values():
                batch.pop(cut, None)

    def _replayed(self, module: nn.Module, forward, cut: str):
        def forward_or_recorded(*args, **kwargs):
            recorded = self.saved.get(current_batch(), {}).get(cut, {})
            if module in recorded:
                return recorded[module]
            return forward(*args, **kwargs)
        return forward_or_recorded
