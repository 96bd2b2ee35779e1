"""Batches of any structure: a packed sequence is one input, sized by its sequences."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, unpack_sequence

from hfp8.data.model_io import (
    batch_size,
    describe_batch,
    map_tensors,
    slice_batch,
    split_batch,
    weight_sharing_copy,
)


def _packed():
    return pack_sequence([torch.full((n, 2), float(n)) for n in (3, 5, 1)], enforce_sorted=False)


def test_a_packed_sequence_is_one_input_sized_by_its_sequences():
    packed = _packed()
    args, kwargs, left = split_batch(nn.LSTM(2, 3), packed)
    assert args == (packed,) and not kwargs and not left
    assert batch_size(packed) == 3 and batch_size((packed, torch.zeros(3))) == 3
    assert "packed sequence of 3 sequences" in describe_batch(packed)


def test_slicing_a_packed_batch_keeps_its_first_sequences_in_order():
    sliced = slice_batch(_packed(), 2)
    assert [s[:, 0].tolist() for s in unpack_sequence(sliced)] == [[3.0] * 3, [5.0] * 5]
    labelled = slice_batch((_packed(), torch.tensor([7, 8, 9])), 2)
    assert batch_size(labelled) == 2 and labelled[1].tolist() == [7, 8]


def test_slicing_from_a_start_takes_those_samples_and_keeps_shared_tensors_whole():
    sliced = slice_batch(_packed(), 2, start=1)
    assert [s[:, 0].tolist() for s in unpack_sequence(sliced)] == [[5.0] * 5, [1.0]]
    batch = {"ids": torch.arange(8).reshape(4, 2), "mask": torch.ones(2)}
    middle = slice_batch(batch, 2, start=1)
    assert middle["ids"].tolist() == [[2, 3], [4, 5]] and middle["mask"].shape == (2,)
    assert slice_batch(batch, 3, start=3)["ids"].tolist() == [[6, 7]]  # past the end: the rest


def test_mapping_a_packed_sequence_maps_its_data_and_keeps_its_steps():
    doubled = map_tensors(_packed(), lambda t: t.double())
    assert doubled.data.dtype == torch.float64 and doubled.batch_sizes.dtype == torch.int64
    assert torch.equal(doubled.batch_sizes, _packed().batch_sizes)


def test_a_weight_sharing_copy_reads_the_same_weights_and_changes_nothing_of_the_original():
    embed = nn.Embedding(10, 4)
    model = nn.Sequential(embed, nn.Linear(4, 4), nn.BatchNorm1d(3), nn.Linear(4, 10))
    model[3].weight = embed.weight  # tied
    copied = weight_sharing_copy(model)
    for (name, original), (_, shared) in zip(model.named_parameters(remove_duplicate=False),
                                             copied.named_parameters(remove_duplicate=False)):
        assert shared.data_ptr() == original.data_ptr(), name  # no copy of the weights
        assert not shared.requires_grad and original.requires_grad, name
    assert copied[3].weight is copied[0].weight  # still tied
    assert copied[2].running_mean.data_ptr() != model[2].running_mean.data_ptr()  # buffers copied
    calls = []
    copied[1].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randint(0, 10, (2, 3))
    assert torch.equal(copied.eval()(x), model.eval()(x).detach())
    copied.train()(x)  # BatchNorm updates the copy's running statistics only
    assert calls == [1, 1] and not model[1]._forward_hooks
    assert torch.equal(model[2].running_mean, torch.zeros(3)) and not model.training
