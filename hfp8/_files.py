"""Writing files atomically: a temporary file beside the target, then one rename.

Guarantees (tested in tests/test_files.py):

* a failure while writing leaves every existing target as it was and no temporary behind;
* with ``overwrite=False`` a target that exists, or appears while we write (another run racing
  for the same name), is never replaced: the final step is a hard link, which the kernel refuses
  atomically when the name exists (where the file system has no hard links, an exclusive create
  reserves the name, then a rename fills it);
* only regular files are replaced: a folder, FIFO or device at the target is refused;
* temporary names fit the folder's name-length limit, however long the target's name is.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all", "external_data_path", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """The target exists (or appeared meanwhile) and overwriting was not allowed."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None],
                 overwrite: bool = True) -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path`` in one rename.

    A failure leaves neither a partial ``path`` nor the temporary file behind. An existing
    ``path`` is replaced only once the new content is complete, and only with ``overwrite``.
    """
    return atomic_write_all([path], lambda temporaries: write(temporaries[0]), overwrite)[0]


def _name_limit(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _temporary_name(target: Path, directory: Path) -> Path:
    """``.{name}.{random}.tmp``, the name shortened (by bytes) to fit the folder's limit."""
    suffix = f".{secrets.token_hex(6)}.tmp"
    room = _name_limit(directory) - len(suffix.encode()) - 1
    # file system bytes, not UTF-8: any name Linux accepts (undecodable bytes included, which
    # Python carries as surrogate escapes) stays the same bytes
    name = os.fsdecode(os.fsencode(target.name)[:max(room, 1)])
    return directory / f".{name}{suffix}"


def check_replaceable(target: Path) -> None:
    """Only a regular file (or nothing) may be written at ``target``."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(target))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EEXIST, "exists and is not a regular file (a FIFO, socket or "
                      "device); refusing to replace it", str(target))


def _temporary_for(target: Path) -> str:
    """The (not yet created) temporary for ``target``, after checking the target may be written."""
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "output folder does not exist", str(directory))
    check_replaceable(target)
    return str(_temporary_name(target, directory))


def _create_exclusive(temporary: str) -> None:
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    os.close(descriptor)


def _place_new(temporary: str, target: Path) -> None:
    """Move ``temporary`` to ``target`` unless ``target`` exists (atomically)."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise OutputExistsError(errno.EEXIST, "appeared while writing; not replaced (pass "
                                "--overwrite to replace it)", str(target)) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                               errno.EMLINK, errno.ENOSYS):
            raise
        try:  # no hard links here: reserve the name exclusively, then fill it
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise OutputExistsError(errno.EEXIST, "appeared while writing; not replaced",
                                    str(target)) from None
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def _sync_folder(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_all(paths: list[str | os.PathLike], write: Callable[[list[str]], None],
                     overwrite: bool = True) -> list[Path]:
    """Call ``write(temporary_paths)`` (one per path, each beside its target) and only when it
    returns, and every file is synced to disk, move each onto its path, back to back.

    A failure while writing leaves every existing path as it was and no temporary file behind.
    Without ``overwrite``, an existing path (or one that appears meanwhile) stops the group:
    targets already placed by this call are removed again, so either all appear or none.
    What remains possible: a rename failing after an earlier one succeeded (same folder, file
    already complete: in practice only if the folder's permissions change meanwhile).
    """
    targets = [Path(path) for path in paths]
    temporaries: list[str] = []
    placed: list[Path] = []
    try:
        for target in targets:
            if not overwrite and os.path.lexists(target):
                raise OutputExistsError(errno.EEXIST, "already exists (pass --overwrite to "
                                        "replace it)", str(target))
            # the name is recorded before the file exists: an interrupt (SIGINT, SIGTERM) that
            # lands right after the create still finds it in the clean-up below
            temporaries.append(_temporary_for(target))
            try:
                _create_exclusive(temporaries[-1])
            except FileExistsError:  # not ours (a 48-bit name collision): never remove it
                temporaries.pop()
                raise
        write(temporaries)
        for temporary in temporaries:
            with open(temporary, "rb") as stream:
                os.fsync(stream.fileno())
        for temporary, target in zip(temporaries, targets):
            check_replaceable(target)
            if overwrite:
                os.replace(temporary, target)
            else:
                _place_new(temporary, target)
                placed.append(target)
        for directory in {t.parent if str(t.parent) else Path(".") for t in targets}:
            _sync_folder(directory)
    except BaseException:
        for target in placed:  # a no-clobber group failed midway: take back what we placed
            os.unlink(target)
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise
    return targets


def external_data_path(path: str | os.PathLike) -> Path:
    """Where an ONNX file's weights go when they do not fit in it (models past 2 GiB):
    ``path`` with ``.data`` appended, beside it (the file refers to it by name)."""
    path = Path(path)
    return path.with_name(path.name + ".data")
