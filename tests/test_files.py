"""Atomic writes: nothing the user has is replaced or left half-written."""

from __future__ import annotations

import pytest

from hfp8._files import atomic_write, atomic_write_all


def _write_text(path, text):
    with open(path, "w") as stream:
        stream.write(text)


def test_atomic_write_all_renames_every_file_once_all_are_complete(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.onnx"
    first.write_text("old a")
    atomic_write_all([first, second], lambda temporaries: [
        _write_text(temporary, f"new {index}") for index, temporary in enumerate(temporaries)])
    assert (first.read_text(), second.read_text()) == ("new 0", "new 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.onnx"]


def test_a_failure_after_the_first_file_is_written_replaces_nothing(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.onnx"
    first.write_text("old a")
    second.write_text("old b")

    def write(temporaries):
        _write_text(temporaries[0], "new a")  # complete ...
        raise RuntimeError("export failed")   # ... but the second one fails

    with pytest.raises(RuntimeError, match="export failed"):
        atomic_write_all([first, second], write)
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.onnx"]  # no temporaries


def test_atomic_write_refuses_folders_and_missing_parents(tmp_path):
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, lambda temporary: None)
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "x.pt", lambda temporary: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"

    def write(temporary):
        _write_text(temporary, "half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []
