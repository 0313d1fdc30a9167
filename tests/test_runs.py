"""Run directories: atomic files, safe checkpoint loading, one writer at a time."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from sharp.errors import SharpError
from sharp.runs import RunDir, atomic_torch_save, atomic_write_bytes, load_checkpoint, read_jsonl


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": _RunsCode()}, handle)
    with pytest.raises(SharpError, match="refused") as info:
        load_checkpoint(path, fallback="checkpoints/epoch-0003.pt")
    assert "epoch-0003.pt" in str(info.value) and "\n" not in str(info.value)


def test_truncated_checkpoint_names_the_file_and_the_fallback(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save(path, {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(SharpError, match="truncated or corrupt") as info:
        load_checkpoint(path, fallback=tmp_path / "epoch-0001.pt")
    assert str(path) in str(info.value) and "epoch-0001.pt" in str(info.value)


def test_plain_checkpoint_round_trips(tmp_path):
    state = {"w": torch.randn(3), "step": 4, "progress": {"epoch": 1, "reason": ""}}
    atomic_torch_save(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["progress"] == state["progress"]


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write_bytes(path, b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left


def test_torn_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_second_writer_is_refused_and_stale_lock_is_taken(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock(), pytest.raises(SharpError, match="being written by process"), run.lock():
        pass
    assert not run.lock_file.exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    run.lock_file.write_text(f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}"}}')
    with run.lock():
        assert run.lock_file.exists()


def test_a_lock_naming_another_host_is_taken_at_once(tmp_path):
    """The kernel's lock, not the file's contents, decides: a file left by a writer on another
    host that died (which the pid check could never clear) blocks nothing."""
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.lock_file.write_text('{"pid": 1, "host": "a-node-that-crashed"}')
    with run.lock():
        assert '"host": "a-node-that-crashed"' not in run.lock_file.read_text()
    assert not run.lock_file.exists()


_HOLD = """
import sys, time
from sharp.runs import RunDir
with RunDir(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_lock_of_a_live_process_refuses_and_dies_with_it(tmp_path):
    run = RunDir(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SharpError, match=f"being written by process {holder.pid} on ") as info:
            run.prepare_new(overwrite=True)
        assert "\n" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert run.lock_file.exists()  # SIGKILL leaves the file, but not the lock
    with run.lock():
        assert str(os.getpid()) in run.lock_file.read_text()


def test_prepare_new_holds_the_lock_until_the_run_block_ends(tmp_path):
    """No second writer between the checks of a new run and its training."""
    run = RunDir(tmp_path / "r")
    run.prepare_new(overwrite=False)
    with pytest.raises(SharpError, match="being written by"):
        RunDir(tmp_path / "r").prepare_new(overwrite=True)
    with run.lock():
        with pytest.raises(SharpError, match="being written by"):
            RunDir(tmp_path / "r").prepare_new(overwrite=True)
        run.prepare_new(overwrite=False)  # the holder itself may prepare inside its block
    after = RunDir(tmp_path / "r")
    after.prepare_new(overwrite=False)  # released with the block
    with after.lock():
        pass


def test_leftovers_of_a_run_killed_before_its_config_are_no_foreign_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    (run.path / "checkpoints").mkdir(parents=True)
    run.lock_file.write_text("")
    run.prepare_new(overwrite=False)  # would say "not a sharp run" if these counted
    with run.lock():
        pass
    (run.path / "thesis.tex").write_text("precious")
    with pytest.raises(SharpError, match="not a sharp run"):
        run.prepare_new(overwrite=False)
