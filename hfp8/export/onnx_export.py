"""export_onnx: a quantized model as a standard FP8 QuantizeLinear/DequantizeLinear ONNX graph.

The graph comes from torch's own exporter (``torch.onnx.export(..., dynamo=True)``: torch.export
plus onnxscript), so every operator torch can export is covered. The FP8 steps are the custom
operators of :mod:`hfp8.export.onnx_ops`, translated to standard ONNX:

    x -> [Max/Min +-240 s, "ieee" E4M3 only] -> QuantizeLinear(s, FP8 0) -> DequantizeLinear --+
    weight codes (FLOAT8 initializer) -> DequantizeLinear(s_w, per tensor or per axis 0) ------+-> the layer's own ops

with ``s = 2^(b_default - b)``: the same numbers as the PyTorch model, bit for bit (see
:func:`hfp8.verify_onnx`). For export each quantized weight is stored as its FP8 codes (a
``torch.float8_*`` buffer) read through a parametrization that calls ``hfp8::dequantize_weight``
(:mod:`hfp8.export.deployment_form`); the layer's own forward then reads that weight, whatever
its code does with it. The graph is
then named and tagged (:mod:`hfp8.export.onnx_graph`), written in the form onnxruntime's QDQ
transforms cannot mis-compute (:mod:`hfp8.export.onnx_fp8_form`), checked with ``onnx.checker`` (full
check) and written atomically; the same model gives the same bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from hfp8._files import atomic_write, atomic_write_all, external_data_path
from hfp8.data.model_io import BatchError, map_tensors, split_batch
from hfp8.export import ExportError, onnx_fp8_form, onnx_graph
from hfp8.export.deployment_form import deployment_form
from hfp8.export.onnx_ops import onnx_translation_table
from hfp8.ptq.operand_sites import owners_closed
from hfp8.ptq.quantizers import layer_state, quantized_layers

__all__ = ["export_onnx", "ExportError", "DEFAULT_OPSET", "MAX_OPSET", "MANIFEST_KEY",
           "capture", "external_data_path", "EXTERNAL_DATA_BYTES"]

DEFAULT_OPSET = 19  # the first opset with FLOAT8 QuantizeLinear/DequantizeLinear
MAX_OPSET = 21
# protobuf cannot serialize a message of 2 GiB; leave room for the graph beside the weights
EXTERNAL_DATA_BYTES = (1 << 31) - (1 << 26)
from hfp8._report import MANIFEST_KEY  # noqa: E402  (re-exported)


def _dynamic_shapes(args, kwargs, dynamic_batch: bool):
    """Batch (dim 0) dynamic for every input; integer inputs (token ids, masks) dynamic in
    every dim. ``Dim.AUTO``: a dim the model fixes stays static instead of failing."""
    auto = torch.export.Dim.AUTO

    def spec(tensor):
        if not dynamic_batch or tensor.dim() == 0:
            return None
        if tensor.is_floating_point():
            return {0: auto}
        return {dim: auto for dim in range(tensor.dim())}

    return map_tensors(args, spec), map_tensors(kwargs, spec)


def _holds_packed(value) -> bool:
    if isinstance(value, PackedSequence):
        return True
    items = value.values() if isinstance(value, Mapping) else value \
        if isinstance(value, (tuple, list)) else ()
    return any(_holds_packed(item) for item in items)


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter prints progress and, on failure, whole graphs; our errors say it in a
    line (the cause is kept in the exception chain for --debug)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                               "torch._dynamo", "torch.fx.experimental")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool = True):
    """``torch.export.export`` (non-strict) of ``model`` on one call, with the batch dynamic;
    a model it cannot capture is an :class:`ExportError` naming torch's reason."""
    dynamic_args, dynamic_kwargs = _dynamic_shapes(args, kwargs, dynamic_batch)
    dynamic = dynamic_args
    if kwargs:  # then dynamic_shapes is keyed by the forward's argument names
        names = list(inspect.signature(model.forward).parameters)
        dynamic = {**{names[i]: spec for i, spec in enumerate(dynamic_args)}, **dynamic_kwargs}
    try:
        with _quiet_exporter():
            return torch.export.export(model, tuple(args), kwargs or None, dynamic_shapes=dynamic,
                                       strict=False)
    except Exception as error:  # noqa: BLE001 - torch.export raises many types
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ExportError(f"torch.export cannot capture this model: {type(cause).__name__}: "
                          f"{_first_line(cause)}") from error


def _to_onnx(program, opset: int) -> onnx.ModelProto:
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                custom_translation_table=onnx_translation_table(), report=False)
    except Exception as error:  # noqa: BLE001 - the translation raises many types
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ExportError(f"torch's ONNX exporter cannot translate this model: "
                          f"{type(cause).__name__}: {_first_line(cause)}") from error
    return onnx_program.model_proto


def _check_scales(model: onnx.ModelProto) -> None:
    """Every scale of our Q/DQ nodes must be a constant in the file (verification and FP8
    back-ends read it); torch's exporter folds the ``2^(b0 - b)`` computation into one."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for site, roles in onnx_graph.site_nodes(model).items():
        for role, node in roles.items():
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] not in constants:
                raise ExportError(f"internal: the scale of {site} ({role}) is not a constant")


@owners_closed()
def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_input,
                opset: int | None = None, dynamic_batch: bool = True,
                external_data_bytes: int | None = EXTERNAL_DATA_BYTES) -> onnx.ModelProto:
    """Write ``qmodel`` (from :func:`hfp8.quantize_model`, or any float model) as ONNX to ``path``.

    ``example_input``: one batch as the model takes it (a tensor, a tuple of inputs, a mapping
    of keyword inputs; see :mod:`hfp8.data.model_io`), used to capture the graph. ``opset``: 19
    (default) to 21. ``dynamic_batch``: the first dimension of every input (and every dimension
    of integer inputs such as token ids) stays free where the model allows it. The file is
    checked with ``onnx.checker.check_model(full_check=True)`` and written atomically; the same
    model always gives the same bytes. A model of ``external_data_bytes`` or more (default just
    under protobuf's 2 GiB limit) keeps its weights in a second file beside ``path``
    (:func:`external_data_path`, referred to by name, so keep the two together); onnxruntime
    and ``onnx.load`` read it from there; ``None`` refuses such a model (an
    :class:`ExportError`) instead. Returns the ONNX model.
    """
    from hfp8._version import __version__
    from hfp8.ptq.report import manifest

    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in {DEFAULT_OPSET}..{MAX_OPSET} (FP8 Q/DQ needs 19+), got {opset}")
    if _holds_packed(example_input):
        raise ExportError("the example input holds a PackedSequence, which torch.export cannot "
                          "capture; export with a padded tensor example (the exported LSTM/GRU "
                          "runs padded batches)")
    model = deployment_form(qmodel)
    example = map_tensors(example_input, lambda t: t.detach().cpu())
    leaves = []
    map_tensors(example, leaves.append)
    if dynamic_batch and leaves and all(t.dim() and t.shape[0] == 1 for t in leaves):
        # torch.export fixes every dimension of size 1: capture with a batch of two copies
        example = map_tensors(example, lambda t: torch.cat([t, t]))
    try:
        args, kwargs, left = split_batch(model, example)
    except BatchError as error:
        raise ExportError(f"example input: {error}") from None
    if left:
        raise ExportError("the example input carries items the model's forward does not take "
                          "(targets?); give the inputs only")
    onnx_model = _to_onnx(capture(model, args, kwargs, dynamic_batch), opset)
    _check_scales(onnx_model)
    inputs = [name for name, layer in quantized_layers(model).items()
              if layer_state(layer).input_format is not None]
    missing = onnx_graph.tag_merged_pairs(onnx_model, inputs)
    if missing:
        raise ExportError(f"internal: no QuantizeLinear/DequantizeLinear found for the input of "
                          f"{missing[0]!r} in the exported graph")
    onnx_graph.name_quantization_nodes(onnx_model)
    onnx_fp8_form.clamps_as_max_min(onnx_model)
    onnx_fp8_form.bias_as_add(onnx_model)
    onnx_fp8_form.outputs_as_copies(onnx_model)
    onnx_graph.strip_metadata(onnx_model)
    onnx_model.producer_name, onnx_model.producer_version = "hfp8-ptq", __version__
    try:
        data = manifest(qmodel)
    except ValueError:
        data = None  # a plain float model
    if data is not None:
        onnx.helper.set_model_props(onnx_model, {MANIFEST_KEY: json.dumps(data, sort_keys=True)})
    size = onnx_model.ByteSize()
    if size >= (EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes):
        if external_data_bytes is None:
            raise ExportError(f"the ONNX model is {size / 2**30:.2f} GiB, past what one file "
                              "holds; write its weights to a second file beside it "
                              "(hfp8-ptq: --external-data; hfp8.export_onnx: "
                              "external_data_bytes)")
        return _write_with_external_data(onnx_model, Path(path))
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph fails onnx.checker: {_first_line(error)}") from None
    serialized = onnx_model.SerializeToString(deterministic=True)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(serialized)

    atomic_write(path, write)
    return onnx_model


def _write_with_external_data(onnx_model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Writes ``onnx_model`` as ``path`` plus :func:`external_data_path` (every initializer of
    1 KiB or more in the data file), checked from disk (the checker's in-memory form is limited
    to 2 GiB), and places both files together (:func:`hfp8._files.atomic_write_all`). Returns
    the model without its weights (they are in the data file)."""
    data = external_data_path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if str(path.parent) else ".") as folder:
        staged = Path(folder) / path.name
        onnx.save_model(onnx_model, staged, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported graph fails onnx.checker: {_first_line(error)}") from None

        def write(temporaries: list[str]) -> None:
            for written, temporary in ((staged, temporaries[0]),
                                       (Path(folder) / data.name, temporaries[1])):
                # the mode any new file gets here (the umask's), not the owner-only 0600 that
                # onnx (1.23) creates the weights file with: a service that reads the graph
                # must be able to read its weights
                shutil.copymode(temporary, written)
                os.replace(written, temporary)

        atomic_write_all([path, data], write)
    return onnx_model
