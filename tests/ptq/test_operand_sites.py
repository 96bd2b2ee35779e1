"""Attention owners open the rounding mode in a pre-hook and close it in an always-called forward
hook, which torch skips on a BaseException: every hfp8 entry point that runs a quantized model
closes what a Ctrl-C inside an attention block left open."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hfp8
from hfp8.ptq.evaluation import collect_logits
from hfp8.training.distill import finetune
from tests.ptq.test_prefix_replay import Attending, _nothing_left_open


class AttendingWithNorm(Attending):
    """Attention blocks, then a BatchNorm (so that BN re-estimation runs the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.norm(super().forward(x))


def _interrupt(module, args):
    raise KeyboardInterrupt


def _entry_points(tmp_path):
    """(name -> callable(qmodel, float model, batches), the file verify_onnx reads)."""
    path = tmp_path / "attending.onnx"
    return {
        "compare_outputs": lambda q, f, b: hfp8.compare_outputs(f, q, b),
        "collect_logits": lambda q, f, b: collect_logits(q, b),
        "recalibrate_batchnorm": lambda q, f, b: hfp8.recalibrate_batchnorm(q, b, quiet=True),
        "export_onnx": lambda q, f, b: hfp8.export_onnx(q, tmp_path / "other.onnx", b[0]),
        "verify_onnx": lambda q, f, b: hfp8.verify_onnx(q, path, b),
        "finetune": lambda q, f, b: finetune(q, f, b, steps=1, quiet=True),
    }, path


@pytest.mark.parametrize("entry_point", ["compare_outputs", "collect_logits",
                                         "recalibrate_batchnorm", "export_onnx", "verify_onnx",
                                         "finetune"])
def test_an_interrupt_inside_an_attention_block_leaves_no_owner_open(entry_point, tmp_path):
    """Ctrl-C while an attention block runs under each entry point: the owner is closed on the
    way out, so no rounding mode stays active in the process (quantize_model's own case is in
    test_prefix_replay)."""
    torch.manual_seed(0)
    model = AttendingWithNorm().eval()
    batches = [torch.randn(2, 6, 8) for _ in range(3)]
    qmodel = hfp8.quantize_model(model, batches, quiet=True)
    calls, path = _entry_points(tmp_path)
    if entry_point == "verify_onnx":
        hfp8.export_onnx(qmodel, path, batches[0])
    handle = qmodel.blocks[1].o.register_forward_pre_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt):
        calls[entry_point](qmodel, model, batches)
    assert _nothing_left_open()
    handle.remove()
