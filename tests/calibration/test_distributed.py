"""Sharded calibration on torch.distributed (gloo, CPU): ranks spawned from the test."""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hfp8
from hfp8 import distributed
from hfp8.data import SampleConfig, SampleError, SampleFolder
from hfp8.ptq.quantizers import quantized_layers
from tests.small_models import FACTORIES, calibration_batches, trained

EXACT = hfp8.QuantConfig(weight_rounding="nearest", float_budget=0.0, analysis_batches=16)


def _assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    """BN statistics are merged in float64 in another order across ranks (relative differences
    of order 1e-16), then stored as float32: equal, or one float32 step apart where the float64
    value lies at a float32 rounding boundary."""
    step = torch.nextafter(expected.abs(), torch.tensor(float("inf"))) - expected.abs()
    excess = (actual - expected).abs() - step
    assert bool((excess <= 0).all()), (key, float(excess.max()))


def _state(qmodel) -> dict:
    """Every exponent bias (weights, inputs, hidden states), weight and BN statistic."""
    state = {k: v.clone() for k, v in qmodel.state_dict().items()
             if "running_" in k or k.endswith(("exponent_bias", ".weight")) or ".weight_" in k}
    state["samples"] = hfp8.manifest(qmodel)["calibration_samples"]
    return state


def _worker(rank, world, init, out, config, failure, timeout, state, name, moments_bytes):
    if moments_bytes is not None:
        from hfp8.ptq import pipeline
        pipeline.MOMENTS_BYTES = moments_bytes
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        batches = calibration_batches(5)[rank::world]  # uneven shards: 5 batches
        if failure == "raise" and rank == world - 1:
            def failing(first=batches[0]):
                yield first
                raise RuntimeError("this rank's data went bad")
            batches = failing()
        if failure == "die" and rank == world - 1:
            os._exit(3)
        start = time.monotonic()
        try:
            model = FACTORIES[name]()
            model.load_state_dict(state)  # the parent's trained weights: no training per rank
            qmodel = hfp8.quantize_model(model.eval(), batches, config, quiet=True)
            torch.save(_state(qmodel), f"{out}.{rank}")
        except Exception as error:  # noqa: BLE001 - reported to the test
            torch.save({"error": f"{type(error).__name__}: {error}",
                        "seconds": time.monotonic() - start}, f"{out}.{rank}")
    finally:
        if failure != "die":
            # every rank is alive here: leave together. A rank that tore its connections down
            # while its peer was still writing its result has (rarely, under load) made the
            # peer's gloo threads abort the process after the test's verdict was on disk
            dist.barrier()
            dist.destroy_process_group()


def _run(world, config, failure=None, timeout=60, name="mobilenet_like", moments_bytes=None):
    folder = tempfile.mkdtemp()
    out = os.path.join(folder, "result")
    init = f"file://{os.path.join(folder, 'rendezvous')}"
    state = trained(name).state_dict()
    context = mp.start_processes(_worker, args=(world, init, out, config, failure, timeout, state,
                                                name, moments_bytes),
                                 nprocs=world, join=False, start_method="spawn")
    if failure == "die":
        _join_loosely(context, timeout + 60)
    else:  # join() returns as soon as one rank ends; wait for all of them
        deadline = time.monotonic() + timeout + 60
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break
    return [torch.load(f"{out}.{rank}", weights_only=False) if os.path.exists(f"{out}.{rank}")
            else None for rank in range(world)]


def _join_loosely(context, limit):
    deadline = time.monotonic() + limit
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_biases_and_statistics_of_one_process_over_all_samples(world):
    single = _state(hfp8.quantize_model(trained("mobilenet_like"), calibration_batches(5), EXACT,
                                        quiet=True))
    ranks = _run(world, EXACT)
    for result in ranks:
        assert "error" not in result, result
        assert result["samples"] == single["samples"] == 160
        for key, expected in single.items():
            if key == "samples":
                continue
            if "running_" in key:  # merged in another order: float64 rounding only
                _assert_within_one_ulp(result[key], expected, key)
            elif torch.is_tensor(expected):
                assert torch.equal(result[key], expected), key
            else:
                assert result[key] == expected, key


def _assert_equals_one_process(result: dict, single: dict) -> None:
    """Every weight, bias and report entry bit for bit; BN statistics within one ulp (float64
    summation order)."""
    assert "error" not in result, result
    for key, expected in single.items():
        if "running_" in key:
            _assert_within_one_ulp(result[key], expected, key)
        elif torch.is_tensor(expected):
            assert torch.equal(result[key], expected), key
        else:
            assert result[key] == expected, key


@pytest.mark.parametrize(("world", "moments_bytes"), [(2, None), (3, 1)],
                         ids=["2 ranks", "3 ranks, one analysis pass per layer"])
def test_the_default_pipeline_sharded_equals_one_process(world, moments_bytes, monkeypatch):
    """Issue 20: compensated rounding, the float budget's sensitivity and the analysis pass see
    the batches one process would (the first ``analysis_batches`` over the whole data set, each
    batch sampled by its own index), so every quantized weight and every bias equals one
    process's bit for bit; BN statistics agree up to float64 summation order. With 3 ranks the
    moments are measured one layer per pass (``MOMENTS_BYTES`` of one byte, here and in the
    ranks), each pass replaying what its rank's first pass recorded for its own batches."""
    from hfp8.ptq import pipeline

    if moments_bytes is not None:
        monkeypatch.setattr(pipeline, "MOMENTS_BYTES", moments_bytes)
    config = hfp8.QuantConfig()
    single = _state(hfp8.quantize_model(trained("mobilenet_like"), calibration_batches(5), config,
                                        quiet=True))
    for result in _run(world, config, moments_bytes=moments_bytes):
        _assert_equals_one_process(result, single)


def test_a_recurrent_model_sharded_equals_one_process():
    """A bidirectional LSTM with its hidden state rounded: the input and hidden-state biases
    chosen from all ranks' observers, the weights and the float budget's choice, as one
    process makes them."""
    config = hfp8.QuantConfig(quantize_recurrent_state=True)
    single = _state(hfp8.quantize_model(trained("lstm"), calibration_batches(5), config,
                                        quiet=True))
    assert "rnn.recurrent0_hidden_exponent_bias" in single
    for result in _run(2, config, name="lstm"):
        assert "error" not in result, result
        assert result.keys() == single.keys()
        for key, expected in single.items():
            assert torch.equal(result[key], expected) if torch.is_tensor(expected) \
                else result[key] == expected, key


def test_compensated_rounding_and_the_budget_agree_across_ranks():
    config = hfp8.QuantConfig(float_budget=0.05)
    ranks = _run(2, config)
    assert all("error" not in r for r in ranks), ranks
    for key, value in ranks[0].items():
        other = ranks[1][key]
        assert (torch.equal(value, other) if torch.is_tensor(value) else value == other), key


def test_a_rank_that_fails_stops_every_rank_at_once():
    ranks = _run(2, EXACT, failure="raise", timeout=120)
    assert ranks[1]["error"].startswith("RuntimeError: this rank's data went bad")
    assert ranks[0]["error"].startswith("DistributedError: rank 1 of 2 failed")
    assert ranks[0]["seconds"] < 60  # told at the next checkpoint, not at the 120 s timeout


def test_a_rank_that_dies_ends_the_others_at_the_timeout():
    start = time.monotonic()
    ranks = _run(2, EXACT, failure="die", timeout=10)
    assert ranks[1] is None and "error" in ranks[0]
    assert time.monotonic() - start < 90


def test_sample_folders_shard_by_rank_and_refuse_an_empty_shard(tmp_path):
    for i in range(5):
        torch.save(torch.full((2,), float(i)), tmp_path / f"{i}.pt")
    config = SampleConfig(batch_size=2)  # whole batches: [0 1] [2 3] [4]
    shards = [[b[:, 0].tolist() for b in SampleFolder(tmp_path, config, rank=r, world_size=2)]
              for r in range(2)]
    assert shards == [[[0.0, 1.0], [4.0]], [[2.0, 3.0]]]
    assert distributed.world() == (0, 1) and len(SampleFolder(tmp_path, config).files) == 5
    for rank in range(4):  # every rank refuses, not only the one left without samples
        with pytest.raises(SampleError, match="rank 3 of 4 gets no sample.*3 batches of 2"):
            SampleFolder(tmp_path, config, rank=rank, world_size=4)
    with pytest.raises(SampleError, match=r"5 samples make 1 batch of 8, fewer than the 2 ranks"):
        SampleFolder(tmp_path, SampleConfig(batch_size=8), rank=0, world_size=2)


@pytest.mark.parametrize("world, flags", [
    (2, ["--weight-rounding", "nearest", "--float-budget", "0", "--batch-size", "16"]),
    (2, []),  # the defaults: compensated rounding, the float budget, batches of 32
    (3, ["--batch-size", "24"]),  # uneven shards: 6 batches (the last of 8 samples) on 3 ranks
])
def test_torchrun_quantize_writes_once_the_model_one_process_makes(tmp_path, world, flags):
    """`torchrun --nproc-per-node W -m hfp8.cli quantize ...`: each rank reads its shard of
    the sample folder, rank 0 alone writes and prints, and the file equals one process's on as
    many threads as each rank (torchrun's one): every weight and bias bit for bit, BN
    statistics up to float64 summation order. (On 2 threads float32 products sum in another
    order, and compensated rounding's float32 algebra can meet a near-tie the other way.)"""
    import subprocess
    import sys
    from pathlib import Path

    from tests.cli.test_cli import ARCH, EXE, FLAGS

    subprocess.run([EXE, "example", str(tmp_path / "demo"), "--quiet"], check=True,
                   capture_output=True)
    folder = tmp_path / "demo"
    common = ["quantize", "model.pt", *ARCH, "--calib", "calibration", *FLAGS, *flags, "--quiet"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([EXE, *common, "-o", "single.pt"], check=True, capture_output=True, cwd=folder,
                   env=one_thread)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(world), "-m",
                             "hfp8.cli", *common, "-o", "sharded.pt", "--dist-timeout", "60"],
                            capture_output=True, text=True, cwd=folder, timeout=300,
                            env=one_thread)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote sharded.pt") == 1  # rank 0 alone
    single = torch.load(folder / "single.pt", weights_only=True)
    sharded = torch.load(folder / "sharded.pt", weights_only=True)
    for key, value in single["state_dict"].items():
        if "running_" in key:
            _assert_within_one_ulp(sharded["state_dict"][key], value, key)
        else:
            assert torch.equal(sharded["state_dict"][key], value), key
    assert hfp8.read_manifest(folder / "sharded.pt")["calibration_samples"] == 128


def test_torchrun_an_input_error_on_every_rank_ends_the_run_with_its_exit_code(tmp_path):
    """A rank leaves through ``os._exit`` once its process group is destroyed (the
    interpreter's teardown aborted a rank now and then): the exit code still reaches torchrun,
    the one-line error is printed, and nothing is written."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.cli.test_cli import EXE, FLAGS

    subprocess.run([EXE, "example", str(tmp_path / "demo"), "--quiet"], check=True,
                   capture_output=True)
    folder = tmp_path / "demo"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "hfp8.cli",
                             "quantize", "model.pt", "--arch", "hfp8.examples:no_such_factory",
                             "--calib", "calibration", *FLAGS, "--quiet", "-o", "out.pt",
                             "--dist-timeout", "60"],
                            capture_output=True, text=True, cwd=folder, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # torchrun's report of the ranks' own exit code
    assert "hfp8-ptq quantize: error:" in result.stderr and "no_such_factory" in result.stderr
    assert not (folder / "out.pt").exists()
