"""What sharded calibration needs from torch.distributed, and how ranks agree on failure.

When a process group is initialized (``torchrun``, or ``torch.distributed.init_process_group``),
the calibration statistics are reduced across ranks, each next to the thing it reduces
(:meth:`HistogramObserver.reduce`, BatchNorm moments, input moments, sensitivity totals), so that
every rank ends with the biases and statistics one process would compute over the union of all
ranks' samples. Without a process group every function here is a no-op.

**Failure without hangs.** A rank that fails must not leave the others waiting in a collective.
Every reduction starts with :func:`checkpoint` (a one-integer all-reduce: "did anyone fail?"),
and a failing rank, on its way out of :func:`agreed`, sends exactly one such integer (its rank
+ 1) to match the others' next checkpoint; they then raise :class:`DistributedError` naming it.
A rank that dies without a word (killed) leaves the others blocked until the process group's
timeout (``init_process_group(timeout=...)``; the command line sets it with --dist-timeout),
which then ends them with an error.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["active", "world", "checkpoint", "agreed", "all_reduce", "all_gather",
           "DistributedError"]


class DistributedError(RuntimeError):
    """Another rank failed; this one stops too."""


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _exchange(value: int) -> int:
    flag = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag)


def checkpoint() -> None:
    """Every rank says it is well; raises :class:`DistributedError` if one is not."""
    if active():
        failed = _exchange(0)
        if failed:
            raise DistributedError(f"rank {failed - 1} of {world()[1]} failed (its own error says "
                                   "why); stopping this rank too")


@contextlib.contextmanager
def agreed():
    """A section all ranks finish together: a local error tells the others (once)."""
    try:
        yield
        checkpoint()
    except DistributedError:
        raise
    except BaseException as error:
        if active() and not getattr(error, "_hfp8_told", False):
            error._hfp8_told = True  # nested sections tell the others only once
            _exchange(world()[0] + 1)
        raise


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks (after a checkpoint); returns ``tensor``."""
    if active():
        checkpoint()
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                     "min": torch.distributed.ReduceOp.MIN}[op]
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order."""
    if not active():
        return [tensor]
    checkpoint()
    gathered = [torch.empty_like(tensor) for _ in range(world()[1])]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    return gathered
