"""The 1-5-2 DDP communication hook, with ranks spawned from the test (gloo, CPU)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hfp8
from hfp8.numerics.bias_selection import max_bias_for_amax
from hfp8.training.communication import E5M2Communication, e5m2_hook


class _Bucket:
    """What the hook reads of a DDP GradBucket."""

    def __init__(self, values: torch.Tensor, index: int = 0) -> None:
        self._values, self._index = values, index

    def buffer(self) -> torch.Tensor:
        return self._values

    def index(self) -> int:
        return self._index


def _cast(values, bias):
    """torch's own float8_e5m2 at scale 2^(15 - bias), saturating."""
    scale = 2.0 ** (15 - bias)
    return (values / scale).clamp(-57344, 57344).to(torch.float8_e5m2).float() * scale


def _worker(rank, world, init, out, steps, error_feedback):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(rank)
        gradient = torch.randn(1001, generator=generator) * 10.0 ** (rank - 3)
        everyone = [torch.empty_like(gradient) for _ in range(world)]
        dist.all_gather(everyone, gradient)
        state = E5M2Communication(error_feedback=error_feedback)
        results = []
        for _ in range(steps):
            results.append(e5m2_hook(state, _Bucket(gradient.clone())).wait().clone())
        torch.save({"everyone": everyone, "results": results, "bytes": state.bytes_sent,
                    "float32": state.float32_bytes}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(world, steps=1, error_feedback=True):
    folder = tempfile.mkdtemp()
    out, init = os.path.join(folder, "r"), f"file://{os.path.join(folder, 'rendezvous')}"
    mp.start_processes(_worker, args=(world, init, out, steps, error_feedback), nprocs=world,
                       start_method="spawn")  # join=True: returns once every rank is done
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_the_hook_averages_through_two_e5m2_roundings_that_torch_reproduces(world):
    ranks = _run(world)
    everyone = ranks[0]["everyone"]
    amax = float(torch.stack(everyone).abs().max())
    first = int(max_bias_for_amax(torch.tensor([amax]), hfp8.E5M2)[0])
    second = int(max_bias_for_amax(torch.tensor([amax * world]), hfp8.E5M2)[0])
    summed = sum(_cast(g, first) for g in everyone)
    expected = _cast(summed, second) / world
    exact = torch.stack(everyone).mean(0)
    for result in ranks:
        assert torch.equal(result["results"][0], expected)
        # and close to the float32 average: two 1-5-2 roundings, relative to the largest value
        assert (result["results"][0] - exact).abs().max() <= 2 ** -2 * amax
    # 1-byte codes in a reduce-scatter and an all-gather: 4x fewer bytes than float32
    assert 3.9 <= ranks[0]["float32"] / ranks[0]["bytes"] <= 4.0


def test_error_feedback_makes_repeated_steps_average_to_the_true_gradient():
    steps = 32
    with_feedback = _run(2, steps, error_feedback=True)
    without = _run(2, steps, error_feedback=False)
    exact = torch.stack(with_feedback[0]["everyone"]).mean(0)

    def error(ranks):
        return float((torch.stack(ranks[0]["results"]).mean(0) - exact).abs().max())
    assert error(with_feedback) < error(without) / 8, (error(with_feedback), error(without))


def _finetune_worker(rank, world, init, out, state):
    from hfp8.training import finetune
    from tests.small_models import FACTORIES, calibration_batches

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        teacher = FACTORIES["mobilenet_like"]()
        teacher.load_state_dict(state)
        teacher.eval()
        batches = calibration_batches(4)
        config = hfp8.QuantConfig(float_budget=0.0, weight_rounding="nearest")
        qmodel = hfp8.quantize_model(teacher, batches[rank::world], config, quiet=True)
        tuned = finetune(qmodel, teacher, batches[rank::world], steps=3, lr=1e-4, quiet=True,
                         hold_out=False)  # every step taken: this test is about the hook
        torch.save({"state": tuned.state_dict(), "training": tuned.hfp8_report.training},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_finetune_under_a_process_group_trains_one_model_through_the_hook():
    """DistributedDataParallel accepts the hook (it checks the hook's signature) and every rank
    ends with the same fine-tuned model, its gradients sent in 1-5-2."""
    from tests.small_models import trained

    world = 2
    folder = tempfile.mkdtemp()
    out, init = os.path.join(folder, "r"), f"file://{os.path.join(folder, 'rendezvous')}"
    state = trained("mobilenet_like").state_dict()
    mp.start_processes(_finetune_worker, args=(world, init, out, state), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    training = ranks[0]["training"]
    assert training["steps"] + training["skipped_steps"] == 3
    sent = training["communication"]
    assert sent["format"].startswith("E5M2") and sent["error_feedback"]
    assert 3.9 <= sent["float32_all_reduce_bytes"] / sent["bytes_sent"] <= 4.0
