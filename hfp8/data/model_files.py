"""Loading model files safely: state dicts by default, pickled modules only when trusted.

A file is one of:

* a **state dict** (tensors only; read with ``torch.load(weights_only=True)``, which runs no code;
  also inside a checkpoint dict under "state_dict", "model_state_dict" or "model"),
  turned into a model by an architecture factory named as ``package.module:factory`` or
  ``path/to/file.py:factory`` (a callable returning the ``nn.Module``, called without arguments);
* an **hfp8-ptq quantized model** (also tensors only, plus its manifest; see ``hfp8.load_quantized``);
* a **whole pickled nn.Module** (``torch.save(model)``): loading it executes code stored in the
  file, so it is refused unless the caller passes ``trust_pickle=True``;
* TorchScript and ``torch.export`` archives are refused: quantization needs the Python module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from hfp8._report import MANIFEST_KEY

__all__ = ["ModelFileError", "build_architecture", "load_model", "file_kind"]


class ModelFileError(ValueError):
    """A model file or architecture spec that cannot be used; the message says why."""


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def file_kind(path: str | os.PathLike) -> str:
    """"onnx", "torchscript", "torch.export", "hfp8", "state_dict", "pickle" or "unknown"."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    names = _zip_names(path)
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("serialized_exported_program.json") or n.endswith("models/model.json")
           for n in names) or path.suffix == ".pt2":
        return "torch.export"
    if not names and (path.suffix.lower() == ".onnx" or _parses_as_onnx(path)):
        return "onnx"
    if not names:
        with open(path, "rb") as stream:
            if stream.read(1) != b"\x80":  # the legacy torch.save format starts with a pickle
                return "unknown"
    try:  # a zip archive, or the legacy (non-zip) torch.save format
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "pickle"
    except Exception:  # noqa: BLE001 - a damaged archive, or not a torch file at all
        return "unknown"
    if isinstance(payload, dict) and MANIFEST_KEY in payload:
        return "hfp8"
    if _state_dict(payload) is not None:
        return "state_dict"
    return "unknown"


def _parses_as_onnx(path: Path) -> bool:
    """True for a file that protobuf reads as an ONNX model with a graph and an opset (a random
    file starting with byte 0x08 does not)."""
    if path.stat().st_size > 1 << 31:
        return False  # larger ONNX files keep their weights outside and carry the suffix
    import onnx

    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return False
    return bool(model.opset_import) and model.HasField("graph") and bool(model.graph.node)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def _state_dict(payload) -> dict | None:
    """The tensors of a state dict, also inside a training checkpoint's usual keys."""
    if _is_tensor_dict(payload):
        return payload
    if isinstance(payload, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_tensor_dict(payload.get(key)):
                return payload[key]
    return None


def _import_from_here(module_name: str):
    """``importlib.import_module`` with the current folder first on the import path, as
    ``python -m`` has it (a console script's path starts at its own folder instead), so that
    ``--arch mymodels:Net`` finds ``./mymodels.py``. The path is restored afterwards."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def build_architecture(spec: str) -> nn.Module:
    """Call the factory named by ``spec`` (``package.module:factory`` or ``file.py:factory``;
    a module is looked up from the current folder first, as ``python -m`` does)."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ModelFileError(f"--arch {spec!r} must look like package.module:factory or "
                             "path/to/file.py:factory")
    try:
        if module_name.endswith(".py"):
            location = Path(module_name)
            if not location.is_file():
                raise ModelFileError(f"--arch {spec!r}: no such file {location}")
            module_spec = importlib.util.spec_from_file_location(location.stem, location)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = _import_from_here(module_name)
    except ModelFileError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - user code can raise anything, even SystemExit
        raise ModelFileError(f"--arch {spec!r}: cannot import {module_name} "
                             f"({type(error).__name__}: {error})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelFileError(f"--arch {spec!r}: {module_name} has no callable {attribute!r}")
    try:
        model = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - even SystemExit: it would end us silently
        raise ModelFileError(f"--arch {spec!r}: calling {attribute}() failed "
                             f"({type(error).__name__}: {error})") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"--arch {spec!r}: {attribute}() returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def load_model(path: str | os.PathLike, arch: str | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """The float model stored at ``path``, in eval mode (see the module docstring)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "state_dict":
        if arch is None:
            raise ModelFileError(f"{path} holds only weights (a state dict); name the architecture "
                                 "that builds the model with --arch package.module:factory")
        model = build_architecture(arch)
        state = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # same names, other shapes
            lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            raise ModelFileError(f"{path} does not fit --arch {arch}: "
                                 f"{lines[0] if lines else str(error).splitlines()[0]}") from None
        if result.missing_keys or result.unexpected_keys:
            detail = []
            if result.missing_keys:
                detail.append(f"missing {', '.join(result.missing_keys[:3])}")
            if result.unexpected_keys:
                detail.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
            raise ModelFileError(f"{path} does not fit --arch {arch}: {'; '.join(detail)}")
        return model.eval()
    if kind == "pickle":
        if not trust_pickle:
            raise ModelFileError(
                f"{path} holds pickled Python objects (a whole nn.Module): loading it would run "
                "code stored in the file. Save model.state_dict() and pass --arch, or pass "
                "--trust-pickle if you trust the file")
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - unpickling user files can raise anything
            raise ModelFileError(f"{path}: unpickling failed ({type(error).__name__}: {error})") from None
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
        return model.eval()
    if kind == "torchscript":
        raise ModelFileError(f"{path} is TorchScript; quantization needs the Python module: save "
                             "model.state_dict() from the original model and pass --arch")
    if kind == "torch.export":
        raise ModelFileError(f"{path} is a torch.export archive, which is not supported; save "
                             "model.state_dict() from the original model and pass --arch")
    if kind == "hfp8":
        raise ModelFileError(f"{path} is already an hfp8-ptq quantized model")
    if kind == "onnx":
        raise ModelFileError(f"{path} is an ONNX file; this command needs a PyTorch model")
    raise ModelFileError(f"{path} is not a PyTorch model file (neither a state dict nor a saved "
                         "module)")
