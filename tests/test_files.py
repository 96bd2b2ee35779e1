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


@pytest.mark.parametrize("interrupted_create", [1, 2])
def test_an_interrupt_right_after_a_temporary_is_created_leaves_nothing(tmp_path, monkeypatch,
                                                                         interrupted_create):
    """A signal lands the instant ``os.open`` has created a temporary, before our code runs
    again (CI caught SIGTERM leaving ``.q.onnx.*.tmp`` this way)."""
    import os
    real_open, calls = os.open, []

    def open_then_interrupt(path, *args, **kwargs):
        descriptor = real_open(path, *args, **kwargs)
        if str(path).endswith(".tmp"):
            calls.append(path)
            if len(calls) == interrupted_create:
                os.close(descriptor)
                raise KeyboardInterrupt
        return descriptor

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_all([tmp_path / "a.pt", tmp_path / "b.onnx"], lambda temporaries: None)
    monkeypatch.undo()
    assert len(calls) == interrupted_create
    assert list(tmp_path.iterdir()) == []


def test_without_overwrite_a_target_that_appears_meanwhile_is_not_replaced(tmp_path):
    """Issue 12 item 7: two runs racing for one name. The other run's file appears while we
    write; the final hard link refuses to replace it, and our group takes back what it placed."""
    from hfp8._files import OutputExistsError

    first, second = tmp_path / "q.pt", tmp_path / "q.onnx"

    def write(temporaries):
        for temporary in temporaries:
            _write_text(temporary, "ours")
        _write_text(second, "theirs")  # the racing run finished first

    with pytest.raises(OutputExistsError, match="appeared while writing"):
        atomic_write_all([first, second], write, overwrite=False)
    assert second.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # ours taken back, no temps


def test_without_overwrite_an_existing_target_is_refused_before_writing(tmp_path):
    from hfp8._files import OutputExistsError

    target = tmp_path / "q.pt"
    target.write_text("keep")
    calls = []
    with pytest.raises(OutputExistsError, match="already exists"):
        atomic_write(target, calls.append, overwrite=False)
    assert calls == [] and target.read_text() == "keep"


def test_fifos_and_devices_are_never_replaced(tmp_path):
    import os
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, lambda temporary: _write_text(temporary, "x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write("/dev/null", lambda temporary: None)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_temporary_names_fit_the_folders_limit(tmp_path):
    """Issue 12 item 9: a legal 253-character name failed with 'File name too long' because the
    temporary name added 16 characters."""
    target = tmp_path / ("m" * 249 + ".onnx")
    atomic_write(target, lambda temporary: _write_text(temporary, "ok"))
    assert target.read_text() == "ok" and len(target.name) == 254
