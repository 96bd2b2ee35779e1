"""Moments-only analysis passes replay what the first pass computed before their group: fewer
forwards, the same weights as one pass, and every module whose replay could differ is run."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hfp8
from hfp8.data.batches import calibration_batches
from hfp8.ptq import pipeline
from hfp8.ptq.prefix_replay import PrefixOutputs
from tests.ptq.test_moment_groups import (
    _assert_one_layer_per_pass_gives_the_single_pass,
)


class Block(nn.Module):
    """One Linear and a ReLU; counts how often its own forward really runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return torch.relu(self.linear(x))


class Stack(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _batches(count: int = 3, width: int = 8):
    torch.manual_seed(1)
    return [torch.randn(16, width) for _ in range(count)]


@pytest.mark.parametrize(("replay_bytes", "runs"), [(1 << 30, [4, 4, 4, 4]),
                                                   (1, [10, 8, 6, 4])],
                         ids=["room to replay", "no room: each pass runs up to its group"])
def test_later_passes_run_only_their_own_group_and_give_the_single_pass_weights(
        monkeypatch, replay_bytes, runs):
    """One layer per pass (MOMENTS_BYTES of one byte): block ``i``'s forward runs in the first
    pass and in its own layer's pass only (2 batches each); without room to record (or before
    the replay), every pass from the last layer's back to block ``i``'s ran it again. The state
    dict is the single pass's either way."""
    monkeypatch.setattr(pipeline, "REPLAY_BYTES", replay_bytes)
    torch.manual_seed(0)
    model = Stack().eval()
    runs_in_analysis = []
    original = pipeline.analysis_pass

    def counting(qmodel, *args, **kwargs):
        before = [block.runs for block in qmodel.blocks]
        result = original(qmodel, *args, **kwargs)
        runs_in_analysis.append([block.runs - b for block, b in zip(qmodel.blocks, before)])
        return result

    monkeypatch.setattr(pipeline, "analysis_pass", counting)
    _assert_one_layer_per_pass_gives_the_single_pass(model, _batches(), monkeypatch)
    grouped = runs_in_analysis[1:]  # [0] is the single pass
    assert len(grouped) == 5  # head, then blocks 3, 2, 1, 0
    assert [sum(column) for column in zip(*grouped)] == runs


class _AttentionBlock(nn.Module):
    """Scaled-dot-product attention: the block owns attention sites, whose hooks open and close
    the rounding of its products around its forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        attended = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return x + self.o(attended)


class Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_AttentionBlock(8) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_with_attention_sites_replay_and_give_the_single_pass_weights(monkeypatch):
    torch.manual_seed(0)
    batches = [torch.randn(2, 6, 8) for _ in range(3)]
    _assert_one_layer_per_pass_gives_the_single_pass(Attending().eval(), batches, monkeypatch)


class ChangedAfterReturn(Stack):
    """The caller adds to block 0's output in place after it returned."""

    def forward(self, x):
        x = self.blocks[0](x)
        x += 1.0
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(x)


class ChangesItsInput(nn.Module):
    """Block 1 doubles its input in place; the caller reads that input again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))
        self.doubler = _Doubler()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks[0](x) + 0.0
        y = self.doubler(x)
        return self.head(self.blocks[2](self.blocks[1](x + y)))


class _Doubler(nn.Module):
    def forward(self, x):
        x.mul_(2.0)
        return x.sum(-1, keepdim=True)


class Skip(Stack):
    """Block 0's output also goes straight to block 3: a wrong replay of block 0 reaches a layer
    measured in a replaying pass (blocks 1 and 2 are replayed in that pass too)."""

    def first(self, x):
        return self.blocks[0](x)

    def forward(self, x):
        first = self.first(x)
        x = self.blocks[2](self.blocks[1](first))
        return self.head(self.blocks[3](x + first))


class ListOutput(Skip):
    """Block 0 returns a list, whose item the caller replaces after it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[0] = _ListBlock(8)

    def first(self, x):
        outputs = self.blocks[0](x)
        outputs[0] = outputs[0] * 2.0
        return outputs[0]


class _ListBlock(Block):
    def forward(self, x):
        return [super().forward(x)]


class SharedTwice(nn.Module):
    """``shared`` runs twice per forward; ``middle``, measured in a replaying pass, reads both
    of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.shared, self.middle, self.last = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        once = self.shared(self.first(x))
        twice = self.shared(torch.relu(once))
        return self.last(torch.relu(self.middle(once + twice)))


def test_an_output_changed_in_place_after_it_returned_is_run_again(monkeypatch):
    torch.manual_seed(0)
    _assert_one_layer_per_pass_gives_the_single_pass(ChangedAfterReturn().eval(), _batches(),
                                                     monkeypatch)


def test_a_module_that_changes_its_input_in_place_is_run_again(monkeypatch):
    torch.manual_seed(0)
    _assert_one_layer_per_pass_gives_the_single_pass(ChangesItsInput().eval(), _batches(),
                                                     monkeypatch)


def test_a_module_called_twice_per_forward_is_run_again(monkeypatch):
    torch.manual_seed(0)
    _assert_one_layer_per_pass_gives_the_single_pass(SharedTwice().eval(), _batches(),
                                                     monkeypatch)


def test_a_list_output_is_run_again(monkeypatch):
    torch.manual_seed(0)
    _assert_one_layer_per_pass_gives_the_single_pass(ListOutput().eval(), _batches(), monkeypatch)


def test_a_replayed_modules_forward_hook_changes_its_output_once(monkeypatch):
    """A user's forward hook that scales block 0's output: the recorded output is the forward's
    own return, and the hook scales it once on replay as when the block runs."""
    torch.manual_seed(0)
    model = Skip().eval()
    model.blocks[0].register_forward_hook(lambda module, args, output: output * 3.0)
    _assert_one_layer_per_pass_gives_the_single_pass(model, _batches(), monkeypatch)


def _record(model, cuts, batches, limit_bytes=1 << 30):
    prefix = PrefixOutputs(model, cuts, limit_bytes)
    with prefix.recording(), torch.no_grad():
        for batch in calibration_batches(batches, None, torch.device("cpu"), "", quiet=True):
            model(batch)
            prefix.batch_done()
    return prefix


def test_the_frontier_is_what_has_returned_at_the_coarsest_level():
    """Cut at block 2's Linear: blocks 0 and 1 (not their Linears), nothing of block 2 yet."""
    torch.manual_seed(0)
    model = Stack().eval()
    prefix = _record(model, ["blocks.2.linear"], _batches(2))
    assert set(prefix.saved) == {0, 1}
    for batch in prefix.saved.values():
        assert set(batch["blocks.2.linear"]) == {model.blocks[0], model.blocks[1]}


def test_recorded_outputs_stay_within_the_byte_limit_latest_cut_first():
    """Each block's output is 16 x 8 float32 (512 bytes). With room for three, one batch keeps
    blocks 0-2 for the cut at block 3 and nothing more; the cut at block 1 finds block 0
    already held (counted once), the second batch finds no room."""
    torch.manual_seed(0)
    model = Stack().eval()
    prefix = _record(model, ["blocks.1.linear", "blocks.3.linear"], _batches(2), 3 * 512)
    blocks = model.blocks
    assert set(prefix.saved[0]["blocks.3.linear"]) == {blocks[0], blocks[1], blocks[2]}
    assert set(prefix.saved[0]["blocks.1.linear"]) == {blocks[0]}
    assert prefix.saved[1] == {"blocks.3.linear": {}, "blocks.1.linear": {}}
    assert prefix.bytes_held == 3 * 512


def test_a_global_module_hook_turns_recording_off():
    torch.manual_seed(0)
    model = Stack().eval()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        prefix = _record(model, ["blocks.2.linear"], _batches(2))
    finally:
        handle.remove()
    assert prefix.saved == {}


def test_replay_hands_the_recorded_outputs_back_and_releases_them():
    torch.manual_seed(0)
    model = Stack().eval()
    batches = _batches(2)
    prefix = _record(model, ["blocks.3.linear"], batches)
    before = [block.runs for block in model.blocks]
    with prefix.replaying("blocks.3.linear"), torch.no_grad():
        outputs = [model(batch) for batch in
                   calibration_batches(batches, None, torch.device("cpu"), "", quiet=True)]
    assert [block.runs - b for block, b in zip(model.blocks, before)] == [0, 0, 0, 2]
    with torch.no_grad():
        assert all(torch.equal(out, model(batch)) for out, batch in zip(outputs, batches))
    assert prefix.saved == {0: {}, 1: {}}
    assert "forward" not in model.blocks[0].__dict__  # the class's forward is back


def _nothing_left_open():
    from torch.overrides import _get_current_function_mode_stack

    from hfp8.ptq import operand_sites
    return operand_sites._frames() == [] and not _get_current_function_mode_stack()


def test_stopped_passes_leave_no_attention_owner_open_and_no_model_referenced(monkeypatch):
    """A pass that stops early leaves its forward by a BaseException, which skips the attention
    owners' closing hooks: before, the rounding mode stayed active in the process (through the
    rest of quantize_model and after it) and the stopped blocks stayed referenced."""
    import gc
    import weakref

    from hfp8.ptq import calibrate

    torch.manual_seed(0)
    monkeypatch.setattr(pipeline, "MOMENTS_BYTES", 1)
    open_after_each_pass = []
    original = calibrate.analysis_pass

    def checking(*args, **kwargs):
        result = original(*args, **kwargs)
        open_after_each_pass.append(not _nothing_left_open())
        return result

    monkeypatch.setattr(pipeline, "analysis_pass", checking)
    qmodel = hfp8.quantize_model(Attending().eval(), [torch.randn(2, 6, 8) for _ in range(3)],
                                 hfp8.QuantConfig(float_budget=0.0, keep_first_and_last=False),
                                 quiet=True)
    assert len(open_after_each_pass) == 12 and not any(open_after_each_pass)
    assert _nothing_left_open()
    block = weakref.ref(qmodel.blocks[0])
    del qmodel
    gc.collect()
    assert block() is None


def test_an_interrupt_inside_an_attention_block_leaves_no_owner_open(monkeypatch):
    """Ctrl-C while the quantized model's block runs (its main pass): quantize_model closes the
    owner on the way out."""
    torch.manual_seed(0)
    original = pipeline.calibration_pass

    def interrupted(qmodel, *args, **kwargs):
        def interrupt(module, args):
            raise KeyboardInterrupt
        qmodel.blocks[1].o.register_forward_pre_hook(interrupt)
        return original(qmodel, *args, **kwargs)

    monkeypatch.setattr(pipeline, "calibration_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hfp8.quantize_model(Attending().eval(), [torch.randn(2, 6, 8) for _ in range(3)],
                            quiet=True)
    assert _nothing_left_open()
