"""What PTQ costs as a model grows: GPT-style decoders of 10M, 40M and 150M parameters
(benchmarks/decoder.py, random weights), quantized with the defaults on 8 batches of 4 x 128
tokens.

    python benchmarks/scaling.py [--sizes 10M 40M 150M] [--repeats 3] [--update-docs]
    python benchmarks/scaling.py --sizes 150M --moments-mib 1024 256 128 [--rounds 2]

Each size runs in its own child process (peak memory is that process's maximum resident set,
``ru_maxrss``), twice: once building the model and running one float pass (the baseline peak),
once quantizing it ``--repeats`` times (the median is reported; the first run also pays
one-time costs such as the first backward pass). Within the quantizing child the float pass over
the same 8 batches is timed before and after every PTQ run (median), and each step of the last
run of ``quantize_model`` is timed by wrapping its function. Reported: PTQ time / one float pass, each step / one float pass, peak memory, and the
float baseline's peak. Threads: 2; glibc's allocator is left at its defaults (``MALLOC_*``
variables are printed when set). A ratio that grows with size is a defect even when it is small.

``--moments-mib``: the same measurement with ``hfp8.ptq.pipeline.MOMENTS_BYTES`` set to each
value in turn (``--rounds`` times over, alternating), side by side: time ratio, analysis pass
and compensated rounding, analysis passes, peak. Printed only (the stored results and the
docs table stay those of the default).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from child_runs import run_child  # noqa: E402
from step_timing import StepMemory, time_steps  # noqa: E402

STEPS = {  # module -> functions of quantize_model timed as steps
    "hfp8.ptq.pipeline": ("_quantize_weights", "analysis_pass", "compensate_weights",
                          "keep_sensitive_layers_float", "calibration_pass",
                          "choose_input_biases"),
}
STEP_TITLES = {"_quantize_weights": "weights: bias choice + nearest rounding",
               "analysis_pass": "analysis pass (moments, 2 batches)",
               "compensate_weights": "compensated rounding",
               "keep_sensitive_layers_float": "sensitivity + float budget",
               "calibration_pass": "main pass (input ranges)",
               "choose_input_biases": "input bias selection"}


MOMENTS_VARIABLE = "HFP8_BENCH_MOMENTS_MIB"  # a child's MOMENTS_BYTES, in MiB


def child(size: str, quantize: bool, repeats: int) -> dict:
    """Runs in the child process: one size, float only or float + PTQ."""
    import torch

    from decoder import decoder, token_batches

    torch.set_num_threads(2)
    if os.environ.get(MOMENTS_VARIABLE):
        from hfp8.ptq import pipeline

        pipeline.MOMENTS_BYTES = int(os.environ[MOMENTS_VARIABLE]) << 20
    model = decoder(size)
    batches = token_batches()
    parameters = sum(p.numel() for p in model.parameters())

    @torch.no_grad()
    def float_pass() -> float:
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        return time.perf_counter() - start

    float_pass()  # warm up the allocator and the thread pool
    result = {"size": size, "parameters": parameters}
    passes = [float_pass() for _ in range(2)]
    if quantize:
        import hfp8

        seconds: dict = {}
        memory = StepMemory()
        time_steps(seconds, STEPS, memory)
        from hfp8.ptq import pipeline

        analysis_calls = []
        counted = pipeline.analysis_pass
        pipeline.analysis_pass = lambda *a, **k: analysis_calls.append(1) or counted(*a, **k)
        ptq = []
        for _ in range(repeats):
            seconds.clear()
            start, memory.current = time.perf_counter(), "other"
            qmodel = hfp8.quantize_model(model, batches, quiet=True)
            ptq.append(time.perf_counter() - start)
            memory.current = "after"
            del qmodel
            passes.append(float_pass())
        result.update(ptq_seconds=statistics.median(ptq), steps=dict(seconds),
                      step_peak_bytes=memory.stop(),
                      analysis_passes=len(analysis_calls) // repeats)
    result["float_pass_seconds"] = statistics.median(passes)
    result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def table(rows: list[dict]) -> str:
    from results_doc import markdown_table

    header = ["model", "float pass", "PTQ / float pass",
              *(STEP_TITLES[name] for name in STEP_TITLES), "peak memory (PTQ)",
              "peak memory (float model + pass)"]
    cells = []
    for row in rows:
        unit = row["float_pass_seconds"]
        cells.append([f"{row['size']} ({row['parameters'] / 1e6:.0f}M)", f"{unit:.2f} s",
                      f"**{row['ptq_seconds'] / unit:.1f}x**",
                      *(f"{row['steps'].get(name, 0.0) / unit:.2f}x" for name in STEP_TITLES),
                      f"{row['peak_bytes'] / 2**30:.2f} GiB",
                      f"{row['float_peak_bytes'] / 2**30:.2f} GiB"])
    return markdown_table(header, cells)


def compare_limits(sizes: list[str], limits: list[int], rounds: int, repeats: int) -> None:
    """Each size quantized with each MOMENTS_BYTES in turn, ``rounds`` times, one child each."""
    for size in sizes:
        baseline = run_child(__file__, size, False, repeats)
        print(f"{size}: float model + pass peak {baseline['peak_bytes'] / 2**30:.2f} GiB")
        for round_ in range(rounds):
            for limit in limits:
                os.environ[MOMENTS_VARIABLE] = str(limit)
                try:
                    row = run_child(__file__, size, True, repeats)
                finally:
                    del os.environ[MOMENTS_VARIABLE]
                unit, steps = row["float_pass_seconds"], row["steps"]
                print(f"  round {round_ + 1}, MOMENTS_BYTES {limit:5d} MiB: "
                      f"{row['analysis_passes']} analysis passes, PTQ "
                      f"{row['ptq_seconds']:.1f} s = {row['ptq_seconds'] / unit:.2f}x "
                      f"(analysis {steps.get('analysis_pass', 0) / unit:.2f}x, compensated "
                      f"{steps.get('compensate_weights', 0) / unit:.2f}x), peak "
                      f"{row['peak_bytes'] / 2**30:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "40M", "150M"])
    parser.add_argument("--repeats", type=int, default=3, help="PTQ runs per size (median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(HERE / "results" / "scaling.json"))
    from results_doc import add_update_flag, command_line, write_section

    parser.add_argument("--moments-mib", type=int, nargs="+",
                        help="compare these MOMENTS_BYTES (MiB) side by side; prints only")
    parser.add_argument("--rounds", type=int, default=1, help="with --moments-mib: alternations")
    add_update_flag(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quantize, args.repeats)))
        return
    if args.moments_mib:
        compare_limits(args.sizes, args.moments_mib, args.rounds, args.repeats)
        return
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"2 threads; allocator settings: {allocator or 'glibc defaults'}")
    rows = []
    for size in args.sizes:
        baseline = run_child(__file__, size, False, args.repeats)
        row = run_child(__file__, size, True, args.repeats)
        row["float_peak_bytes"] = baseline["peak_bytes"]
        rows.append(row)
        unit = row["float_pass_seconds"]
        print(f"{size}: {row['parameters'] / 1e6:.1f}M parameters, float pass {unit:.2f} s, "
              f"PTQ {row['ptq_seconds']:.1f} s = {row['ptq_seconds'] / unit:.1f}x; peak "
              f"{row['peak_bytes'] / 2**30:.2f} GiB (float model + pass "
              f"{baseline['peak_bytes'] / 2**30:.2f} GiB)", flush=True)
        for name, spent in sorted(row["steps"].items(), key=lambda item: -item[1]):
            peak = row["step_peak_bytes"].get(name, 0) / 2**30
            print(f"    {STEP_TITLES.get(name, name):44s} {spent:7.1f} s  {spent / unit:6.2f}x  "
                  f"peak {peak:5.2f} GiB")
        other = row["step_peak_bytes"].get("other", 0) / 2**30
        print(f"    {'(between steps)':44s} {'':19s} peak {other:5.2f} GiB")
    Path(args.output).parent.mkdir(exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    if args.update_docs:
        write_section("scaling", table(rows), command_line())


if __name__ == "__main__":
    main()
