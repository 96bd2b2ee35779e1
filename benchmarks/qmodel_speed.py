"""The quantized model's forward pass in PyTorch against the float model's, side by side.

    python benchmarks/qmodel_speed.py [--batches 1 16] [--runs 30] [--update-docs]

MobileNetV2 (ImageNet weights, 224x224) and the 10M-parameter decoder (4 x 128 tokens per
batch unit): the float model and its default quantization (``hfp8.quantize_model``), each eager
and under ``torch.compile`` (inductor, default mode), run on the same input, interleaved, after
warm-up; median of ``--runs``. The eager models run in one child process and the compiled ones
in another, back to back (compiled code in a process slows the eager models beside it); the
compiled quantized model's ratio to the eager float model divides across the two. Compilation starts from an empty inductor cache (a temporary
``TORCHINDUCTOR_CACHE_DIR``), so the compile column is what a first run costs. Fidelity of the
compiled quantized model: its outputs and the eager ones against the quantized model's own
float64 run (mean relative squared error per sample), the yardstick of the ONNX verification.
A third eager model, "float + copy", is the float model with a pre-hook that only copies each
quantized layer's input: the floor for any eager rounding pass that is not fused into the layer.
2 threads. glibc's allocator: as the environment sets it (``MALLOC_*`` variables, printed and
written under the table); at its defaults this machine's page faults move a MobileNetV2
forward by 2-4x from run to run, hence the interleaving and the medians. To take them out::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/qmodel_speed.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# before torch is imported: compile from scratch, as a first run does
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="qmodel_speed_inductor_"))

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402
from hfp8.export.verify import _per_sample_errors  # noqa: E402
from hfp8.ptq.quantizers import quantized_layers  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402


def models():
    from decoder import decoder, token_batches
    from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
    from photos import photo_crops

    crops = photo_crops("calibration", 64, seed=0)
    yield ("MobileNetV2", mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval(),
           list(crops.split(16)), lambda batch: crops[:batch])
    tokens = token_batches(4, 4)
    yield "decoder 10M", decoder("10M"), tokens, lambda batch: torch.cat(tokens)[:batch]


def _copying(model, qmodel):
    """The float model with a forward pre-hook on each layer ``qmodel`` quantizes that only
    copies the layer's input: what one extra elementwise pass per quantized layer costs eagerly,
    the floor for any eager rounding that is not fused into the layer."""
    copying = copy.deepcopy(model)
    layers = dict(copying.named_modules())
    for name in quantized_layers(qmodel):
        layers[name].register_forward_pre_hook(lambda module, args: (args[0].clone(), *args[1:]))
    return copying


def _compiled(model, x) -> tuple:
    """``torch.compile(model)`` and the seconds its first call took (compilation)."""
    compiled = torch.compile(model)
    start = time.perf_counter()
    compiled(x)
    return compiled, time.perf_counter() - start


def _deviation(output: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over samples of verify_onnx's per-sample deviation: ``|output - truth|^2`` summed
    over the sample, over ``mean |truth|^2`` (float64)."""
    return float(_per_sample_errors([output], [truth], truth.shape[0]).mean())


def _median_ms(nets: dict, x, runs: int) -> dict:
    """Median milliseconds of each of ``nets`` on ``x``, interleaved, after warm-up."""
    times = {label: [] for label in nets}
    for _ in range(3):
        for net in nets.values():
            net(x)
    for _ in range(runs):
        for label, net in nets.items():
            start = time.perf_counter()
            net(x)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) * 1e3 for label, values in times.items()}


@torch.no_grad()
def child(part: str, batches: list[int], runs: int) -> list[dict]:
    """One process per part: ``eager`` (float, float + copy, quantized) or ``compiled`` (both
    compiled). Apart because compiled code running in a process slows the eager models that
    run beside it (measured on MobileNetV2 at batch 16: the eager float model 170 -> 227 ms,
    the quantized 221-241 -> 267 ms, once the two compiled ones had run), which would make
    either comparison unfair."""
    torch.set_num_threads(2)
    rows = []
    for name, model, calibration, example in models():
        qmodel = hfp8.quantize_model(model, calibration, quiet=True)
        exact = copy.deepcopy(qmodel).double()
        for batch in batches:
            x = example(batch)
            truth = exact(x.double() if x.is_floating_point() else x)
            row = {"model": name, "batch": batch}
            if part == "eager":
                nets = {"float": model, "float + copy": _copying(model, qmodel),
                        "quantized": qmodel}
                row["deviation"] = _deviation(qmodel(x), truth)
            else:
                nets = {"float compiled": _compiled(model, x)[0]}
                nets["quantized compiled"], row["compile_seconds"] = _compiled(qmodel, x)
                row["deviation"] = _deviation(nets["quantized compiled"](x), truth)
            row["ms"] = _median_ms(nets, x, runs)
            rows.append(row)
    return rows


def _run_part(part: str, batches: list[int], runs: int) -> list[dict]:
    command = [sys.executable, __file__, "--child", part, "--runs", str(runs), "--batches",
               *map(str, batches)]
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise SystemExit(f"{part} part failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--child", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    add_update_flag(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batches, args.runs)))
        return
    eager, compiled = (_run_part(part, args.batches, args.runs) for part in ("eager", "compiled"))
    rows = []
    for plain, fused_row in zip(eager, compiled):
        name, batch = plain["model"], plain["batch"]
        ms = {**plain["ms"], **fused_row["ms"]}
        ratio = ms["quantized"] / ms["float"]
        floor = ms["float + copy"] / ms["float"]
        fused = ms["quantized compiled"] / ms["float"]
        fused_both = ms["quantized compiled"] / ms["float compiled"]
        print(f"{name}, batch {batch}: float {ms['float']:.1f} ms, quantized "
              f"{ms['quantized']:.1f} ms ({ratio:.2f}x; one copy per layer input {floor:.2f}x); "
              f"compiled: float {ms['float compiled']:.1f} ms, quantized "
              f"{ms['quantized compiled']:.1f} ms ({fused:.2f}x of eager float, {fused_both:.2f}x "
              f"of compiled float); compile {fused_row['compile_seconds']:.0f} s; deviation from "
              f"the float64 run: eager {plain['deviation']:.3g}, compiled "
              f"{fused_row['deviation']:.3g}", flush=True)
        rows.append([name, str(batch), f"{ms['float']:.1f}", f"{ms['quantized']:.1f}",
                     f"**{ratio:.2f}x**", f"{floor:.2f}x", f"{ms['float compiled']:.1f}",
                     f"{ms['quantized compiled']:.1f}", f"**{fused:.2f}x**",
                     f"{fused_both:.2f}x", f"{fused_row['compile_seconds']:.0f} s",
                     f"{plain['deviation']:.2g} / {fused_row['deviation']:.2g}"])
    table = markdown_table(
        ["model", "batch", "float ms", "quantized ms", "quantized / float",
         "float + a copy of each quantized input / float", "float compiled ms",
         "quantized compiled ms", "quantized compiled / float",
         "quantized compiled / float compiled", "compile (quantized)",
         "deviation from float64: eager / compiled"], rows)
    print(table)
    # glibc's allocator settings move these times by 2-4x (page faults): the command
    # written under the table carries them
    allocator = " ".join(f"{key}={value}" for key, value in sorted(os.environ.items())
                         if key.startswith("MALLOC_"))
    print("glibc allocator:", allocator or "defaults")
    if args.update_docs:
        write_section("qmodel-speed", table, " ".join(filter(None, [allocator, command_line()])))


if __name__ == "__main__":
    main()
