"""Finding sample files in a folder and decoding one file into a tensor.

Supported files: images (``IMAGE_EXTENSIONS``, any case) decoded with PIL, and tensor files
(``TENSOR_EXTENSIONS``): ``.npy`` read with ``numpy.load(allow_pickle=False)``, ``.pt`` with
``torch.load(weights_only=True)``, holding one tensor or a dict of named tensors (the keyword
inputs of a model such as ``input_ids`` and ``attention_mask``). Tensor files are one sample
each, used as they are: single tensors and floating-point dict entries become float32, integer
dict entries (token ids, masks) keep their type, and a single tensor of int32 or int64 (token
ids, as a language model takes them) becomes int64; narrower integers (uint8 pixels) become
float32. Hidden files and folders (name starting with
``.``) are skipped; linked folders are not followed, except class folders.

A file is data, and small files can describe huge data: images over ``MAX_IMAGE_PIXELS`` are
refused from their header, before decoding; images whose resized size would exceed
``MAX_RESIZED_PIXELS`` (a 1 x 20000 strip resized to a short side of 256) and tensors over
``MAX_SAMPLE_ELEMENTS`` (a few bytes of expanded storage can claim billions) are refused before
any copy is made; samples holding NaN or Inf are refused. Refused files are skipped like
unreadable ones, with their reason.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from hfp8.data.image_preprocessing import resized_size

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_RESIZED_PIXELS",
    "MAX_SAMPLE_ELEMENTS",
    "IMAGE_EXTENSIONS",
    "TENSOR_EXTENSIONS",
    "SampleError",
    "discover_samples",
    "read_sample",
]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
TENSOR_EXTENSIONS = (".npy", ".pt")
_SUPPORTED = tuple(sorted(IMAGE_EXTENSIONS + TENSOR_EXTENSIONS))
_MAX_REASON = 160
MAX_IMAGE_PIXELS = 1 << 26  # 67 Mpixel: a 8192 x 8192 photo fits
MAX_RESIZED_PIXELS = 1 << 25
MAX_SAMPLE_ELEMENTS = 1 << 27  # 512 MiB of float32
MAX_SAMPLE_BYTES = 4 * MAX_SAMPLE_ELEMENTS  # tensor data a .pt sample may declare


class SampleError(ValueError):
    """A sample folder or file that cannot be used; the message is one line."""


def _walk(folder: Path, recursive: bool, found: list[Path], counts: list[int]) -> None:
    """Append supported files under ``folder`` to ``found``; ``counts`` counts every file and
    every hidden file."""
    with os.scandir(folder) as entries:
        for entry in entries:
            # Linked folders are not followed (as os.walk): a link loop would never end.
            if entry.is_dir(follow_symlinks=False):
                if recursive and not entry.name.startswith("."):
                    _walk(Path(entry.path), recursive, found, counts)
                continue
            try:
                is_file = entry.is_file()
            except OSError:  # a link loop (ELOOP) and the like: read, fail, skipped by name
                is_file = entry.is_symlink()
            if not is_file:
                continue
            counts[0] += 1
            counts[1] += entry.name.startswith(".")
            if not entry.name.startswith(".") and entry.name.lower().endswith(_SUPPORTED):
                found.append(Path(entry.path))


def discover_samples(root: Path, recursive: bool = True, labels: bool = False,
                     ) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Sample paths sorted by path components, their class indices, and the class names.

    Without ``labels`` every index is 0 and there are no class names; with ``labels`` the class
    index is the position of the sample's top-level sub-folder among the sorted sub-folder names.
    """
    if not root.exists():
        raise SampleError(f"sample folder {root} does not exist")
    if not root.is_dir():
        raise SampleError(f"sample path {root} is a file, not a folder")
    found: list[Path] = []
    counts = [0, 0]  # files, hidden files
    if labels:
        class_names = tuple(sorted(e.name for e in os.scandir(root)
                                   if e.is_dir() and not e.name.startswith(".")))
        if not class_names:
            raise SampleError(f"labels=True needs one sub-folder per class in {root}; found none")
        for name in class_names:
            before = len(found)
            _walk(root / name, recursive, found, counts)
            if len(found) == before:
                raise SampleError(f"class folder {root / name} has no samples")
    else:
        class_names = ()
        _walk(root, recursive, found, counts)
    if not found:
        if counts[0] == 0:
            raise SampleError(f"sample folder {root} is empty (no files)")
        if counts[1] == counts[0]:
            noun = "file is" if counts[0] == 1 else "files are"
            raise SampleError(f"no samples found in {root}: its {counts[0]} {noun} hidden "
                              "(names starting with '.' are skipped)")
        noun = "file" if counts[0] == 1 else "files"
        raise SampleError(f"no samples found in {root} ({counts[0]} {noun}, none with a "
                          f"supported extension: {' '.join(_SUPPORTED)})")
    found.sort(key=lambda p: p.relative_to(root).parts)
    index = {name: i for i, name in enumerate(class_names)}
    targets = [index[p.relative_to(root).parts[0]] if labels else 0 for p in found]
    return found, targets, class_names


def _checked(tensor: torch.Tensor, name: str = "") -> torch.Tensor:
    where = f" ({name})" if name else ""
    if tensor.is_complex():
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}{where}")
    if tensor.numel() > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)}{where} has more than "
                         f"{MAX_SAMPLE_ELEMENTS} elements")
    return tensor


def _declared_bytes(path: Path) -> int:
    """Uncompressed size of a torch zip archive's tensor records, as its directory declares
    (0 for the legacy format, whose sizes only its pickle states)."""
    if not zipfile.is_zipfile(path):
        return 0
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist()
                   if "/data/" in info.filename and not info.filename.endswith(".pkl"))


def _load_tensor(path: Path):
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if not isinstance(array, np.ndarray):  # an .npz archive saved under a .npy name
            raise ValueError("file holds an archive, not a single array")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) \
                or np.iscomplexobj(array):
            raise ValueError(f"unsupported array dtype {array.dtype}")
        if array.dtype in (np.int32, np.int64):  # token ids
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is refused below
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    declared = _declared_bytes(path)
    if declared > MAX_SAMPLE_BYTES:  # refused from the zip directory, before inflating anything
        raise ValueError(f"declares {declared} bytes of tensor data, over the "
                         f"{MAX_SAMPLE_BYTES} byte limit")
    value = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(value, dict) and value and all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        return {key: _checked(tensor, key).detach().to(
            torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous()
            for key, tensor in sorted(value.items())}
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"file holds a {type(value).__name__}, not a tensor or a dict of "
                         "named tensors")
    token_ids = value.dtype in (torch.int32, torch.int64)
    return _checked(value).detach().to(torch.int64 if token_ids else torch.float32).contiguous()


def _non_finite(sample) -> bool:
    tensors = sample.values() if isinstance(sample, dict) else [sample]
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)


def read_sample(path: Path, preprocess: Callable[[Image.Image], torch.Tensor],
                ) -> tuple[torch.Tensor | None, str]:
    """``(tensor, "")``, or ``(None, reason)`` when the file cannot be decoded.

    Images go through ``preprocess``; a ``ValueError`` from it (an image that decodes but does not
    fit the transform, e.g. smaller than the crop) is a ``SampleError``, not a skippable file.
    """
    try:
        if path.suffix.lower() in TENSOR_EXTENSIONS:
            sample = _load_tensor(path)
            return (None, "holds NaN or Inf values") if _non_finite(sample) else (sample, "")
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                return None, f"image of {width}x{height} pixels is over the {MAX_IMAGE_PIXELS} limit"
            opened.load()  # decode everything now: truncated data fails here, not later
            # upright as cameras mean it (EXIF orientation), detached from the file
            image = ImageOps.exif_transpose(opened)
    except Exception as error:  # noqa: BLE001 - decoders raise many unrelated exception types
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        # Some loaders (torch.load) explain at paragraph length; messages stay one short line.
        return None, reason if len(reason) <= _MAX_REASON else reason[:_MAX_REASON - 3] + "..."
    resized = resized_size(image.size, getattr(preprocess, "keywords", {}).get("resize"))
    if resized[0] * resized[1] > MAX_RESIZED_PIXELS:
        return None, (f"image of {width}x{height} pixels would be resized to "
                      f"{resized[0]}x{resized[1]}, over the {MAX_RESIZED_PIXELS} pixel limit")
    try:
        tensor = preprocess(image)
    except ValueError as error:  # a usable image that does not fit the config: not skippable
        raise SampleError(f"{path}: {error}") from None
    if _non_finite(tensor):
        return None, "holds NaN or Inf values after normalization"
    return tensor, ""
