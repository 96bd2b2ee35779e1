"""Should attention products be quantized by default? Measured on all-MiniLM-L6-v2.

    HF_HUB_OFFLINE=1 python benchmarks/gallery/attention_choice.py [--update-docs]

Same calibration and evaluation sentences (standard-library docstrings) for every row: mean
cosine of the mean-pooled sentence embeddings to the float model, the last hidden state's SQNR,
and PTQ time, with E4M3 attention operands on and off, beside INT8 (symmetric, per tensor,
max calibration) on the same Linear layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import hfp8  # noqa: E402
from hfp8.ptq.evaluation import compare_outputs  # noqa: E402

import gallery  # noqa: E402
import real_models  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_update_flag(parser)
    args = parser.parse_args()
    model, tokenizer = real_models.load_minilm()
    calibration, evaluation = gallery._sentences(tokenizer)
    rows = []
    for label, config in (("E4M3, attention products quantized (default)", hfp8.QuantConfig()),
                          ("E4M3, attention products float", hfp8.QuantConfig(quantize_attention=False))):
        start = time.perf_counter()
        qmodel = hfp8.quantize_model(model, calibration, config, quiet=True)
        seconds = time.perf_counter() - start
        rows.append((label, gallery._embedding_cosine(model, qmodel, evaluation),
                     compare_outputs(model, qmodel, evaluation)["outputs"]["last_hidden_state"]["sqnr_db"],
                     seconds))
    from int8_baseline import int8_quantize_model  # noqa: E402

    start = time.perf_counter()
    int8 = int8_quantize_model(model, calibration, hfp8.QuantConfig(), per_channel=False)
    seconds = time.perf_counter() - start
    rows.append(("INT8 per-tensor (max), attention float", gallery._embedding_cosine(model, int8, evaluation),
                 compare_outputs(model, int8, evaluation)["outputs"]["last_hidden_state"]["sqnr_db"],
                 seconds))
    table = markdown_table(["configuration", "embedding cosine", "last hidden state SQNR dB", "PTQ s"],
                           [[label, f"{cosine:.4f}", f"{sqnr:.2f}", f"{seconds:.1f}"]
                            for label, cosine, sqnr, seconds in rows])
    print(table)
    if args.update_docs:
        write_section("attention-choice", table, command_line())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
