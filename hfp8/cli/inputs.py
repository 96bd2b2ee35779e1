"""What the user hands the command line, read and checked: sample folders and model files
(float, quantized, ONNX). Every problem becomes a one-line :class:`UsageError`.

A file is data, never code: the architecture a quantized or ONNX file records is shown, and is
built (its code imported and run) only when the user names it with ``--arch`` (``--arch
recorded`` accepts the recorded one). Recorded preprocessing goes through the same limits as
flags (:class:`hfp8.data.SampleConfig`).
"""

from __future__ import annotations

import json
import warnings

import torch

import hfp8
from hfp8._report import MANIFEST_KEY
from hfp8.cli.usage import UsageError
from hfp8.data.model_files import build_architecture, file_kind, load_model
from hfp8.data.model_io import (
    batch_size,
    call_model,
    leaf_hooks,
    map_tensors,
    output_leaves,
    slice_batch,
)
from hfp8.data.sample_config import SampleConfig
from hfp8.data.samples import SampleError, SampleFolder
from hfp8.ptq.report import report_of
from hfp8.ptq.saving import check_manifest

RECORDED = "recorded"  # --arch recorded: build the architecture the file names


def one_line(error: BaseException) -> str:
    """The whole message on one line (some runtimes put the useful part on a later line)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def sample_config(args, defaults: dict | None = None, labels: bool = False) -> SampleConfig:
    values = dict(defaults or {})
    unknown = set(values) - {"resize", "crop", "mean", "std", "channels"}
    if unknown:
        raise UsageError(f"recorded preprocessing has unknown fields: {', '.join(sorted(unknown))}")
    for name in ("resize", "crop", "mean", "std", "channels"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return SampleConfig(batch_size=args.batch_size, num_samples=args.num_samples, seed=args.seed,
                        workers=args.workers, strict=args.strict, labels=labels, **values)


def preprocessing(config: SampleConfig) -> dict:
    return {"resize": config.resize, "crop": config.crop, "mean": list(config.mean),
            "std": list(config.std), "channels": config.channels}


def upscaled_images(samples: SampleFolder, limit: int = 64) -> dict | None:
    """How many of the folder's first ``limit`` images have a short side below ``--resize``
    (read from their headers); warns when most do: they are enlarged, which is seldom meant
    (a 64 x 64 image resized to 256 and cropped to 224 by the ImageNet defaults). ``None``
    without resizing or images."""
    from PIL import Image

    from hfp8.data.sample_files import IMAGE_EXTENSIONS

    resize = samples.config.resize
    images = [p for p in samples.files if p.suffix.lower() in IMAGE_EXTENSIONS][:limit]
    if not resize or not images:
        return None
    shorts = []
    for path in images:
        try:
            with Image.open(path) as image:
                shorts.append(min(image.size))
        except Exception:  # noqa: BLE001 - unreadable files are reported when read
            continue
    small = [s for s in shorts if s < resize]
    if shorts and len(small) * 2 > len(shorts):
        median = sorted(shorts)[len(shorts) // 2]
        warnings.warn(f"{len(small)} of the first {len(shorts)} images in {samples.path} are "
                      f"smaller than --resize {resize} (median short side {median} px) and are "
                      f"enlarged; if the model takes smaller images, pass --resize and --crop "
                      "to match (0 skips a step)", stacklevel=2)
    return {"checked": len(shorts), "smaller_than_resize": len(small)}


def first_batch(samples: SampleFolder):
    """The inputs of the folder's first batch (without labels)."""
    for batch in samples:
        return batch[0] if samples.config.labels else batch
    raise SampleError(f"no readable samples in {samples.path}")


def input_spec(batch) -> dict:
    """Shape and dtype of one sample of each input, for the manifest."""
    def spec(tensor):
        return {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).replace("torch.", "")}
    return map_tensors(batch, spec) if isinstance(batch, dict) else spec(batch)


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count / 1024:.0f} KiB"


def _available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), or None."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _largest_activation(model, batch) -> int:
    """Bytes of the largest tensor a leaf module returns on ``batch`` (0 for a model that is
    not a torch module, such as an onnxruntime runner)."""
    largest = [0]
    if not isinstance(model, torch.nn.Module):
        return 0

    def hook(module, args, output):
        for _, tensor in output_leaves(output):
            largest[0] = max(largest[0], tensor.numel() * tensor.element_size())

    with leaf_hooks(model, hook), torch.no_grad():
        call_model(model, batch)
    return largest[0]


def dry_run(model, batch, folder, config: SampleConfig | None = None) -> None:
    """One forward on one sample, then on the first batch, so that shape mistakes become one
    clear line, and a batch whose activations cannot fit in memory is refused before it is
    tried: its largest layer output alone (measured on one sample, times the batch size) is a
    lower bound of what a forward needs."""
    try:
        size = batch_size(batch)
        try:  # an estimate only: a model that needs batches of 2 or more is tried as it is
            per_sample = _largest_activation(model, slice_batch(batch, 1))
        except Exception:  # noqa: BLE001 - the full batch below says what is wrong, if anything
            per_sample = 0
        available = _available_memory()
        if available is not None and per_sample * size > available:
            hint = "" if config is None else (f" at --resize {config.resize or 0} --crop "
                                              f"{config.crop or 0}")
            raise UsageError(f"a batch of {size} samples from {folder}{hint} needs at least "
                             f"{_size(per_sample * size)} for one layer's output "
                             f"({_size(per_sample)} per sample), more than the "
                             f"{_size(available)} available; lower --batch-size or the image "
                             "size")
        with torch.no_grad():
            call_model(model, batch)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad shapes
        shape = tuple(batch.shape[1:]) if torch.is_tensor(batch) else "given"
        hint = "" if config is None else (
            f" (preprocessing: --channels {config.channels}, --resize {config.resize or 0}, "
            f"--crop {config.crop or 0})")
        raise UsageError(f"the model rejects samples from {folder} of shape {shape}{hint}: "
                         f"{one_line(error)}") from None


def check_exportable(model, batch) -> None:
    """Trial capture of the float model with torch.export (seconds), before calibration
    (minutes): quantization adds only our own exportable operators."""
    from hfp8.data.model_io import split_batch
    from hfp8.export.onnx_export import capture

    args, kwargs, _ = split_batch(model, map_tensors(batch, lambda t: t[:1]))
    try:
        capture(model, args, kwargs)
    except hfp8.ExportError as error:
        raise UsageError(f"--onnx: this model cannot be exported: {one_line(error)} "
                         "(run without --onnx to quantize only)") from None


def _architecture(path: str, arch: str | None, recorded: str | None) -> str:
    if arch == RECORDED:
        if not recorded:
            raise UsageError(f"--arch {RECORDED}: {path} records no architecture")
        return recorded
    if arch:
        return arch
    if recorded:
        raise UsageError(f"{path} records architecture {recorded!r}; building it imports and "
                         f"runs that code, so name it: --arch {recorded} (or --arch {RECORDED})")
    raise UsageError(f"{path} does not record its architecture; pass --arch MODULE:FACTORY")


def torch_device(choice: str) -> torch.device:
    """``--device``: auto is cuda when torch sees a GPU, else cpu; cuda without one is an
    input error (not a crash at the first tensor moved)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() "
                         "is False); use --device cpu or auto")
    return torch.device(choice)


def load_qmodel(path: str, arch: str | None):
    manifest = hfp8.read_manifest(path)
    spec = _architecture(path, arch, (manifest.get("metadata") or {}).get("architecture"))
    return hfp8.load_quantized(path, build_architecture(spec)), spec


def load_onnx(path: str, **options):
    """onnx.load, with a damaged or empty file reported as an input error naming it."""
    import onnx

    try:
        model = onnx.load(path, **options)
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError and others
        raise UsageError(f"{path} is not a readable ONNX file ({type(error).__name__}: "
                         f"{one_line(error)})") from None
    if not model.opset_import or not model.HasField("graph") or not model.graph.node:
        raise UsageError(f"{path} is not an ONNX model (no graph or opset inside)")
    return model


def onnx_manifest(path: str, model) -> dict | None:
    props = {p.key: p.value for p in model.metadata_props}
    if MANIFEST_KEY not in props:
        return None
    try:
        return check_manifest(json.loads(props[MANIFEST_KEY]), path)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: damaged manifest in the metadata: {error}") from None


def onnx_runner(path: str):
    """A batch -> outputs callable on a default onnxruntime session."""
    from hfp8.export import onnx_replay

    try:
        session = onnx_replay.session(path, memory_arena=True)  # many batches: keep it
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        raise UsageError(f"onnxruntime cannot load {path}: {one_line(error)}") from None

    def run(batch):
        inputs = batch if isinstance(batch, dict) else {session.get_inputs()[0].name: batch}
        feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs() if i.name in inputs}
        if len(feed) != len(session.get_inputs()):
            raise UsageError(f"{path} needs inputs {[i.name for i in session.get_inputs()]}")
        try:
            outputs = session.run(None, feed)
        except Exception as error:  # noqa: BLE001
            raise UsageError(f"onnxruntime cannot run {path} on these samples: "
                             f"{one_line(error)}") from None
        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)
    return run


def runner(path: str, arch: str | None, trust_pickle: bool) -> tuple[object, dict | None, str | None]:
    """A model for any model file, with the preprocessing and architecture it records (quantized
    and exported files do; a float model file does not)."""
    kind = file_kind(path)
    if kind == "onnx":
        manifest = onnx_manifest(path, load_onnx(path, load_external_data=False)) or {}
        recorded = manifest.get("metadata") or {}
        return onnx_runner(path), recorded.get("preprocessing"), recorded.get("architecture")
    if kind == "hfp8":
        qmodel, spec = load_qmodel(path, arch)
        recorded = report_of(qmodel).metadata or {}
        return qmodel, recorded.get("preprocessing"), spec
    if arch == RECORDED:
        raise UsageError(f"--arch {RECORDED}: {path} is a float model file, which records no "
                         "architecture")
    return load_model(path, arch, trust_pickle), None, arch


def reference_architecture(arch: str | None, recorded: str | None, path: str) -> str | None:
    """The architecture for a float ``--reference`` state dict: ``--arch``, or with ``--arch
    recorded`` the one that ``path`` (the model under test) records."""
    return _architecture(path, arch, recorded) if arch == RECORDED else arch
