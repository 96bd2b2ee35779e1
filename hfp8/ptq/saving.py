"""Saving and loading quantized models without executing pickled code.

One file, written atomically and read with ``torch.load(weights_only=True)``: a dict holding the
state dict (tensors only) and the manifest as a JSON string. Loading rebuilds the quantized
layers on a float instance of the same architecture from the manifest, then loads the state
dict strictly and checks that every quantized weight lies on its format's grid.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import zipfile

import torch
from torch import nn

from hfp8._files import atomic_write
from hfp8.ptq.config import format_from_dict
from hfp8.ptq.layers import QUANTIZED_TYPES, quantize_layer, quantize_weight
from hfp8.ptq.manifest import MANIFEST_VERSION, manifest
from hfp8.ptq.transform import REPORT_ATTRIBUTE, _set_module

__all__ = ["save_quantized", "load_quantized", "read_manifest", "QuantizedFileError"]

_KEY = "hfp8_ptq_manifest"


class QuantizedFileError(ValueError):
    """The file is not a readable hfp8-ptq quantized model."""


def save_quantized(qmodel: nn.Module, path: str | os.PathLike) -> dict:
    """Write ``qmodel`` (from :func:`hfp8.quantize_model`) to ``path``; returns its manifest."""
    data = manifest(qmodel)
    payload = {_KEY: json.dumps(data, sort_keys=True), "state_dict": qmodel.state_dict()}
    atomic_write(path, lambda temporary: torch.save(payload, temporary))
    return data


def _read(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise QuantizedFileError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizedFileError(f"{path}: not a readable hfp8-ptq model file ({first_line})") from None
    if not isinstance(payload, dict) or _KEY not in payload or "state_dict" not in payload:
        raise QuantizedFileError(f"{path}: not an hfp8-ptq quantized model (no manifest inside)")
    return payload


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest stored in a file written by :func:`save_quantized`."""
    data = json.loads(_read(path)[_KEY])
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise QuantizedFileError(f"{path}: manifest version {data.get('manifest_version')} is not "
                                 f"{MANIFEST_VERSION}; upgrade hfp8-ptq")
    return data


def load_quantized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``model``, a float instance of the same
    architecture (its weights are replaced; ``model`` itself is not modified)."""
    payload = _read(path)
    data = json.loads(payload[_KEY])
    state_dict = payload["state_dict"]
    qmodel = copy.deepcopy(model).eval()
    kept_float = {}
    for layer in data["layers"]:
        name = layer["name"]
        try:
            module = qmodel.get_submodule(name)
        except AttributeError:
            raise QuantizedFileError(f"{path}: the model has no layer {name!r}; is it the same "
                                     "architecture the file was quantized from?") from None
        if layer["status"] == "float":
            kept_float[name] = layer["reason"]
            continue
        if type(module) not in QUANTIZED_TYPES:
            raise QuantizedFileError(f"{path}: layer {name!r} is a {type(module).__name__} in this "
                                     f"model but was a {layer['type']} when quantized")
        weight_format = format_from_dict(layer["weight_format"])
        bias = layer["weight_exponent_bias"]
        bias = torch.tensor(bias) if isinstance(bias, list) else (bias or 0)
        _set_module(qmodel, name, quantize_layer(module, weight_format, bias,
                                                 format_from_dict(layer["input_format"])))
    try:
        qmodel.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()
        raise QuantizedFileError(f"{path}: weights do not fit this model: "
                                 f"{' '.join(line.strip() for line in detail[:3])}") from None
    for layer in data["layers"]:
        if layer["status"] != "quantized" or layer["weight_format"] is None:
            continue
        module = qmodel.get_submodule(layer["name"])
        fmt = format_from_dict(layer["weight_format"])
        if not torch.equal(quantize_weight(module.weight.detach(), fmt,
                                           module.weight_exponent_bias), module.weight.detach()):
            raise QuantizedFileError(f"{path}: weights of {layer['name']!r} are not on the "
                                     f"{fmt.name} grid; the file is damaged")
    setattr(qmodel, REPORT_ATTRIBUTE, {
        "config": data["config"],
        "kept_float": kept_float,
        "observers": {layer["name"]: layer.get("observer") for layer in data["layers"]
                      if layer["status"] == "quantized"},
        "batchnorm": data["batchnorm"],
        "calibration_samples": data["calibration_samples"],
        "metadata": data.get("metadata"),
    })
    return qmodel
