"""hfp8.ptq.saved_tensors: what autograd keeps for backward, counted without changing it."""
from __future__ import annotations

import torch
from torch import nn

from hfp8.ptq.saved_tensors import SavedTensors


def test_each_saved_storage_counts_once_and_the_weights_not_at_all():
    """Linear saves its input and its weight (not counted); ReLU saves its output."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with SavedTensors(layer) as saved:
        torch.relu(layer(x))
    assert saved.bytes == (3 * 8 + 3 * 4) * 4


def test_the_graph_back_propagates_as_without_the_count():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    expected, = torch.autograd.grad(torch.relu(layer(x)).square().sum(), x)
    with SavedTensors(layer) as saved:
        y = torch.relu(layer(x)).square().sum()
    counted, = torch.autograd.grad(y, x)
    saved.release()
    assert torch.equal(counted, expected)
