"""Throughput of hfp8.fake_quantize relative to torch.clone on one 64M-element float32 tensor.

Ratios are throughput(fake_quantize) / throughput(clone) = time(clone) / time(fake_quantize),
measured interleaved in one run (median over rounds), so machine noise hits both sides alike.
Also shown: a straightforward eager torch expression (scale, clamp, cast to float8 and back).

    python benchmarks/fake_quant_speed.py [--elements N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hfp8
from hfp8 import FloatFormat
from results_doc import add_update_flag, command_line, markdown_table, write_section


def naive_e4m3(x: torch.Tensor, bias: int) -> torch.Tensor:
    scale = 2.0 ** (7 - bias)
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--rounds", type=int, default=7)
    add_update_flag(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.elements) * 10
    cases = {
        "E4M3 fn, bias 7": lambda: hfp8.fake_quantize(x, hfp8.E4M3),
        "E4M3 fn, bias 11": lambda: hfp8.fake_quantize(x, hfp8.E4M3.with_bias(11)),
        "E5M2 ieee, bias 15": lambda: hfp8.fake_quantize(x, hfp8.E5M2),
        "E3M5 fn, bias 3 (9-bit, no torch dtype)": lambda: hfp8.fake_quantize(x, FloatFormat(3, 5)),
        "naive eager E4M3 (reference point)": lambda: naive_e4m3(x, 7),
    }
    clone = lambda: x.clone()  # noqa: E731
    for fn in [clone, *cases.values()]:
        fn()  # warm up allocator and thread pool
    ratios = {name: [] for name in cases}
    clone_times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        clone()
        clone_time = time.perf_counter() - start
        clone_times.append(clone_time)
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            ratios[name].append(clone_time / (time.perf_counter() - start))
    gbps = 2 * x.numel() * 4 / statistics.median(clone_times) / 1e9
    print(f"{x.numel() / 2**20:.0f}M float32 elements, {torch.get_num_threads()} threads; "
          f"clone: {statistics.median(clone_times) * 1e3:.1f} ms ({gbps:.1f} GB/s read+write)")
    print(f"{'case':44s} {'throughput / clone':>20s}")
    for name, values in ratios.items():
        print(f"{name:44s} {statistics.median(values):20.2f}")
    if args.update_docs:
        rows = [[name, f"{statistics.median(values):.2f}"] for name, values in ratios.items()]
        write_section("fake-quant-speed", markdown_table(["case", "throughput / clone"], rows),
                      command_line())


if __name__ == "__main__":
    main()
