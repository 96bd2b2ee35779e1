"""The work behind each ``hfp8-ptq`` subcommand. Each returns (report dict, text, exit code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import hfp8
from hfp8 import cli_inputs as inputs
from hfp8._files import atomic_write_all
from hfp8.calibration.samples import SampleError, SampleFolder
from hfp8.evaluation import collect_logits, fidelity, top1_accuracy
from hfp8.model_files import ModelFileError, file_kind, load_model
from hfp8.ptq.export import MANIFEST_KEY
from hfp8.ptq.transform import REPORT_ATTRIBUTE
from hfp8.ptq.verify import MIN_OUTPUT_SQNR_DB, passed

INPUT_ERRORS = (inputs.UsageError, ModelFileError, SampleError, hfp8.QuantizedFileError,
                hfp8.ExportError, ValueError, TypeError, OSError)


def version() -> str:
    return hfp8.__version__


# -- shared helpers ---------------------------------------------------------------------------
def _verify(qmodel, path, batches, quiet) -> tuple[dict, int]:
    report = hfp8.verify_onnx(qmodel, path, batches, quiet=quiet)
    report["passed"] = passed(report)
    return report, 0 if report["passed"] else 1


def _verify_text(report: dict) -> str:
    pairs = report["pairs"]
    exact = sum(p["bit_exact"] for p in pairs.values())
    verdict = "OK" if report["passed"] else "FAILED"
    return (f"onnxruntime verification {verdict}: {exact}/{len(pairs)} Q/DQ pairs bit-exact, "
            f"output SQNR {report['output_sqnr_db']:.1f} dB (needs {MIN_OUTPUT_SQNR_DB:.0f}), "
            f"top-1 agreement {report['top1_agreement']:.4f} on {report['samples']} samples, "
            f"max |diff| {report['max_abs_diff']:.3g} (relative {report['max_rel_diff']:.3g})")


# -- commands ---------------------------------------------------------------------------------
def quantize(args) -> tuple[dict, str, int]:
    inputs.check_output(args.output, [args.model], args.overwrite)
    if args.onnx:
        inputs.check_output(args.onnx, [args.model, args.output], args.overwrite)
        if Path(args.onnx).resolve() == Path(args.output).resolve():
            raise inputs.UsageError("--onnx and -o name the same file")
    model = load_model(args.model, args.arch, args.trust_pickle)
    samples = SampleFolder(args.calib, inputs.sample_config(args))
    first = inputs.first_batch(samples)
    inputs.dry_run(model, first, args.calib, samples.config)
    fmt = {"e4m3": hfp8.E4M3, "e5m2": hfp8.E5M2}[args.format]
    config = hfp8.QuantConfig(
        weight_format=fmt, activation_format=None if args.weights_only else fmt,
        weight_granularity="per_channel" if args.per_channel else "per_tensor",
        weight_bias_method=args.bias_method, activation_bias_method=args.bias_method,
        keep_first_and_last=not args.quantize_first_last, exclude=tuple(args.exclude),
        include=tuple(args.include),
        bn_recalibration="none" if args.no_bn_recalibration else args.bn_method)
    if args.onnx:
        inputs.check_exportable(model, first[:1])  # before the slow part, not after it
    qmodel = hfp8.quantize_model(model, samples, config, quiet=args.quiet)
    getattr(qmodel, REPORT_ATTRIBUTE)["metadata"] = {
        "architecture": args.arch, "preprocessing": inputs.preprocessing(samples.config),
        "input_shape": list(first.shape[1:]), "calibration_folder": str(args.calib)}
    report = {"output": args.output, "skipped_files": len(samples.skipped)}
    code = 0

    def write(quantized_path: str, onnx_path: str | None = None) -> None:
        nonlocal code
        if onnx_path:
            hfp8.export_onnx(qmodel, onnx_path, first[:1])
            if not args.no_verify:
                batches = [b for _, b in zip(range(4), samples)]
                report["verification"], code = _verify(qmodel, onnx_path, batches, args.quiet)
        report["manifest"] = hfp8.save_quantized(qmodel, quantized_path)

    # Both files are written under temporary names and renamed only once both are complete:
    # a failed export or verification leaves neither (nor replaces a file under --overwrite).
    atomic_write_all([args.output, args.onnx] if args.onnx else [args.output],
                     lambda temporaries: write(*temporaries))
    if args.onnx:
        report["onnx"] = args.onnx
    lines = [hfp8.format_manifest(report["manifest"]), f"wrote {args.output}"]
    if args.onnx:
        lines.append(f"wrote {args.onnx}")
        if "verification" in report:
            lines.append(_verify_text(report["verification"]))
    return report, "\n".join(lines), code


def recalibrate_bn(args) -> tuple[dict, str, int]:
    inputs.check_output(args.output, [args.qmodel, args.reference], args.overwrite)
    qmodel, arch = inputs.load_qmodel(args.qmodel, args.arch)
    metadata = getattr(qmodel, REPORT_ATTRIBUTE).setdefault("metadata", None) or {}
    samples = SampleFolder(args.calib, inputs.sample_config(args, metadata.get("preprocessing")))
    inputs.dry_run(qmodel, inputs.first_batch(samples), args.calib, samples.config)
    reference = None
    if args.method == "shift":
        if not args.reference:
            raise inputs.UsageError("--method shift needs --reference, the float model")
        reference = load_model(args.reference, arch, args.trust_pickle)
    bn = hfp8.recalibrate_batchnorm(qmodel, samples, method=args.method, reference=reference,
                                    quiet=args.quiet)
    # recalibrate_batchnorm has put its report into the manifest; keep the architecture too
    getattr(qmodel, REPORT_ATTRIBUTE)["metadata"] = {**metadata, "architecture": arch}
    manifest = hfp8.save_quantized(qmodel, args.output)
    text = (f"re-estimated {bn['batchnorm_layers']} BatchNorm layers ({bn['method']}) from "
            f"{bn['samples']} samples\nwrote {args.output}")
    return {"output": args.output, "batchnorm": bn, "manifest": manifest}, text, 0


def export(args) -> tuple[dict, str, int]:
    inputs.check_output(args.output, [args.qmodel], args.overwrite)
    qmodel, _ = inputs.load_qmodel(args.qmodel, args.arch)
    metadata = getattr(qmodel, REPORT_ATTRIBUTE).get("metadata") or {}
    if args.verify_data:
        samples = SampleFolder(args.verify_data, inputs.sample_config(args, metadata.get("preprocessing")))
        batches = [b for _, b in zip(range(4), samples)]
        example = inputs.first_batch(samples)[:1]
    elif metadata.get("input_shape"):
        generator = torch.Generator().manual_seed(args.seed)
        shape = metadata["input_shape"]
        batches = [torch.randn(8, *shape, generator=generator) for _ in range(2)]
        example = batches[0][:1]
    else:
        raise inputs.UsageError(f"{args.qmodel} does not record its input shape; pass --verify-data DIR")
    inputs.dry_run(qmodel, example, args.verify_data or args.qmodel)
    hfp8.export_onnx(qmodel, args.output, example, opset=args.opset)
    report, lines, code = {"output": args.output}, [f"wrote {args.output}"], 0
    if not args.no_verify:
        report["verification"], code = _verify(qmodel, args.output, batches, args.quiet)
        lines.append(_verify_text(report["verification"]))
    return report, "\n".join(lines), code


def evaluate(args) -> tuple[dict, str, int]:
    model, preprocessing, arch = inputs.runner(args.model, args.arch, args.trust_pickle)
    labelled = not args.reference
    samples = SampleFolder(args.data, inputs.sample_config(args, preprocessing, labels=labelled))
    inputs.dry_run(model, inputs.first_batch(samples), args.data, samples.config)
    progress = dict(quiet=args.quiet, description="Evaluating")
    if labelled:
        targets = torch.cat([t for _, t in samples])
        logits = collect_logits(model, samples, **progress)
        report = {"top1": top1_accuracy(logits, targets), "samples": len(targets),
                  "classes": len(samples.class_names)}
        text = f"top-1 accuracy {report['top1']:.4f} on {report['samples']} samples " \
               f"({report['classes']} classes)"
        return report, text, 0
    # a float state dict as reference is built with the architecture the model file records
    reference, _, _ = inputs.runner(args.reference, args.arch or arch, args.trust_pickle)
    outputs = [collect_logits(candidate, samples, **progress) for candidate in (reference, model)]
    report = {**fidelity(*outputs), "samples": len(outputs[0])}
    text = (f"top-1 agreement {report['top1_agreement']:.4f}, KL {report['kl']:.4g} nats, "
            f"logit SQNR {report['sqnr_db']:.2f} dB on {report['samples']} samples")
    return report, text, 0


def inspect(args) -> tuple[dict, str, int]:
    kind = file_kind(args.file)
    if kind == "hfp8":
        manifest = hfp8.read_manifest(args.file)
        return manifest, hfp8.format_manifest(manifest), 0
    if kind != "onnx":
        raise inputs.UsageError(f"{args.file} is neither an hfp8-ptq model nor an ONNX file")
    import onnx

    model = inputs.load_onnx(args.file)
    props = {p.key: p.value for p in model.metadata_props}
    ops = [n.op_type for n in model.graph.node]
    fp8 = {t.name for t in model.graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"} & fp8
    summary = {"opset": model.opset_import[0].version, "nodes": len(ops),
               "quantize_linear": ops.count("QuantizeLinear"),
               "dequantize_linear": ops.count("DequantizeLinear"),
               "fp8_weight_tensors": len(weights)}
    text = (f"ONNX opset {summary['opset']}: {summary['nodes']} nodes, "
            f"{summary['quantize_linear']} QuantizeLinear, {summary['dequantize_linear']} "
            f"DequantizeLinear, {summary['fp8_weight_tensors']} FP8 weight tensors")
    if MANIFEST_KEY in props:
        manifest = json.loads(props[MANIFEST_KEY])
        return {**summary, "manifest": manifest}, text + "\n" + hfp8.format_manifest(manifest), 0
    return summary, text + "\n(no hfp8-ptq manifest in the metadata)", 0


def example(args) -> tuple[dict, str, int]:
    from hfp8.examples import copy_example

    folder = copy_example(args.folder)
    flags = "--channels 1 --mean 0 --std 1 --resize 0 --crop 0"
    steps = [
        f"cd {folder}",
        f"hfp8-ptq quantize model.pt --arch hfp8.examples:fashion_cnn --calib calibration {flags} "
        "-o model.hfp8.pt --onnx model.onnx",
        "hfp8-ptq evaluate model.onnx --data test",
        f"hfp8-ptq evaluate model.pt --arch hfp8.examples:fashion_cnn --data test {flags}",
        "hfp8-ptq inspect model.hfp8.pt",
    ]
    text = f"copied the Fashion-MNIST example into {folder}; next:\n  " + "\n  ".join(steps)
    return {"folder": str(folder), "next": steps}, text, 0
