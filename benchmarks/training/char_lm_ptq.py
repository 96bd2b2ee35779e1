"""PTQ of the training benchmark's character Transformer, trained as it is there.

    python benchmarks/training/char_lm_ptq.py [--update-docs]

The FP32 row of compare.py's language task (hfp8.examples.CharTransformer: width 128, 2 blocks,
context 64; AdamW with a one-cycle schedule, one epoch of 500 steps of 32 windows of the
standard library's docstrings), then ``hfp8.quantize_model`` with the defaults on 8 training
windows-batches (256 sequences); perplexity per character on the held-out 10% (256 windows of
64, exactly compare.py's evaluation) for the float and the quantized model; the prefill graph
(``tokens -> logits``) exported and verified in a default onnxruntime session on held-out
windows of two other shapes (3 x 64 and 5 x 40: batch and length are dynamic); and onnxruntime's
own perplexity on the held-out set.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "accuracy"), str(HERE.parent / "gallery")]

import hfp8  # noqa: E402
from compare import train_one  # noqa: E402
from hfp8.export import onnx_replay  # noqa: E402
from hfp8.export.verify import passed  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402
from tasks import TASKS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = TASKS["transformer"]()
    trained = {}

    def keep(model):  # compare.train_one's model is local: keep it through task.evaluate
        trained["model"] = model
        return evaluate(model)
    evaluate, task.evaluate = task.evaluate, keep
    start = time.perf_counter()
    result = train_one(task, None, epochs=1)
    task.evaluate = evaluate
    model = trained["model"].eval()
    print(f"trained in {time.perf_counter() - start:.0f} s: perplexity {result['final']:.4f}")
    windows = task.train_batches(seed=7)[:8]
    calibration = [inputs for inputs, _ in windows]
    start = time.perf_counter()
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    ptq = time.perf_counter() - start
    held_out = task.test_data[:(len(task.test_data) - 1) // task.context * task.context + 1]
    tokens = held_out[:-1].reshape(-1, task.context)[:256]
    nexts = held_out[1:].reshape(-1, task.context)[:256]

    def perplexity(run) -> float:  # compare.py's: each window's 64 next characters
        with torch.no_grad():
            total = sum(float(task.loss(run(x), y)) * len(x)
                        for x, y in zip(tokens.split(64), nexts.split(64)))
        return math.exp(total / len(tokens))
    floats, quantized = perplexity(model), perplexity(qmodel)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "char_lm.onnx"
        start = time.perf_counter()
        hfp8.export_onnx(qmodel, path, tokens[:2])
        export = time.perf_counter() - start
        report = hfp8.verify_onnx(qmodel, path, [tokens[64:67], tokens[100:105, :40]],
                                  reference=model)
        session = onnx_replay.session(path)
        name = session.get_inputs()[0].name
        in_onnx = perplexity(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]))
    layers = [r for r in report["layers"].values() if r["checked"]]
    row = [f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k", f"{floats:.4f}",
           f"{quantized:.4f} ({100 * (quantized / floats - 1):+.2f}%)", f"{in_onnx:.4f}",
           f"{sum(p['bit_exact'] for p in report['pairs'].values())}/{len(report['pairs'])}",
           f"{sum(r['within_bound'] for r in layers)}/{len(layers)}",
           "pass" if passed(report) else "FAIL", f"{ptq:.1f} s", f"{export:.1f} s"]
    table = markdown_table(["parameters", "float perplexity", "HFP8 PTQ perplexity",
                            "ONNX (onnxruntime) perplexity", "Q/DQ pairs bit-exact",
                            "layers within bound", "verified (3x64, 5x40)", "PTQ", "export"],
                           [row])
    print(table)
    if args.update_docs:
        write_section("char-lm-ptq", table, command_line())


if __name__ == "__main__":
    main()
