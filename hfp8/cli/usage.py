"""Command-line checks that need no torch: they run before the heavy imports, so a mistyped
path or an output that already exists is reported in a fraction of a second instead of after
torch (about 1-2 s) and the model file have loaded. The commands check again, with the files
open, what only the loaded inputs can tell."""

from __future__ import annotations

import os

from hfp8._files import external_data_path

__all__ = ["UsageError", "check_paths", "MODEL_ARGUMENTS", "FOLDER_ARGUMENTS"]

MODEL_ARGUMENTS = ("model", "qmodel", "reference")  # files the commands read
FOLDER_ARGUMENTS = ("calib", "data", "val")  # sample folders


class UsageError(ValueError):
    """A mistake in the command line itself, or an input it cannot use."""


def _onnx_output(args) -> str | None:
    """The ONNX file a command writes: ``--onnx`` of quantize, ``-o`` of export."""
    return args.output if args.command == "export" else getattr(args, "onnx", None)


def check_paths(args) -> None:
    """Every input file and sample folder named in ``args`` exists and is of the right kind;
    every output can be written (see :func:`hfp8.cli.outputs.check_output`). Messages are
    the ones the loaders give for the same mistakes."""
    from hfp8.cli.outputs import check_output

    files = [getattr(args, name, None) for name in MODEL_ARGUMENTS]
    folders = [getattr(args, name, None) for name in FOLDER_ARGUMENTS]
    for path in filter(None, files):
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        if not os.path.isfile(path):
            raise UsageError(f"{path} is not a file")
    for path in filter(None, folders):
        if not os.path.exists(path):
            raise UsageError(f"sample folder {path} does not exist")
        if not os.path.isdir(path):
            raise UsageError(f"sample path {path} is a file, not a folder")
    if args.command == "example":
        return  # its output is a folder, checked by the command
    outputs = {flag: getattr(args, name, None)
               for flag, name in (("-o", "output"), ("--onnx", "onnx"), ("--plot", "plot"))}
    outputs = {flag: path for flag, path in outputs.items() if path}
    if getattr(args, "external_data", False):
        onnx_path = _onnx_output(args)
        if onnx_path is None:
            raise UsageError("--external-data: give --onnx FILE (the weights go beside it)")
        outputs["--external-data"] = str(external_data_path(onnx_path))
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        earlier = seen.setdefault(os.path.realpath(path), flag)
        if earlier != flag:
            raise UsageError(f"{flag} and {earlier} name the same file")
        check_output(path, files, getattr(args, "overwrite", False), folders,
                     arch=getattr(args, "arch", None))
