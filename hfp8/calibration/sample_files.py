"""Finding sample files in a folder and decoding one file into a tensor.

Supported files: images (``IMAGE_EXTENSIONS``, any case) decoded with PIL, and tensor files
(``TENSOR_EXTENSIONS``): ``.npy`` read with ``numpy.load(allow_pickle=False)``, ``.pt`` with
``torch.load(weights_only=True)`` (must hold one tensor). Tensor files are one sample each, used
as they are, only converted to float32. Hidden files and folders (name starting with ``.``) are
skipped; linked folders are not followed, except class folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
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


class SampleError(ValueError):
    """A sample folder or file that cannot be used; the message is one line."""


def _walk(folder: Path, recursive: bool, found: list[Path], counts: list[int]) -> None:
    """Append supported files under ``folder`` to ``found``; ``counts[0]`` counts every file."""
    with os.scandir(folder) as entries:
        for entry in entries:
            # Linked folders are not followed (as os.walk): a link loop would never end.
            if entry.is_dir(follow_symlinks=False):
                if recursive and not entry.name.startswith("."):
                    _walk(Path(entry.path), recursive, found, counts)
                continue
            if not entry.is_file():
                continue
            counts[0] += 1
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
    counts = [0]
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
        noun = "file" if counts[0] == 1 else "files"
        raise SampleError(f"no samples found in {root} ({counts[0]} {noun}, none with a "
                          f"supported extension: {' '.join(_SUPPORTED)})")
    found.sort(key=lambda p: p.relative_to(root).parts)
    index = {name: i for i, name in enumerate(class_names)}
    targets = [index[p.relative_to(root).parts[0]] if labels else 0 for p in found]
    return found, targets, class_names


def _load_tensor(path: Path) -> torch.Tensor:
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if not isinstance(array, np.ndarray):  # an .npz archive saved under a .npy name
            raise ValueError("file holds an archive, not a single array")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) \
                or np.iscomplexobj(array):
            raise ValueError(f"unsupported array dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"file holds a {type(value).__name__}, not a tensor")
    if value.is_complex():
        raise ValueError(f"unsupported tensor dtype {value.dtype}")
    return value.detach().to(torch.float32).contiguous()


def read_sample(path: Path, preprocess: Callable[[Image.Image], torch.Tensor],
                ) -> tuple[torch.Tensor | None, str]:
    """``(tensor, "")``, or ``(None, reason)`` when the file cannot be decoded.

    Images go through ``preprocess``; a ``ValueError`` from it (an image that decodes but does not
    fit the transform, e.g. smaller than the crop) is a ``SampleError``, not a skippable file.
    """
    try:
        if path.suffix.lower() in TENSOR_EXTENSIONS:
            return _load_tensor(path), ""
        with Image.open(path) as opened:
            opened.load()  # decode everything now: truncated data fails here, not later
            image = opened.copy()  # detached from the file, which the with-block closes
    except Exception as error:  # noqa: BLE001 - decoders raise many unrelated exception types
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        # Some loaders (torch.load) explain at paragraph length; messages stay one short line.
        return None, reason if len(reason) <= _MAX_REASON else reason[:_MAX_REASON - 3] + "..."
    try:
        tensor = preprocess(image)
    except ValueError as error:  # a usable image that does not fit the config: not skippable
        raise SampleError(f"{path}: {error}") from None
    return tensor, ""
