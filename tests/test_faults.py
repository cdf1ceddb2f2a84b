"""Crash anywhere, lose nothing: the real CLI SIGKILLed at chosen moments, then re-run.

A 3-task CVS job (herding replay, class means, 2 DDP workers, 2 epochs per task) runs once
without faults (the reference), beside one chain of runs of the same job in another folder:
each run is SIGKILLed (the driver process; its embedded Ray goes with it) when a Train
worker or the driver reaches a kill point (``distcl.faults``), and the next run resumes;
a Train worker also dies mid-epoch in one of them. The kill points and their tasks are
drawn from a seed (``DISTCL_FAULT_SEED``, default: the day), printed on failure, so CI
covers other moments over time. After the last run finishes, the invariants:

- exit 0, and no finished task was retrained (its model files untouched since it finished);
- every model's history has each epoch exactly once, and the task whose worker died
  shows that its restart resumed at the dead worker's epoch, from the checkpoint;
- every eval/gallery part set holds exactly the scenario's items, once per model;
- the models, the stored embeddings and the memory equal the fault-free run's (bitwise);
- the metrics cover the whole evaluation set.

Run: ``.venv/bin/python -m pytest tests/test_faults.py -q`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from notorch import NO_TORCH

from distcl.localray import SESSION_ENV, session_pids

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
POINTS = ("epoch", "saved", "memory", "eval")
SEED = int(os.environ.get("DISTCL_FAULT_SEED", datetime.date.today().toordinal()))


def _job(root: Path) -> Path:
    raw = {
        "name": "faulty", "seed": 0,
        "data": {"source": "synthetic", "synthetic_classes": 6, "synthetic_train_per_class": 24,
                 "synthetic_test_per_class": 6, "synthetic_size": 16, "shard_size": 24},
        "scenario": {"setup": "disjoint", "tasks": 3},
        "model": {"embedding_dim": 8},
        "method": {"name": "cvs"},
        "memory": {"per_class": 4, "selection": "herding"},
        "train": {"epochs": 2, "batch_size_per_worker": 8, "workers": 2, "use_gpu": "no",
                  "max_failures": 2, "threads_per_worker": 1},
        "output": {"root": str(root / "runs")},
    }  # fmt: skip
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


CLI = NO_TORCH + "from distcl.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _cli(job: Path, env: dict | None = None) -> subprocess.Popen:
    """``distcl run JOB``, with torch blocked in the driver (tests/notorch.py: only the
    Train workers load it); its output goes to ``log.txt`` beside the job file (a pipe that
    nobody reads while the test waits on another run could fill and stall it)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DISTCL_"))}
    with open(job.with_name("log.txt"), "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, "run", str(job), "--no-progress"],
            cwd=ROOT, env={**clean, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip


def _output(proc: subprocess.Popen) -> str:
    job = Path(proc.args[4])  # python -c CLI run JOB ... (see _cli)
    return job.with_name("log.txt").read_text()


def _finish(proc: subprocess.Popen, what: str) -> str:
    proc.wait(timeout=900)
    out = _output(proc)
    assert proc.returncode == 0, f"{what} exited {proc.returncode} (seed {SEED}):\n{out[-4000:]}"
    return out


def _ray_session(driver: int) -> str:
    """The embedded Ray session marker (``DISTCL_RAY_SESSION``) of a driver's Ray: its
    children (the GCS, the raylet) carry it."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        found = [e for e in env if e.startswith(f"{SESSION_ENV}=".encode())]
        if ppid == driver and found:
            return found[0].split(b"=", 1)[1].decode()
    raise AssertionError(f"no Ray process of driver {driver} carries {SESSION_ENV}")


def _run_killed_at(job: Path, point: str, task: int, marker: Path, env: dict) -> None:
    """Run until a process reaches (point, task), then SIGKILL the driver; every process of
    its embedded Ray (the agents included) must be gone within seconds."""
    proc = _cli(job, {**env, "DISTCL_PAUSE_AT": f"{point}:{task}:{marker}"})
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None:
            out = _output(proc)
            raise AssertionError(f"run ended before {point}:{task} (seed {SEED}):\n{out[-3000:]}")
        assert time.monotonic() < deadline, f"{point}:{task} not reached (seed {SEED})"
        time.sleep(0.2)
    session = _ray_session(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while left := session_pids(session):
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in left
                 if Path(f"/proc/{p}/comm").exists()]  # fmt: skip
        assert time.monotonic() < deadline, f"left after a kill at {point}:{task}: {names}"
        time.sleep(0.5)


def _snapshot(run: Path) -> dict:
    """What must equal between runs: model bytes, embeddings by item, memory files."""
    out = {}
    for t in range(3):
        out[f"model{t}"] = (run / "models" / str(t) / "model.pt").read_bytes()
        for kind in ("eval/embeddings", "gallery"):
            parts = sorted((run / kind / f"model={t}").glob("part-*.parquet"))
            table = {}
            for p in parts:
                tb = pq.read_table(p, columns=["item_id", "embedding"]).to_pydict()
                for i, e in zip(tb["item_id"], tb["embedding"], strict=True):
                    assert i not in table, f"{i} twice in {kind}/model={t} (seed {SEED})"
                    table[i] = np.asarray(e, np.float32)
            out[f"{kind}/{t}"] = table
    from distcl.memory.service import MemoryShard

    out["memory"] = MemoryShard(str(run / "memory"), per_class=4).digest()
    return out


def test_killed_anywhere_then_rerun_equals_the_fault_free_run(tmp_path):
    # The fault-free run goes beside the chain (its own embedded Ray): the two wait on
    # Ray's and Train's start-ups at different moments, and the result cannot depend on it.
    (tmp_path / "reference").mkdir()
    reference_run = _cli(_job(tmp_path / "reference"))
    try:
        got = _killed_and_rerun(tmp_path)
        log = _finish(reference_run, "the fault-free run")
        # The run's last line says where its time went (issue 35), the parts named.
        assert re.search(
            r"^  where the time went: start-up \d+s, training \(3 tasks\) \d+s, "
            r"end-of-task \d+s, evaluation \d+s, other \d+s$",
            log,
            re.M,
        ), log
    finally:
        if reference_run.poll() is None:
            reference_run.kill()
    reference = _snapshot(tmp_path / "reference" / "runs" / "faulty")
    for key, value in reference.items():
        if isinstance(value, dict):
            assert value.keys() == got[key].keys(), (key, SEED)
            for item, emb in value.items():
                np.testing.assert_array_equal(got[key][item], emb, err_msg=f"{key} {item}")
        else:
            assert got[key] == value, (key, SEED)


def _killed_and_rerun(tmp_path: Path) -> dict:
    """The chain of killed runs and the final re-run; checks what needs no reference and
    returns the snapshot of the finished run."""
    rng = np.random.default_rng(SEED)
    # Three kills in task order (a later kill cannot come before an earlier one's point):
    # right after task 0's model is saved (early in a run, when Ray's agents outlived a
    # killed driver once), a drawn one, and during the evaluation.
    drawn = (int(rng.integers(0, 3)), str(rng.choice(POINTS[:3])))
    plan = sorted([(0, "saved"), drawn], key=lambda p: (p[0], POINTS.index(p[1])))
    plan += [(2, "eval")]
    worker_task = int(rng.integers(1, 3))  # a Train worker dies mid-epoch 1 of this task
    print(f"fault seed {SEED}: kills {plan}, worker death in task {worker_task}")
    job = _job(tmp_path)
    run = tmp_path / "runs" / "faulty"
    env = {"DISTCL_FAULT": f"{tmp_path / 'worker-died'}:{worker_task}:1"}
    finished: dict[int, int] = {}  # task -> mtime of its model when it finished
    seen_points = set()
    for i, (task, point) in enumerate(plan):
        if (task, point) in seen_points:
            continue
        seen_points.add((task, point))
        _run_killed_at(job, point, task, tmp_path / f"kill-{i}", env)
        for t in range(3):  # models finished so far must never be rewritten
            done = run / "models" / str(t) / "done.json"
            if done.is_file() and t not in finished:
                finished[t] = (run / "models" / str(t) / "model.pt").stat().st_mtime_ns
    out = _finish(_cli(job, env), f"the re-run after kills {plan}")
    assert "done, skipped" in out or not finished
    for t, mtime in finished.items():
        assert (run / "models" / str(t) / "model.pt").stat().st_mtime_ns == mtime, (t, SEED)
    for t in range(3):
        history = json.loads((run / "models" / str(t) / "history.json").read_text())
        assert [h["epoch"] for h in history] == [0, 1], (t, history, SEED)
        if t == worker_task:  # the worker died at epoch 1: the restart resumed there
            assert [h["resumed"] for h in history] == [False, True], (history, SEED)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"] == 3
    assert metrics["eval_items"] == 6 * 6  # every class's test items
    return _snapshot(run)
