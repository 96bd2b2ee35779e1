"""What PTQ of sequence models costs as sequences and recurrent layers grow.

    python benchmarks/sequence_scaling.py [--cases ...] [--repeats 3] [--update-docs]

Two families, each at three sizes, each size in its own child process (peak memory is that
process's maximum resident set, ``ru_maxrss``):

* **sequence length**: the 10M GPT-style decoder of benchmarks/decoder.py (random weights,
  context widened to 512) on 8 batches of 4 sequences of 128, 256 and 512 tokens, quantized
  with the defaults: the calibration data grows with the length;
* **recurrent width**: a speech-style model (Linear 40 -> w, a 3-layer LSTM of width w, Linear
  w -> 32) with w = 256, 512, 1024 (1.7M, 6.6M, 26M parameters) on 8 batches of 8 sequences of
  100 steps, quantized with ``keep_first_and_last=False`` (its LSTM reads the input), hidden
  state float (the default) and rounded (``quantize_recurrent_state=True``, step by step).

Reported per case: PTQ time / one float pass over the same batches (median of ``--repeats``
PTQ runs; float passes timed around each run, median), the quantized model's forward time / the
float model's, and peak memory against the float model + pass alone. Threads: 2. A ratio that
grows with size is a defect even when it is small.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from child_runs import run_child  # noqa: E402

CASES = ["length-128", "length-256", "length-512", "lstm-256", "lstm-512", "lstm-1024"]


def _build(case: str):
    """(model, batches, configs by label) for ``case``."""
    import torch
    from torch import nn

    import hfp8

    family, size = case.split("-")
    size = int(size)
    if family == "length":
        from decoder import SIZES, Decoder, token_batches

        torch.manual_seed(0)
        model = Decoder(*SIZES["10M"], context=512).eval()
        return model, token_batches(8, 4, size), {"default": hfp8.QuantConfig()}
    class Speech(nn.Module):
        def __init__(self):
            super().__init__()
            self.front, self.head = nn.Linear(40, size), nn.Linear(size, 32)
            self.lstm = nn.LSTM(size, size, 3, batch_first=True)

        def forward(self, x):
            return self.head(self.lstm(self.front(x))[0])

    torch.manual_seed(0)
    model = Speech().eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 100, 40, generator=generator) for _ in range(8)]
    return model, batches, {
        "hidden float": hfp8.QuantConfig(keep_first_and_last=False),
        "hidden rounded": hfp8.QuantConfig(keep_first_and_last=False,
                                           quantize_recurrent_state=True)}


def child(case: str, quantize: bool, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    model, batches, configs = _build(case)

    @torch.no_grad()
    def timed_pass(network) -> float:
        start = time.perf_counter()
        for batch in batches:
            network(batch)
        return time.perf_counter() - start

    timed_pass(model)  # warm up the allocator and the thread pool
    passes = [timed_pass(model) for _ in range(2)]
    result = {"case": case, "parameters": sum(p.numel() for p in model.parameters()),
              "tokens": sum(b.shape[0] * b.shape[1] for b in batches), "configs": {}}
    if quantize:
        import hfp8

        for label, config in configs.items():
            runs, qmodel = [], None
            for _ in range(repeats):
                del qmodel
                start = time.perf_counter()
                qmodel = hfp8.quantize_model(model, batches, config, quiet=True)
                runs.append(time.perf_counter() - start)
                passes.append(timed_pass(model))
            timed_pass(qmodel)
            forward = statistics.median(timed_pass(qmodel) for _ in range(2))
            result["configs"][label] = {"ptq_seconds": statistics.median(runs),
                                        "quantized_pass_seconds": forward}
            del qmodel
    result["float_pass_seconds"] = statistics.median(passes)
    result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def table(rows: list[dict]) -> str:
    from results_doc import markdown_table

    header = ["case", "parameters", "tokens", "float pass", "config", "PTQ / float pass",
              "quantized forward / float", "peak memory (PTQ)", "peak memory (float)"]
    cells = []
    for row in rows:
        unit = row["float_pass_seconds"]
        for label, entry in row["configs"].items():
            cells.append([row["case"], f"{row['parameters'] / 1e6:.1f}M", str(row["tokens"]),
                          f"{unit:.2f} s", label, f"**{entry['ptq_seconds'] / unit:.1f}x**",
                          f"{entry['quantized_pass_seconds'] / unit:.2f}x",
                          f"{row['peak_bytes'] / 2**30:.2f} GiB",
                          f"{row['float_peak_bytes'] / 2**30:.2f} GiB"])
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--repeats", type=int, default=3, help="PTQ runs per case (median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(HERE / "results" / "sequence_scaling.json"))
    from results_doc import add_update_flag, command_line, write_section

    add_update_flag(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quantize, args.repeats)))
        return
    rows = []
    for case in args.cases:
        baseline = run_child(__file__, case, False, args.repeats)
        row = run_child(__file__, case, True, args.repeats)
        row["float_peak_bytes"] = baseline["peak_bytes"]
        rows.append(row)
        unit = row["float_pass_seconds"]
        for label, entry in row["configs"].items():
            print(f"{case} ({row['parameters'] / 1e6:.1f}M, {row['tokens']} tokens) {label}: "
                  f"PTQ {entry['ptq_seconds']:.1f} s = {entry['ptq_seconds'] / unit:.1f}x a "
                  f"float pass of {unit:.2f} s; quantized forward "
                  f"{entry['quantized_pass_seconds'] / unit:.2f}x; peak "
                  f"{row['peak_bytes'] / 2**30:.2f} GiB (float "
                  f"{baseline['peak_bytes'] / 2**30:.2f} GiB)", flush=True)
    Path(args.output).parent.mkdir(exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    if args.update_docs:
        write_section("sequence-scaling", table(rows), command_line())


if __name__ == "__main__":
    main()
