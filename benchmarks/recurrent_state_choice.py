"""The hidden-state choice for recurrent layers, measured both ways on trained models.

    python benchmarks/recurrent_state_choice.py [--update-docs]

The suite's row readers (tests/small_models.py: a digit read row by row, 8 steps of 8 pixels;
Linear 8 -> 32, a 2-layer bidirectional LSTM, GRU or tanh RNN of width 32, Linear 64 -> 10;
trained on 1,297 of sklearn's digits) are quantized with the defaults (first and last layers
float, so the recurrent layer is the one quantized) on 96 training images, hidden state float
(the default) and rounded (``quantize_recurrent_state=True``); with the hidden state float
also one bias per row (``per_channel``) and round-to-nearest weights (``weight_rounding=
"nearest"``; the default compensates the first layer's input matrices under its input moments). Measured on the 500 held-out digits: accuracy, top-1 agreement with the float model
and output SQNR in dB (``10 log10(sum z^2 / sum (z - z_q)^2)`` over the logits).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import hfp8  # noqa: E402
from hfp8.numerics.sqnr import sqnr_db  # noqa: E402
from results_doc import add_update_flag, command_line, markdown_table, write_section  # noqa: E402
from tests.small_models import accuracy, calibration_batches, digits, trained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_update_flag(parser)
    args = parser.parse_args()
    _, _, test_x, test_y = digits()
    rows = []
    for name in ("lstm", "gru", "rnn"):
        model = trained(name)
        with torch.no_grad():
            reference = model(test_x)
        rows.append([name.upper(), "float", "-", f"{accuracy(model, test_x, test_y):.3f}", "-",
                     "-"])
        for rounded, granularity, rounding in ((False, "per_tensor", "compensated"),
                                               (False, "per_channel", "compensated"),
                                               (False, "per_tensor", "nearest"),
                                               (True, "per_tensor", "compensated")):
            config = hfp8.QuantConfig(quantize_recurrent_state=rounded, weight_rounding=rounding,
                                      weight_granularity=granularity)
            qmodel = hfp8.quantize_model(model, calibration_batches(3), config, quiet=True)
            with torch.no_grad():
                output = qmodel(test_x)
            agreement = (output.argmax(1) == reference.argmax(1)).double().mean().item()
            sqnr = sqnr_db(float(reference.double().square().sum()),
                           float((reference.double() - output.double()).square().sum()))
            rows.append([name.upper(), "rounded" if rounded else "float (default)",
                         f"{granularity}, {rounding}", f"{accuracy(qmodel, test_x, test_y):.3f}",
                         f"{agreement:.3f}", f"{sqnr:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["model", "hidden state", "weight biases, rounding", "accuracy",
                            "top-1 agreement", "output SQNR dB"], rows)
    print(table)
    if args.update_docs:
        write_section("recurrent-state-choice", table, command_line())


if __name__ == "__main__":
    main()
