"""What the user hands the command line, read and checked: output paths, sample folders,
model files (float, quantized, ONNX). Every problem becomes a one-line :class:`UsageError`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import hfp8
from hfp8.calibration.samples import SampleConfig, SampleError, SampleFolder
from hfp8.model_files import build_architecture, file_kind, load_model
from hfp8.ptq.export import MANIFEST_KEY
from hfp8.ptq.transform import REPORT_ATTRIBUTE


class UsageError(ValueError):
    """A mistake in the command line itself."""


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_output(path: str, inputs: list[str | None], overwrite: bool) -> Path:
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


def sample_config(args, defaults: dict | None = None, labels: bool = False) -> SampleConfig:
    values = dict(defaults or {})
    for name in ("resize", "crop"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name) or None  # 0 means "skip this step"
    for name in ("mean", "std", "channels"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return SampleConfig(batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                        workers=args.workers, strict=args.strict, labels=labels, **values)


def preprocessing(config: SampleConfig) -> dict:
    return {"resize": config.resize, "crop": config.crop, "mean": list(config.mean),
            "std": list(config.std), "channels": config.channels}


def first_batch(samples: SampleFolder):
    for batch in samples:
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    raise SampleError(f"no readable samples in {samples.path}")


def dry_run(model, x: torch.Tensor, folder, config: SampleConfig | None = None) -> None:
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


def check_exportable(model, example: torch.Tensor) -> None:
    """Trial ONNX export of the float model: an unsupported layer is reported in a second, not
    after calibration (quantization swaps only Conv/Linear layers, which export supports)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            hfp8.export_onnx(model, Path(folder) / "trial.onnx", example)
        except hfp8.ExportError as error:
            raise UsageError(f"--onnx: this model cannot be exported: {one_line(error)} "
                             "(run without --onnx to quantize only)") from None
        except Exception:  # noqa: BLE001 - e.g. a float graph over protobuf's 2 GiB whose FP8
            pass  # export would fit: no verdict here; the real export reports its own errors


def metadata(path: str) -> dict:
    manifest = hfp8.read_manifest(path)
    return manifest.get("metadata") or {}


def load_qmodel(path: str, arch: str | None):
    arch = arch or metadata(path).get("architecture")
    if arch is None:
        raise UsageError(f"{path} does not record its architecture; pass --arch MODULE:FACTORY")
    return hfp8.load_quantized(path, build_architecture(arch)), arch


def load_onnx(path: str, **options):
    """onnx.load, with a damaged file reported as an input error."""
    import onnx

    try:
        return onnx.load(path, **options)
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError and others
        raise UsageError(f"{path} is not a readable ONNX file ({type(error).__name__}: "
                         f"{one_line(error)})") from None


def onnx_runner(path: str):
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        raise UsageError(f"onnxruntime cannot load {path}: {one_line(error)}") from None
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def runner(path: str, arch: str | None, trust_pickle: bool) -> tuple[object, dict | None, str | None]:
    """A batch -> logits callable for any model file, with the preprocessing and architecture
    it records (quantized and exported files do; a float model file does not)."""
    kind = file_kind(path)
    if kind == "onnx":
        props = {p.key: p.value for p in load_onnx(path, load_external_data=False).metadata_props}
        manifest = json.loads(props[MANIFEST_KEY]) if MANIFEST_KEY in props else {}
        recorded = manifest.get("metadata") or {}
        return onnx_runner(path), recorded.get("preprocessing"), recorded.get("architecture")
    if kind == "hfp8":
        qmodel, arch = load_qmodel(path, arch)
        recorded = getattr(qmodel, REPORT_ATTRIBUTE).get("metadata") or {}  # loaded with it
        return qmodel, recorded.get("preprocessing"), arch
    return load_model(path, arch, trust_pickle), None, arch
