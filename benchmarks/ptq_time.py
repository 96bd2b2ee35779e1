"""What each PTQ default costs in time, as a ratio to one FP32 forward pass over the calibration
set, measured side by side (interleaved, median of ``--repeats`` runs) in one process.

    python benchmarks/ptq_time.py [--model mobilenet_v2|efficientnet_lite2|both] [--repeats 3] [--steps]
        [--update-docs]

Rows: the default (BN shift + compensated rounding + 1% float budget), without the budget
(no sensitivity estimate), with rounding to nearest (no analysis pass), and the plain BN-shift
pipeline (neither). Same 256 calibration crops as the accuracy tables, 2 threads. ``--steps``
also times each step of the default inside quantize_model (median over the repeats, as a ratio
to the float pass).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "gallery")]

import hfp8  # noqa: E402
from photos import photo_crops  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402
from step_timing import time_steps  # noqa: E402

TITLES = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite2": "EfficientNet-Lite2"}
STEP_TITLES = {"calibration_pass": "main pass (BN shift and input ranges)",
               "analysis_pass": "analysis pass (2 batches)",
               "layer_sensitivity": "sensitivity estimate",
               "compensate_weights": "compensated rounding",
               "choose_input_biases": "input bias selection"}
STEPS = {"hfp8.ptq.pipeline": ("analysis_pass", "compensate_weights", "choose_input_biases",
                               "calibration_pass"),
         "hfp8.ptq.refinement": ("layer_sensitivity",)}


C = hfp8.QuantConfig
ROWS = {
    "default (shift + compensated + 1% float budget)": C(),
    "shift + compensated, no budget": C(float_budget=0.0),
    "shift + 1% float budget, rounding to nearest": C(weight_rounding="nearest"),
    "shift, rounding to nearest, no budget": C(weight_rounding="nearest", float_budget=0.0),
}


def load(name):
    if name == "mobilenet_v2":
        from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
        return mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval(), 224
    import real_models
    return real_models.load_efficientnet_lite2(), 260


@torch.no_grad()
def float_pass(model, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        model(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=("mobilenet_v2", "efficientnet_lite2", "both"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="time each step of the default")
    add_update_flag(parser)
    args = parser.parse_args()
    columns: dict = {}
    torch.set_num_threads(2)
    seconds: dict = {}
    if args.steps:
        time_steps(seconds, STEPS)
    for name in (("mobilenet_v2", "efficientnet_lite2") if args.model == "both" else (args.model,)):
        model, size = load(name)
        batches = list(photo_crops("calibration", 256, seed=0, size=size).split(32))
        times = {"float": [], **{label: [] for label in ROWS}}
        steps: dict = {}
        for _ in range(args.repeats):
            times["float"].append(float_pass(model, batches))
            for label, config in ROWS.items():
                seconds.clear()
                start = time.perf_counter()
                hfp8.quantize_model(model, batches, config, quiet=True)
                times[label].append(time.perf_counter() - start)
                if config == hfp8.QuantConfig():
                    for step, spent in seconds.items():
                        steps.setdefault(step, []).append(spent)
        unit = statistics.median(times["float"])
        print(f"{name}: one FP32 pass over 256 crops {unit:.1f} s (median of {args.repeats})")
        column = columns[name] = {"one FP32 pass over 256 crops": f"{unit:.1f} s"}
        for label in ROWS:
            median = statistics.median(times[label])
            print(f"  {label:48s} {median:6.1f} s  {median / unit:5.2f}x", flush=True)
            column[label] = f"{median:.1f} s, {median / unit:.2f}x"
        for step, spent in sorted(steps.items(), key=lambda item: -sum(item[1])):
            print(f"  default, step {step:34s} {statistics.median(spent) / unit:5.2f}x")
            column[f"default, step: {STEP_TITLES.get(step, step)}"] = \
                f"{statistics.median(spent) / unit:.2f}x"
    if args.update_docs:
        labels = list(next(iter(columns.values())))
        rows = [[label, *(columns[name].get(label, "-") for name in columns)] for label in labels]
        rows[1] = [f"**{cell}**" for cell in rows[1]]  # the default
        write_section("ptq-time", markdown_table(
            ["configuration", *(TITLES[name] for name in columns)], rows), command_line())


if __name__ == "__main__":
    main()
