"""Writing files atomically: a temporary file beside the target, then one rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path`` in one rename.

    A failure leaves neither a partial ``path`` nor the temporary file behind. An existing
    ``path`` is replaced only once the new content is complete.
    """
    return atomic_write_all([path], lambda temporaries: write(temporaries[0]))[0]


def _temporary_beside(target: Path) -> str:
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory, not a file path")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory {directory} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return temporary


def atomic_write_all(paths: list[str | os.PathLike],
                     write: Callable[[list[str]], None]) -> list[Path]:
    """Call ``write(temporary_paths)`` (one per path, each beside its target) and only when it
    returns, and every file is synced to disk, rename each onto its path, back to back.

    A failure while writing leaves every existing path as it was and no temporary file behind.
    What remains possible: a rename failing after an earlier one succeeded (same folder, file
    already complete: in practice only if the folder's permissions change meanwhile).
    """
    targets = [Path(path) for path in paths]
    temporaries: list[str] = []
    try:
        for target in targets:
            temporaries.append(_temporary_beside(target))
        write(temporaries)
        for temporary in temporaries:
            with open(temporary, "rb") as stream:
                os.fsync(stream.fileno())
        for temporary, target in zip(temporaries, targets):
            os.replace(temporary, target)
    except BaseException:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise
    return targets
