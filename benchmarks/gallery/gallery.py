"""A gallery of real models nobody on this project wrote: quantize, export, verify, measure.

    pip install -r benchmarks/gallery/requirements.txt   (see that file for the --no-deps lines)
    HF_HUB_OFFLINE=1 python benchmarks/gallery/gallery.py [--models mobilenet_v2 mtcnn_onet ...]
        [--update-docs]

For each model, with the default configuration (E4M3, first/last layers float by position in
the graph, attention products quantized, BN re-estimation "shift"):

* Conv/Linear layers quantized out of all, and the share of their weights;
* fidelity to the float model on held-out real data, with the metric that fits the task:
  classifiers (MobileNetV2, EfficientNet-Lite2: real photo crops) top-1 agreement, KL, logit SQNR;
  MTCNN P/R/O (LFW faces and non-faces from scikit-image) face/non-face decision agreement and
  the lowest SQNR over its outputs; RetinaFace (random weights, structure only) lowest output
  SQNR; all-MiniLM-L6-v2 (standard-library docstrings) mean cosine of the mean-pooled sentence
  embeddings and SQNR;
* the exported FP8 QDQ file verified in onnxruntime (default session): Q/DQ pairs bit-exact,
  layers replayed within the float32 summation bound, and the whole model's deviation from the
  float64 run beside PyTorch float32's (the verdict), plus onnxruntime vs PyTorch directly;
* PTQ time as a ratio to one float forward pass over the calibration set, timed in this run.

Results go to benchmarks/gallery/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hfp8  # noqa: E402
from hfp8.ptq.evaluation import compare_outputs  # noqa: E402
from hfp8.data.model_io import call_model  # noqa: E402
from hfp8.numerics.sqnr import strict_json  # noqa: E402
from hfp8.ptq.quantizers import is_quantizable, quantized_layers  # noqa: E402
from hfp8.export.verify import passed  # noqa: E402

import real_models  # noqa: E402
import texts  # noqa: E402
from photos import photo_crops  # noqa: E402
from results_doc import add_update_flag, fidelity, gallery_table, write_section  # noqa: E402


# -- data -----------------------------------------------------------------------------------
def _photos(calibration, evaluation, size=224, batch=32):
    return (list(photo_crops("calibration", calibration, seed=0, size=size).split(batch)),
            list(photo_crops("evaluation", evaluation, seed=1, size=size).split(batch)))


def _faces(size: int, batch: int = 25):
    """LFW faces and non-faces (scikit-image's lfw_subset), greyscale replicated to RGB, scaled
    as MTCNN expects ((x - 127.5) / 128); even images calibrate, odd ones evaluate."""
    import skimage.data

    images = torch.from_numpy(skimage.data.lfw_subset()).float().unsqueeze(1) * 255
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                       align_corners=False).repeat(1, 3, 1, 1)
    images = (images - 127.5) / 128
    return list(images[0::2].split(batch)), list(images[1::2].split(batch))


def _sentences(tokenizer, calibration=256, evaluation=256, batch=32):
    sentences = texts.sentences()
    step = len(sentences) // (calibration + evaluation)
    chosen = sentences[::step][:calibration + evaluation]

    def batches(items):
        return [dict(tokenizer(list(items[i:i + batch]), padding=True, truncation=True,
                               max_length=64, return_tensors="pt"))
                for i in range(0, len(items), batch)]
    return batches(chosen[0::2]), batches(chosen[1::2])


# -- metrics --------------------------------------------------------------------------------
@torch.no_grad()
def _face_agreement(model, qmodel, batches) -> float:
    """Share of face/non-face decisions (argmax of the probability output) that agree."""
    agree = total = 0
    for batch in batches:
        # every MTCNN net returns the face/non-face probabilities last, shape (N, 2[, H, W])
        decided_ref, decided_test = model(batch)[-1].argmax(1), qmodel(batch)[-1].argmax(1)
        agree += int((decided_ref == decided_test).sum())
        total += decided_ref.numel()
    return agree / total


@torch.no_grad()
def _embedding_cosine(model, qmodel, batches) -> float:
    """Mean cosine of mean-pooled (attention-mask weighted) sentence embeddings."""
    cosines = []
    for batch in batches:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [(m(**batch)["last_hidden_state"] * mask).sum(1) / mask.sum(1) for m in (model, qmodel)]
        cosines.append(nn.functional.cosine_similarity(*pooled, dim=1))
    return float(torch.cat(cosines).mean())


def _min_sqnr(result: dict) -> float:
    return min(o["sqnr_db"] for o in result["outputs"].values())


# -- the models -------------------------------------------------------------------------------
def _entries(which):
    """name -> (loader returning (model, calibration, evaluation, task))."""
    def mobilenet():
        from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2
        model = mobilenet_v2()
        model.load_state_dict(torch.load(imagenet_mobilenet_v2_weights_path(), weights_only=True))
        return (model.eval(), *_photos(256, 256), "classifier")

    def efficientnet():
        return (real_models.load_efficientnet_lite2(), *_photos(128, 128, size=260), "classifier")

    def mtcnn(net):
        def load():
            model, size = real_models.load_mtcnn(net)
            return (model, *_faces(size), "faces")
        return load

    def retinaface():
        return (real_models.load_retinaface(), *_photos(32, 32, size=256, batch=8), "detector")

    def minilm():
        model, tokenizer = real_models.load_minilm()
        return (model, *_sentences(tokenizer), "embeddings")

    table = {"mobilenet_v2": mobilenet, "efficientnet_lite2": efficientnet,
             "mtcnn_pnet": mtcnn("pnet"), "mtcnn_rnet": mtcnn("rnet"), "mtcnn_onet": mtcnn("onet"),
             "retinaface": retinaface, "minilm_l6": minilm}
    return {name: table[name] for name in which}


@torch.no_grad()
def _float_pass_seconds(model, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        call_model(model, batch)
    return time.perf_counter() - start


def measure(name, loader, verify_batches: int) -> dict:
    model, calibration, evaluation, task = loader()
    layers = {n: m for n, m in model.named_modules() if is_quantizable(m)}
    weights = sum(m.weight.numel() for m in layers.values())
    float_seconds = _float_pass_seconds(model, calibration)
    start = time.perf_counter()
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    ptq_seconds = time.perf_counter() - start
    quantized = quantized_layers(qmodel)
    manifest = hfp8.manifest(qmodel)
    result = compare_outputs(model, qmodel, evaluation)
    row = {"model": name, "task": task, "layers": len(layers), "quantized": len(quantized),
           "weights_quantized": sum(m.weight.numel() for m in quantized.values()) / weights,
           "attention_sites": sum(s["status"] == "quantized" for s in manifest["attention"]),
           "kept_float": {l["name"]: l["reason"].split(":")[0] for l in manifest["layers"]
                          if l["status"] == "float"},
           "ptq_seconds": ptq_seconds, "float_pass_seconds": float_seconds,
           "ptq_time_ratio": ptq_seconds / float_seconds, "outputs": result["outputs"],
           "min_sqnr_db": _min_sqnr(result)}
    if task == "classifier":
        only = next(iter(result["outputs"].values()))
        row.update(top1_agreement=only["top1_agreement"], kl=only["kl"])
    elif task == "faces":
        row["decision_agreement"] = _face_agreement(model, qmodel, evaluation)
    elif task == "embeddings":
        row["embedding_cosine"] = _embedding_cosine(model, qmodel, evaluation)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        start = time.perf_counter()
        hfp8.export_onnx(qmodel, path, evaluation[0])
        row["export_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        report = hfp8.verify_onnx(qmodel, path, evaluation[:verify_batches], reference=model)
        row["verify_seconds"] = time.perf_counter() - start
        row["onnx_bytes"] = path.stat().st_size
    checked = [r for r in report["layers"].values() if r["checked"]]
    row["verification"] = {
        "passed": passed(report), "pairs": len(report["pairs"]),
        "pairs_bit_exact": sum(p["bit_exact"] for p in report["pairs"].values()),
        "values_checked": sum(p["values"] for p in report["pairs"].values()),
        "layers_replayed": len(checked), "layers_within_bound": sum(r["within_bound"] for r in checked),
        "whole_model": report["whole_model"], "samples": report["samples"],
        "sqnr": {comparison: min(o[comparison]["sqnr_db"] for o in report["outputs"].values())
                 for comparison in ("onnx_vs_torch", "onnx_vs_float64", "torch_vs_float64",
                                    "onnx_vs_float", "torch_vs_float")}}
    return row


def main() -> None:
    names = ["mobilenet_v2", "efficientnet_lite2", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet",
             "retinaface", "minilm_l6"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    parser.add_argument("--verify-batches", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results.json"))
    add_update_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for name, loader in _entries(args.models).items():
        start = time.perf_counter()
        rows.append(measure(name, loader, args.verify_batches))
        print(f"{name}: {fidelity(rows[-1])}, verification "
              f"{'OK' if rows[-1]['verification']['passed'] else 'FAILED'} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.output).write_text(json.dumps(strict_json(rows), indent=1, allow_nan=False) + "\n")
    print(gallery_table(rows))
    if args.update_docs:
        write_section("gallery", gallery_table(rows))


if __name__ == "__main__":
    main()
