"""Saving and loading quantized models without executing pickled code.

One file, written atomically and read with ``torch.load(weights_only=True)``: a dict holding the
state dict (tensors only) and the manifest as a JSON string. Loading re-applies the quantization
(:mod:`hfp8.ptq.quantizers`) to a float instance of the same architecture as the manifest
describes it, loads the state dict strictly and checks that every quantized weight lies on its
format's grid. The manifest is data: every field is checked before use.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import zipfile

import torch
from torch import nn

from hfp8._files import atomic_write
from hfp8._report import MANIFEST_KEY, REPORT_ATTRIBUTE
from hfp8.numerics.fake_quant import quantize_weight
from hfp8.ptq.config import QuantConfig, format_from_dict
from hfp8.ptq.operand_sites import OperandSite, attach_sites
from hfp8.ptq.quantizers import (
    attach_layer,
    is_quantizable,
    weight_bias_buffer,
    weight_names,
)
from hfp8.ptq.report import QuantReport, manifest

__all__ = ["save_quantized", "load_quantized", "read_manifest", "QuantizedFileError",
           "MANIFEST_VERSIONS"]

MANIFEST_VERSIONS = (1, 2)  # 1: before attention sites; its layers read the same way


class QuantizedFileError(ValueError):
    """The file is not a readable hfp8-ptq quantized model."""


def save_quantized(qmodel: nn.Module, path: str | os.PathLike, overwrite: bool = True) -> dict:
    """Write ``qmodel`` (from :func:`hfp8.quantize_model`) to ``path``; returns its manifest.

    The file is serialized in memory first and written with plain file I/O, so a full disk is an
    ``OSError`` (ENOSPC) that names the file, and the write is atomic (see ``hfp8._files``).
    """
    data = manifest(qmodel)
    payload = {MANIFEST_KEY: json.dumps(data, sort_keys=True), "state_dict": qmodel.state_dict()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(buffer.getbuffer())

    atomic_write(path, write, overwrite=overwrite)
    return data


def _read(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise QuantizedFileError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizedFileError(f"{path}: not a readable hfp8-ptq model file ({first_line})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get(MANIFEST_KEY), str) \
            or not isinstance(payload.get("state_dict"), dict):
        raise QuantizedFileError(f"{path}: not an hfp8-ptq quantized model (no manifest inside)")
    return payload


def _require(condition: bool, path, what: str) -> None:
    if not condition:
        raise QuantizedFileError(f"{path}: damaged manifest: {what}")


def _format(value, path, where: str):
    try:
        return format_from_dict(value)
    except (TypeError, ValueError) as error:
        raise QuantizedFileError(f"{path}: damaged manifest: {where} format: {error}") from None


def check_manifest(data, path="manifest") -> dict:
    """``data`` if it has the shape :func:`manifest` writes, else a :class:`QuantizedFileError`
    naming the first problem."""
    _require(isinstance(data, dict), path, "not a JSON object")
    version = data.get("manifest_version")
    if version not in MANIFEST_VERSIONS:
        raise QuantizedFileError(f"{path}: manifest version {version!r} is not one of "
                                 f"{MANIFEST_VERSIONS}; upgrade hfp8-ptq")
    _require(isinstance(data.get("config"), dict), path, "'config' is not an object")
    try:
        QuantConfig.from_dict(data["config"])
    except (TypeError, ValueError) as error:
        raise QuantizedFileError(f"{path}: damaged manifest: config: {error}") from None
    _require(isinstance(data.get("layers"), list), path, "'layers' is not a list")
    for index, layer in enumerate(data["layers"]):
        _require(isinstance(layer, dict) and isinstance(layer.get("name"), str)
                 and layer.get("status") in ("quantized", "float"), path,
                 f"layer {index} needs a name and a status")
        if layer["status"] == "quantized":
            _format(layer.get("weight_format"), path, f"layer {layer['name']!r} weight")
            _format(layer.get("input_format"), path, f"layer {layer['name']!r} input")
            bias = layer.get("weight_exponent_bias")
            _require(bias is None or _is_bias(bias) or (
                isinstance(bias, dict) and bias and all(_is_bias(b) for b in bias.values())),
                path, f"layer {layer['name']!r} weight bias")
    sites = data.get("attention") or []
    _require(isinstance(sites, list), path, "'attention' is not a list")
    for index, site in enumerate(sites):
        _require(isinstance(site, dict) and isinstance(site.get("name"), str)
                 and site.get("kind") in ("matmul", "sdpa", "recurrent")
                 and site.get("status") in ("quantized", "float"), path,
                 f"attention site {index} needs a name, kind and status")
        if site["status"] == "quantized":
            _require(site.get("format") is not None, path, f"site {site['name']!r} format")
            _format(site["format"], path, f"site {site['name']!r}")
    sensitivity = data.get("sensitivity") or []
    _require(isinstance(sensitivity, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in sensitivity), path,
        "'sensitivity' is not a list of named entries")
    metadata = data.get("metadata")
    _require(metadata is None or isinstance(metadata, dict), path, "'metadata' is not an object")
    return data


def _is_bias(bias) -> bool:
    """One weight matrix's bias in a manifest: an int, or a list of ints (per row)."""
    return isinstance(bias, int) or (isinstance(bias, list) and all(isinstance(b, int) for b in bias))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest stored in a file written by :func:`save_quantized`."""
    try:
        data = json.loads(_read(path)[MANIFEST_KEY])
    except json.JSONDecodeError as error:
        raise QuantizedFileError(f"{path}: damaged manifest: {error}") from None
    return check_manifest(data, path)


def _apply(qmodel: nn.Module, data: dict, path) -> dict:
    """Re-applies the layers and sites of manifest ``data`` to ``qmodel``; returns kept-float."""
    kept_float = {}
    for layer in data["layers"]:
        name = layer["name"]
        try:
            module = qmodel.get_submodule(name)
        except AttributeError:
            raise QuantizedFileError(f"{path}: the model has no layer {name!r}; is it the same "
                                     "architecture the file was quantized from?") from None
        if layer["status"] == "float":
            kept_float[name] = layer.get("reason")
            continue
        if not is_quantizable(module):
            raise QuantizedFileError(f"{path}: layer {name!r} is a {type(module).__name__} in this "
                                     f"model but was a {layer.get('type')} when quantized")
        bias = layer.get("weight_exponent_bias")
        per_channel = isinstance(bias, list) or (
            isinstance(bias, dict) and any(isinstance(b, list) for b in bias.values()))
        attach_layer(module, name, format_from_dict(layer["weight_format"]),
                     format_from_dict(layer["input_format"]), per_channel=per_channel)
    owners: dict[str, list[OperandSite]] = {}
    for site in data.get("attention") or []:
        if site["status"] != "quantized":
            continue
        owner, _, local = site["name"].rpartition(".")
        owners.setdefault(owner, []).append(
            OperandSite(site["name"], local, site["kind"], format_from_dict(site["format"])))
    for owner, sites in owners.items():
        try:
            attach_sites(qmodel.get_submodule(owner), sites)
        except AttributeError:
            raise QuantizedFileError(f"{path}: the model has no module {owner!r}; is it the same "
                                     "architecture the file was quantized from?") from None
    return kept_float


def load_quantized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``model``, a float instance of the same
    architecture (its weights are replaced; ``model`` itself is not modified)."""
    payload = _read(path)
    try:
        data = check_manifest(json.loads(payload[MANIFEST_KEY]), path)
    except json.JSONDecodeError as error:
        raise QuantizedFileError(f"{path}: damaged manifest: {error}") from None
    qmodel = copy.deepcopy(model).eval()
    kept_float = _apply(qmodel, data, path)
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError) as error:
        detail = str(error).strip().splitlines()
        raise QuantizedFileError(f"{path}: weights do not fit this model: "
                                 f"{' '.join(line.strip() for line in detail[:3])}") from None
    for layer in data["layers"]:
        if layer["status"] != "quantized" or layer["weight_format"] is None:
            continue
        module = qmodel.get_submodule(layer["name"])
        fmt = format_from_dict(layer["weight_format"])
        for weight_name in weight_names(module):
            weight = module.get_parameter(weight_name).detach()
            bias = getattr(module, weight_bias_buffer(weight_name))
            if not torch.equal(quantize_weight(weight, fmt, bias), weight):
                raise QuantizedFileError(f"{path}: weights of {layer['name']!r} are not on the "
                                         f"{fmt.name} grid; the file is damaged")
    setattr(qmodel, REPORT_ATTRIBUTE, QuantReport.from_manifest(data, kept_float))
    return qmodel
