"""The work behind each ``hfp8-ptq`` subcommand. Each returns (report dict, text, exit code)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import hfp8
from hfp8.calibration.samples import SampleConfig, SampleError, SampleFolder
from hfp8.evaluation import collect_logits, fidelity, top1_accuracy
from hfp8.model_files import ModelFileError, build_architecture, file_kind, load_model
from hfp8.ptq.export import MANIFEST_KEY
from hfp8.ptq.transform import REPORT_ATTRIBUTE
from hfp8.ptq.verify import MIN_OUTPUT_SQNR_DB, passed


class UsageError(ValueError):
    """A mistake in the command line itself."""


INPUT_ERRORS = (UsageError, ModelFileError, SampleError, hfp8.QuantizedFileError, hfp8.ExportError,
                ValueError, TypeError, OSError)


def version() -> str:
    return hfp8.__version__


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# -- shared helpers ---------------------------------------------------------------------------
def _check_output(path: str, inputs: list[str | None], overwrite: bool) -> Path:
    target = Path(path)
    for given in inputs:
        if given and Path(given).exists() and target.resolve() == Path(given).resolve():
            raise UsageError(f"output {path} is also an input; choose another output name")
    if target.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist")
    try:  # try it: os.access says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to output folder {parent} ({error.strerror or error})") from None
    if target.exists() and not overwrite:
        raise UsageError(f"output {path} already exists; pass --overwrite to replace it")
    return target


def _sample_config(args, defaults: dict | None = None, labels: bool = False) -> SampleConfig:
    values = dict(defaults or {})
    for name in ("resize", "crop"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name) or None  # 0 means "skip this step"
    for name in ("mean", "std", "channels"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return SampleConfig(batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                        workers=args.workers, strict=args.strict, labels=labels, **values)


def _preprocessing(config: SampleConfig) -> dict:
    return {"resize": config.resize, "crop": config.crop, "mean": list(config.mean),
            "std": list(config.std), "channels": config.channels}


def _first_batch(samples: SampleFolder):
    for batch in samples:
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    raise SampleError(f"no readable samples in {samples.path}")


def _dry_run(model, x: torch.Tensor, folder, config: SampleConfig | None = None) -> None:
    """One forward on the first batch, so shape mistakes become one clear line."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad shapes
        hint = "" if config is None else (
            f" (preprocessing: --channels {config.channels}, --resize {config.resize or 0}, "
            f"--crop {config.crop or 0})")
        raise UsageError(f"the model rejects samples from {folder} of shape "
                         f"{tuple(x.shape[1:])}{hint}: {one_line(error)}") from None


def _metadata(path: str) -> dict:
    manifest = hfp8.read_manifest(path)
    return manifest.get("metadata") or {}


def _load_qmodel(path: str, arch: str | None):
    arch = arch or _metadata(path).get("architecture")
    if arch is None:
        raise UsageError(f"{path} does not record its architecture; pass --arch MODULE:FACTORY")
    return hfp8.load_quantized(path, build_architecture(arch)), arch


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
    _check_output(args.output, [args.model], args.overwrite)
    if args.onnx:
        _check_output(args.onnx, [args.model, args.output], args.overwrite)
        if Path(args.onnx).resolve() == Path(args.output).resolve():
            raise UsageError("--onnx and -o name the same file")
    model = load_model(args.model, args.arch, args.trust_pickle)
    samples = SampleFolder(args.calib, _sample_config(args))
    first = _first_batch(samples)
    _dry_run(model, first, args.calib, samples.config)
    fmt = {"e4m3": hfp8.E4M3, "e5m2": hfp8.E5M2}[args.format]
    config = hfp8.QuantConfig(
        weight_format=fmt, activation_format=None if args.weights_only else fmt,
        weight_granularity="per_channel" if args.per_channel else "per_tensor",
        weight_bias_method=args.bias_method, activation_bias_method=args.bias_method,
        keep_first_and_last=not args.quantize_first_last, exclude=tuple(args.exclude),
        include=tuple(args.include),
        bn_recalibration="none" if args.no_bn_recalibration else args.bn_method)
    qmodel = hfp8.quantize_model(model, samples, config, quiet=args.quiet)
    getattr(qmodel, REPORT_ATTRIBUTE)["metadata"] = {
        "architecture": args.arch, "preprocessing": _preprocessing(samples.config),
        "input_shape": list(first.shape[1:]), "calibration_folder": str(args.calib)}
    manifest = hfp8.save_quantized(qmodel, args.output)
    report = {"output": args.output, "manifest": manifest, "skipped_files": len(samples.skipped)}
    lines = [hfp8.format_manifest(manifest), f"wrote {args.output}"]
    code = 0
    if args.onnx:
        hfp8.export_onnx(qmodel, args.onnx, first[:1])
        report["onnx"] = args.onnx
        lines.append(f"wrote {args.onnx}")
        if not args.no_verify:
            batches = [b for _, b in zip(range(4), samples)]
            report["verification"], code = _verify(qmodel, args.onnx, batches, args.quiet)
            lines.append(_verify_text(report["verification"]))
    return report, "\n".join(lines), code


def recalibrate_bn(args) -> tuple[dict, str, int]:
    _check_output(args.output, [args.qmodel, args.reference], args.overwrite)
    qmodel, arch = _load_qmodel(args.qmodel, args.arch)
    metadata = getattr(qmodel, REPORT_ATTRIBUTE).setdefault("metadata", None) or {}
    samples = SampleFolder(args.calib, _sample_config(args, metadata.get("preprocessing")))
    _dry_run(qmodel, _first_batch(samples), args.calib, samples.config)
    reference = None
    if args.method == "shift":
        if not args.reference:
            raise UsageError("--method shift needs --reference, the float model")
        reference = load_model(args.reference, arch, args.trust_pickle)
    bn = hfp8.recalibrate_batchnorm(qmodel, samples, method=args.method, reference=reference,
                                    quiet=args.quiet)
    report_data = getattr(qmodel, REPORT_ATTRIBUTE)
    report_data["batchnorm"] = bn
    report_data["metadata"] = {**metadata, "architecture": arch}
    manifest = hfp8.save_quantized(qmodel, args.output)
    text = (f"re-estimated {bn['batchnorm_layers']} BatchNorm layers ({bn['method']}) from "
            f"{bn['samples']} samples\nwrote {args.output}")
    return {"output": args.output, "batchnorm": bn, "manifest": manifest}, text, 0


def export(args) -> tuple[dict, str, int]:
    _check_output(args.output, [args.qmodel], args.overwrite)
    qmodel, _ = _load_qmodel(args.qmodel, args.arch)
    metadata = getattr(qmodel, REPORT_ATTRIBUTE).get("metadata") or {}
    if args.verify_data:
        samples = SampleFolder(args.verify_data, _sample_config(args, metadata.get("preprocessing")))
        batches = [b for _, b in zip(range(4), samples)]
        example = _first_batch(samples)[:1]
    elif metadata.get("input_shape"):
        generator = torch.Generator().manual_seed(args.seed)
        shape = metadata["input_shape"]
        batches = [torch.randn(8, *shape, generator=generator) for _ in range(2)]
        example = batches[0][:1]
    else:
        raise UsageError(f"{args.qmodel} does not record its input shape; pass --verify-data DIR")
    _dry_run(qmodel, example, args.verify_data or args.qmodel)
    hfp8.export_onnx(qmodel, args.output, example, opset=args.opset)
    report, lines, code = {"output": args.output}, [f"wrote {args.output}"], 0
    if not args.no_verify:
        report["verification"], code = _verify(qmodel, args.output, batches, args.quiet)
        lines.append(_verify_text(report["verification"]))
    return report, "\n".join(lines), code


def _onnx_runner(path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _runner(path: str, args) -> tuple[object, dict]:
    """A batch -> logits callable for any model file, and its recorded preprocessing."""
    kind = file_kind(path)
    if kind == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        manifest = json.loads(props[MANIFEST_KEY]) if MANIFEST_KEY in props else {}
        return _onnx_runner(path), (manifest.get("metadata") or {}).get("preprocessing")
    if kind == "hfp8":
        qmodel, _ = _load_qmodel(path, args.arch)
        return qmodel, _metadata(path).get("preprocessing")
    return load_model(path, args.arch, args.trust_pickle), None


def evaluate(args) -> tuple[dict, str, int]:
    model, preprocessing = _runner(args.model, args)
    labelled = not args.reference
    samples = SampleFolder(args.data, _sample_config(args, preprocessing, labels=labelled))
    _dry_run(model, _first_batch(samples), args.data, samples.config)
    progress = dict(quiet=args.quiet, description="Evaluating")
    if labelled:
        targets = torch.cat([t for _, t in samples])
        logits = collect_logits(model, samples, **progress) if isinstance(model, torch.nn.Module) \
            else torch.cat([model(x) for x, _ in samples])
        report = {"top1": top1_accuracy(logits, targets), "samples": len(targets),
                  "classes": len(samples.class_names)}
        text = f"top-1 accuracy {report['top1']:.4f} on {report['samples']} samples " \
               f"({report['classes']} classes)"
        return report, text, 0
    reference, _ = _runner(args.reference, args)
    outputs = []
    for candidate in (reference, model):
        outputs.append(collect_logits(candidate, samples, **progress)
                       if isinstance(candidate, torch.nn.Module)
                       else torch.cat([candidate(x) for x in samples]))
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
        raise UsageError(f"{args.file} is neither an hfp8-ptq model nor an ONNX file")
    import onnx

    model = onnx.load(args.file)
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
