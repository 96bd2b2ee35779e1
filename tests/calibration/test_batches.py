"""Peeked: the calibration iterable quantize_model reads, its first batches kept."""

import itertools

import torch

from hfp8.calibration.batches import Peeked


class _Shuffling:
    """A re-iterable source that gives a different order on every iteration (a shuffling
    DataLoader) and counts its iterations."""

    def __init__(self, items):
        self.items, self.iterations = list(items), 0

    def __iter__(self):
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.iterations))
        self.iterations += 1
        return iter([self.items[int(i)] for i in order])

    def __len__(self):
        return len(self.items)


def test_every_pass_starts_with_the_same_first_batches_from_a_shuffling_source():
    source = _Shuffling(range(10))
    peeked = Peeked(source, 3)
    head = list(peeked.head)
    for _ in range(3):
        seen = list(peeked)
        assert seen[:3] == head
        assert len(seen) == 10  # the rest comes from a new iteration, its first 3 skipped
    assert len(peeked) == 10


def test_taking_only_the_kept_batches_starts_no_new_iteration():
    source = _Shuffling(range(10))
    peeked = Peeked(source, 2)
    assert source.iterations == 1
    assert list(itertools.islice(peeked, 2)) == peeked.head
    assert source.iterations == 1


def test_a_one_shot_source_is_read_once():
    pulled = []

    def generate():
        for index in range(5):
            pulled.append(index)
            yield index
    peeked = Peeked(generate(), 2)
    assert list(itertools.islice(peeked, 2)) == [0, 1]
    assert pulled == [0, 1]
    assert list(peeked) == [0, 1, 2, 3, 4]
    assert pulled == [0, 1, 2, 3, 4]
