"""The run directory: atomic writes, completion markers, the lock and temp clean-up.

Run: ``.venv/bin/python -m pytest tests/test_rundir.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from distcl import rundir
from distcl.rundir import RunDir, RunDirBusy, atomic_dir, atomic_write, clean_temp


def test_atomic_write_replaces_and_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write(path, json.dumps({"v": 1}))
    assert json.loads(path.read_text()) == {"v": 1}

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temp file and the rename

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, json.dumps({"v": 2}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}  # the previous version, whole
    leftovers = list(tmp_path.glob(".tmp-*"))
    assert len(leftovers) == 1
    assert clean_temp(tmp_path) == leftovers and not list(tmp_path.glob(".tmp-*"))
    assert path.is_file()


def test_atomic_dir_replaces_a_folder_only_on_success(tmp_path):
    final = tmp_path / "models" / "0"
    with atomic_dir(final) as tmp:
        (tmp / "model.pt").write_bytes(b"a")
    assert (final / "model.pt").read_bytes() == b"a"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "model.pt").write_bytes(b"b")
        raise RuntimeError("killed mid-write")
    assert (final / "model.pt").read_bytes() == b"a"
    assert not list(final.parent.glob(".tmp-*"))


def test_markers_and_finished_tasks(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.finished_tasks() == 0
    for t in (0, 1, 3):
        rd.model(t).mkdir(parents=True)
        (rd.model(t) / "meta.json").write_text("{}")
        rd.mark_done(t, {"t": t})
    assert rd.trained(2) is False and rd.done(3) is True
    assert rd.finished_tasks() == 2  # leading tasks only: task 2 is missing


def test_lock_refuses_a_second_process_and_names_it(tmp_path):
    rd = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from distcl.rundir import RunDir\n"
         f"with RunDir({str(rd.root)!r}).lock():\n"
         "    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"), rd.lock():
            pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    deadline = time.time() + 10
    while True:
        try:
            with rd.lock():
                break
        except RunDirBusy:
            assert time.time() < deadline
            time.sleep(0.1)
    assert os.path.exists(rd.root / ".lock")
