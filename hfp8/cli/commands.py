"""The work behind each ``hfp8-ptq`` subcommand. Each returns (report dict, text, exit code)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import hfp8
from hfp8._files import external_data_path
from hfp8.cli import inputs
from hfp8.cli.outputs import (
    VerificationFailed,
    check_output,
    verification_text,
    write_outputs,
)
from hfp8.cli.recalibrate import bn_recalibration
from hfp8.data.model_files import ModelFileError, file_kind, load_model
from hfp8.data.model_io import BatchError, map_tensors
from hfp8.data.samples import SampleError, SampleFolder
from hfp8.ptq.plot import PlotError  # light: matplotlib is imported on use
from hfp8.ptq.report import report_of

INPUT_ERRORS = (inputs.UsageError, PlotError, ModelFileError, SampleError, hfp8.QuantizedFileError,
                hfp8.ExportError, BatchError, ValueError, TypeError, OSError)


def version() -> str:
    return hfp8.__version__


def _phase(args, text: str) -> None:
    """One line on stderr as a long phase starts (not with --quiet or --json)."""
    if not (args.quiet or getattr(args, "json", False)):
        print(f"hfp8-ptq {args.command}: {text} ...", file=sys.stderr, flush=True)


def _export_and_verify(qmodel, temporaries, onnx_path, example, batches, reference, args,
                       report) -> None:
    """Export and verify into ``temporaries`` (the ONNX file's temporary name, then with
    ``--external-data`` its weights file's); a failed verification raises, so that nothing is
    placed. ``onnx_path``: the name the file will have (the graph names its weights file after
    it, so that export is staged under the final names, in a folder of its own)."""
    _phase(args, "exporting to ONNX with torch.onnx.export (dynamo)")
    opset = getattr(args, "opset", None)
    with contextlib.ExitStack() as stack:
        if args.external_data:  # every weight of 1 KiB or more in the second file
            folder = stack.enter_context(tempfile.TemporaryDirectory(
                dir=Path(temporaries[0]).parent, prefix=".hfp8-export-"))
            exported = Path(folder) / Path(onnx_path).name
            hfp8.export_onnx(qmodel, exported, example, opset=opset, external_data_bytes=0)
        else:  # one file, or a clear error past 2 GiB
            exported = temporaries[0]
            hfp8.export_onnx(qmodel, exported, example, opset=opset, external_data_bytes=None)
        if not args.no_verify:
            from hfp8.export.verify import passed

            _phase(args, "verifying the ONNX file in onnxruntime (Q/DQ pairs, layers, whole "
                   "model)")
            verification = hfp8.verify_onnx(qmodel, exported, batches, reference=reference,
                                             quiet=args.quiet)
            verification["passed"] = passed(verification)
            report["verification"] = verification
            if not verification["passed"]:
                raise VerificationFailed(verification)
        if args.external_data:
            os.replace(exported, temporaries[0])
            os.replace(external_data_path(exported), temporaries[1])


def _onnx_outputs(onnx_path: str | None, args) -> list[str]:
    """The files an export writes: the ONNX file, and with ``--external-data`` its weights."""
    if onnx_path is None:
        return []
    return [onnx_path, *([str(external_data_path(onnx_path))] if args.external_data else [])]


def _external_data_report(onnx_path: str, args) -> dict:
    return {"external_data": str(external_data_path(onnx_path))} if args.external_data else {}


def _config(args) -> hfp8.QuantConfig:
    fmt = {"e4m3": hfp8.E4M3, "e5m2": hfp8.E5M2}[args.format]
    return hfp8.QuantConfig(
        weight_format=fmt, activation_format=None if args.weights_only else fmt,
        weight_granularity="per_channel" if args.per_channel else "per_tensor",
        weight_bias_method=args.bias_method, activation_bias_method=args.bias_method,
        keep_first_and_last=not args.quantize_first_last, exclude=tuple(args.exclude),
        include=tuple(args.include), quantize_attention=not args.no_attention,
        quantize_recurrent_state=args.round_recurrent_state,
        bn_recalibration=bn_recalibration(args),
        weight_rounding=args.weight_rounding, float_budget=args.float_budget,
        budget_unit=args.budget_unit, target_sqnr_db=args.target_sqnr,
        bn_shift_stride=args.bn_shift_stride)


def _check_plot(args, inputs_: list) -> None:
    if args.plot:
        check_output(args.plot, inputs_, args.overwrite, arch=getattr(args, "arch", None))
        if not args.plot.lower().endswith(".png"):
            raise inputs.UsageError(f"--plot {args.plot}: give a .png file name")
        _pyplot_available()


def _pyplot_available() -> None:
    from hfp8.ptq.plot import _pyplot

    _pyplot()


def quantize(args) -> tuple[dict, str, int]:
    check_output(args.output, [args.model], args.overwrite, [args.calib],
                 arch=getattr(args, "arch", None))
    _check_plot(args, [args.model, args.output, args.onnx])
    for path in _onnx_outputs(args.onnx, args):  # (-o and --onnx as one file: usage.py)
        check_output(path, [args.model, args.output], args.overwrite, [args.calib],
                     arch=getattr(args, "arch", None))
    if args.arch == inputs.RECORDED:
        raise inputs.UsageError("--arch recorded: a float model file records no architecture")
    device = inputs.torch_device(args.device)
    model = load_model(args.model, args.arch, args.trust_pickle).to(device)
    samples = SampleFolder(args.calib, inputs.sample_config(args))
    upscaled = inputs.upscaled_images(samples)
    first = inputs.first_batch(samples)
    inputs.dry_run(model, first, args.calib, samples.config)
    config = _config(args)
    if args.onnx and not args.no_verify and samples.num_samples < 2:
        raise inputs.UsageError(f"--onnx: verification compares per-sample deviations and needs "
                                f"at least 2 samples; {args.calib} has {samples.num_samples} "
                                "(add samples, or pass --no-verify)")
    if args.onnx:
        inputs.check_exportable(model, first)  # seconds now, not after minutes of calibration
    with warnings.catch_warnings():  # said below as the one error line instead
        warnings.filterwarnings("ignore", message="no layer was quantized")
        qmodel = hfp8.quantize_model(model, samples, config, quiet=args.quiet)
    layers = hfp8.manifest(qmodel)
    if not any(layer["status"] == "quantized" for layer in layers["layers"]) and not any(
            site["status"] == "quantized" for site in layers["attention"]):
        raise inputs.UsageError("no layer would be quantized (" + "; ".join(
            f"{layer['name']}: {layer['reason']}" for layer in layers["layers"][:3])
            + "); see --include and --quantize-first-last")
    report_of(qmodel).metadata = {
        "architecture": args.arch, "preprocessing": inputs.preprocessing(samples.config),
        "input": inputs.input_spec(first), "calibration_folder": str(args.calib),
        "upscaled_images": upscaled}
    report = {"output": args.output, "skipped_files": len(samples.skipped)}
    model, qmodel = model.cpu(), qmodel.cpu()  # export, verification and the file: on the CPU

    def write(temporaries: list[str]) -> None:
        if args.onnx:
            batches = [b for _, b in zip(range(4), samples)]
            _export_and_verify(qmodel, temporaries[1:], args.onnx,
                               map_tensors(first, lambda t: t[:1]), batches, model, args, report)
        report["manifest"] = hfp8.save_quantized(qmodel, temporaries[0])

    if not write_outputs([args.output, *_onnx_outputs(args.onnx, args)], write, args.overwrite):
        return {}, "", 0  # another rank writes
    lines = [hfp8.format_manifest(report["manifest"]), f"wrote {args.output}"]
    if args.plot:
        from hfp8.ptq.plot import plot_manifest

        plot_manifest(report["manifest"], args.plot)
        lines.append(f"wrote {args.plot}")
    if args.onnx:
        report["onnx"] = args.onnx
        report.update(_external_data_report(args.onnx, args))
        lines += [f"wrote {path}" for path in _onnx_outputs(args.onnx, args)]
        if "verification" in report:
            lines.append(verification_text(report["verification"]))
    return report, "\n".join(lines), 0


def _random_batches(spec, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    if not isinstance(spec, dict) or "shape" not in spec or not str(spec.get("dtype", "")).startswith("float"):
        raise inputs.UsageError("the model takes non-image inputs; give samples with --verify-data")
    shape = [int(s) for s in spec["shape"]]
    if any(s < 1 or s > 8192 for s in shape) or len(shape) > 5:
        raise inputs.UsageError(f"the recorded input shape {shape} is not usable; give samples "
                                "with --verify-data")
    return [torch.randn(8, *shape, generator=generator) for _ in range(2)]


def export(args) -> tuple[dict, str, int]:
    for path in _onnx_outputs(args.output, args):
        check_output(path, [args.qmodel], args.overwrite, [args.verify_data],
                     arch=getattr(args, "arch", None))
    if file_kind(args.qmodel) != "hfp8":
        raise inputs.UsageError(f"{args.qmodel} is not an hfp8-ptq quantized model (.hfp8.pt from "
                                "'hfp8-ptq quantize'); export needs one")
    qmodel, _ = inputs.load_qmodel(args.qmodel, args.arch)
    metadata = report_of(qmodel).metadata or {}
    if args.verify_data:
        samples = SampleFolder(args.verify_data, inputs.sample_config(args, metadata.get("preprocessing")))
        batches = [b for _, b in zip(range(4), samples)]
        example = map_tensors(inputs.first_batch(samples), lambda t: t[:1])
    elif metadata.get("input") or metadata.get("input_shape"):
        spec = metadata.get("input") or {"shape": metadata["input_shape"], "dtype": "float32"}
        batches = _random_batches(spec, args.seed)
        example = batches[0][:1]
    else:
        raise inputs.UsageError(f"{args.qmodel} does not record its input shape; pass --verify-data DIR")
    inputs.dry_run(qmodel, example, args.verify_data or args.qmodel)
    report = {"output": args.output, **_external_data_report(args.output, args)}
    write_outputs(_onnx_outputs(args.output, args), lambda temporaries: _export_and_verify(
        qmodel, temporaries, args.output, example, batches, None, args, report), args.overwrite)
    lines = [f"wrote {path}" for path in _onnx_outputs(args.output, args)]
    if "verification" in report:
        lines.append(verification_text(report["verification"]))
    return report, "\n".join(lines), 0


def _plotted(args, manifest: dict | None, text: str) -> str:
    if not args.plot:
        return text
    if manifest is None:
        raise inputs.UsageError(f"{args.file} holds no hfp8-ptq manifest to plot")
    from hfp8.ptq.plot import plot_manifest

    plot_manifest(manifest, args.plot, title=f"{Path(args.file).name} (red: kept float)")
    return f"{text}\nwrote {args.plot}"


def _recorded_text(manifest: dict) -> str:
    """What the file records for later commands (shown, never run): architecture,
    preprocessing, input shape; one line each, or nothing."""
    metadata = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    lines = []
    if metadata.get("architecture"):
        lines.append(f"architecture: {metadata['architecture']} (built only with --arch recorded "
                     "or the same --arch)")
    if isinstance(metadata.get("preprocessing"), dict):
        lines.append("preprocessing: " + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(metadata["preprocessing"].items())))
    if metadata.get("input"):
        lines.append(f"input: {json.dumps(metadata['input'], sort_keys=True)}")
    return "".join(line + "\n" for line in lines)


def inspect(args) -> tuple[dict, str, int]:
    _check_plot(args, [args.file])
    kind = file_kind(args.file)
    if kind == "hfp8":
        manifest = hfp8.read_manifest(args.file)
        text = _recorded_text(manifest) + hfp8.format_manifest(manifest)
        return manifest, _plotted(args, manifest, text), 0
    if kind != "onnx":
        raise inputs.UsageError(f"{args.file} is neither an hfp8-ptq model nor an ONNX file")
    import onnx

    model = inputs.load_onnx(args.file, load_external_data=False)  # the data types suffice
    ops = [n.op_type for n in model.graph.node]
    fp8 = {t.name for t in model.graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"} & fp8
    summary = {"opset": model.opset_import[0].version, "nodes": len(ops),
               "quantize_linear": ops.count("QuantizeLinear"),
               "dequantize_linear": ops.count("DequantizeLinear"),
               "fp8_weight_tensors": len(weights),
               "inputs": [i.name for i in model.graph.input],
               "outputs": [o.name for o in model.graph.output]}
    text = (f"ONNX opset {summary['opset']}: {summary['nodes']} nodes, "
            f"{summary['quantize_linear']} QuantizeLinear, {summary['dequantize_linear']} "
            f"DequantizeLinear, {summary['fp8_weight_tensors']} FP8 weight tensors; inputs "
            f"{', '.join(summary['inputs'])}; outputs {', '.join(summary['outputs'])}")
    manifest = inputs.onnx_manifest(args.file, model)
    if manifest is not None:
        text = _plotted(args, manifest, text + "\n" + _recorded_text(manifest)
                        + hfp8.format_manifest(manifest))
        return {**summary, "manifest": manifest}, text, 0
    return summary, _plotted(args, None, text + "\n(no hfp8-ptq manifest in the metadata)"), 0


def example(args) -> tuple[dict, str, int]:
    from hfp8.examples import copy_example

    folder = copy_example(args.folder)
    steps = example_steps(folder)
    text = f"copied the Fashion-MNIST example into {folder}; next:\n  " + "\n  ".join(steps)
    return {"folder": str(folder), "next": steps}, text, 0


def example_steps(folder) -> list[str]:
    flags = "--channels 1 --mean 0 --std 1 --resize 0 --crop 0"
    arch = "--arch hfp8.examples:fashion_cnn"
    return [
        f"cd {folder}",
        f"hfp8-ptq quantize model.pt {arch} --calib calibration {flags} -o model.hfp8.pt "
        "--onnx model.onnx",
        "hfp8-ptq evaluate model.onnx --data test",
        f"hfp8-ptq evaluate model.pt {arch} --data test {flags}",
        "hfp8-ptq inspect model.hfp8.pt",
    ]
