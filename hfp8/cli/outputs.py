"""What the command line writes: output paths checked before any work, files placed only when
complete and verified, and the verification report as text.

* an output may not be an input, a folder, a path ending in a separator, something other than
  a regular file (a FIFO or device, even with ``--overwrite``), or inside the sample folder;
* all outputs of one command appear together or not at all, written under temporary names and
  placed at the end; without ``--overwrite`` an existing name is never replaced, even one that
  another run creates meanwhile (see :mod:`hfp8._files`);
* an ONNX file is verified under its temporary name: a failed verification leaves every
  existing file as it was (exit 1).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from hfp8._files import OutputExistsError, atomic_write_all
from hfp8.cli.usage import UsageError


class VerificationFailed(RuntimeError):
    """The exported file does not compute what the PyTorch model does; nothing was written."""

    def __init__(self, report: dict) -> None:
        super().__init__(verification_text(report))
        self.report = report


def check_output(path: str, inputs: list[str | None], overwrite: bool,
                 folders: list[str | None] = (), arch: str | None = None) -> Path:
    """Refuse an output that would replace an input (the model files, the source file of an
    ``--arch path/to/file.py:factory``), land in a sample folder, or is not a writable file."""
    source = (arch or "").rpartition(":")[0]
    inputs = [*inputs, source if source.endswith(".py") else None]
    if path.endswith(("/", os.sep)):
        raise UsageError(f"output {path} names a folder; give a file name")
    target = Path(path)
    for given in inputs:
        if given and Path(given).exists() and target.resolve() == Path(given).resolve():
            raise UsageError(f"output {path} is also an input; choose another output name")
    for folder in folders:
        if folder and Path(folder).is_dir() and Path(folder).resolve() in target.resolve().parents:
            raise UsageError(f"output {path} is inside the sample folder {folder}; it would "
                             "become a sample")
    if target.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name")
    if os.path.lexists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        raise UsageError(f"output {path} exists and is not a regular file (a FIFO, socket or "
                         "device); refusing to write there")
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


def write_outputs(paths: list[str], write, overwrite: bool) -> bool:
    """``write(temporaries)`` then place every file (see the module docstring). Under torchrun
    only rank 0 writes; the others return False at once."""
    from hfp8 import distributed

    if distributed.world()[0] != 0:
        return False
    try:
        atomic_write_all(paths, write, overwrite=overwrite)
    except OutputExistsError as error:
        raise UsageError(f"output {error.filename} {error.strerror}") from None
    return True


def verification_text(report: dict) -> str:
    from hfp8.export.verify import passed

    pairs, layers = report["pairs"], report["layers"]
    exact = sum(p["bit_exact"] for p in pairs.values())
    checked = [r for r in layers.values() if r["checked"]]
    within = sum(r["within_bound"] for r in checked)
    whole = report["whole_model"]
    verdict = "OK" if report.get("passed", passed(report)) else "FAILED"
    recurrent = sum("relative_deviation_from_float64" in r for r in checked)
    bound = "the float32 summation bound" if not recurrent else (
        f"their bound (the float32 summation bound; {recurrent} recurrent: as close to their "
        "float64 run as PyTorch, or within float32 noise)")
    text = (f"onnxruntime verification {verdict}: {exact}/{len(pairs)} Q/DQ pairs bit-exact; "
            f"{within}/{len(checked)} layers replayed within {bound}")
    if len(checked) < len(layers):
        text += f" ({len(layers) - len(checked)} not replayable)"
    text += (f"; whole model vs its float64 run: onnxruntime {_sqnr(report, 'onnx_vs_float64')}, "
             f"PyTorch float32 {_sqnr(report, 'torch_vs_float64')} SQNR "
             f"({_whole_model_verdict(whole)}) on {report['samples']} samples")
    if report.get("fidelity"):
        text += (f"; fidelity to the float model: onnxruntime {_sqnr(report, 'onnx_vs_float')}, "
                 f"PyTorch {_sqnr(report, 'torch_vs_float')}")
    return text


def _whole_model_verdict(whole: dict) -> str:
    if whole.get("paired_passed", whole["passed"]):
        return "within PyTorch's own deviation"
    floor = whole.get("float32_floor", {})
    if floor.get("passed"):
        return f"within float32 noise: the floor for this model is {floor['sqnr_floor_db']:.1f} dB"
    return "OUTSIDE PyTorch's own deviation and the float32 floor"


def _sqnr(report: dict, comparison: str) -> str:
    """The lowest SQNR over the model's outputs, in dB."""
    values = [entry[comparison]["sqnr_db"] for entry in report["outputs"].values()
              if comparison in entry]
    value = min(values) if values else float("nan")
    return "exact" if value == float("inf") else f"{value:.1f} dB"
