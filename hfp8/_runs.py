"""Consecutive runs of items under a byte limit: how the pipeline bounds what it holds at once
(second moments per analysis pass, compensated-rounding work space, weights per replay
session)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["runs_within"]

Item = TypeVar("Item")


def runs_within(items: Iterable[Item], size: Callable[[Item], int],
                limit: int) -> Iterator[list[Item]]:
    """``items`` in order, cut into consecutive runs whose ``size`` (bytes) sum to at most
    ``limit``; an item larger than ``limit`` gets a run of its own. No run is empty."""
    run: list[Item] = []
    used = 0
    for item in items:
        cost = size(item)
        if run and used + cost > limit:
            yield run
            run, used = [], 0
        run.append(item)
        used += cost
    if run:
        yield run
