"""Under load: several jobs submitted at once to one Ray head all finish, with disjoint
outputs and no collision of actor or Ray Train run names, and a tuning search shares the
head with runs without either disturbing the other.

Two runs (replay methods, so each has a memory service and a progress board on the head;
one with ``--smoke``) and a 2-trial tuning search go to the same head through ``distcl
submit --wait`` in parallel; then ``distcl jobs list/logs/status`` read them back. The
head has 2 CPUs and each Train run wants 1: they queue for CPUs, which is the
point. The search removes its ended trials' placement groups itself (Ray Train's cleaner,
through the State API, once removed a live group of another run): the runs finishing beside
it shows it removes only its own.

Run: ``.venv/bin/python -m pytest tests/test_load.py -q`` (minutes on 2 cores).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distcl import cli
from distcl.config import parse_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _job(path: Path, name: str, method: str, root: Path, tune: dict | None = None) -> Path:
    raw = {
        "name": name,
        "data": {"source": "synthetic", "synthetic_classes": 4, "synthetic_train_per_class": 24,
                 "synthetic_test_per_class": 6, "shard_size": 24},
        "scenario": {"tasks": 2}, "model": {"embedding_dim": 8},
        "method": {"name": method}, "memory": {"per_class": 3},
        "train": {"epochs": 1, "batch_size_per_worker": 8, "workers": 1, "use_gpu": "no"},
        "output": {"root": str(root)},
    }  # fmt: skip
    if tune:
        raw["tune"] = tune
    path.write_text(yaml.safe_dump(raw))
    return path


GRID = {"space": {"train.lr": {"type": "grid", "values": [0.05, 0.1]}}, "search": "grid",
        "objective": "am", "grace_tasks": 2, "max_concurrent_trials": 1}  # fmt: skip


def test_runs_and_a_search_at_once_on_one_head_finish_with_disjoint_outputs(
    ray_head, tmp_path, monkeypatch, capsys
):
    root = tmp_path / "runs"  # one output root: the run dirs differ by job name only
    jobs = {name: _job(tmp_path / f"{name}.yaml", name, method, root, tune)
            for name, method, tune in (("a", "cl2r", None), ("b", "cvs", None),
                                       ("c", "finetune", GRID))}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DISTCL_"))}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distcl.cli",
                "submit",
                str(path),
                "--address",
                ray_head.address,
                "--working-dir",
                str(ROOT),
                "--wait",
                "--token-file",
                str(_token_file(tmp_path, ray_head.token)),
                *({"a": ["--smoke"], "c": ["--tune"]}.get(name, [])),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, path in jobs.items()
    }
    outs = {name: p.communicate(timeout=1500)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"job {name}:\n{outs[name][-4000:]}"
    # `submit --wait` as a user sees it: the submission id, the final status, the streamed
    # driver log; the resolved job shipped (smoke and output root kept).
    sid = re.search(r"submitted (\S+) \(run a\)", outs["a"]).group(1)
    assert re.search(rf"job {sid} SUCCEEDED after \d+s", outs["a"])
    assert "run finished" in outs["a"]
    shipped = parse_job(yaml.safe_load((root / "a" / "job.yaml").read_text()))
    assert shipped.smoke and shipped.output.root == str(root)
    # The token authenticates `distcl jobs` too (here from $RAY_JOB_TOKEN); in-process.
    monkeypatch.setenv("RAY_JOB_TOKEN", ray_head.token)
    assert cli.main(["jobs", "list", "--address", ray_head.address]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"{sid}\s+SUCCEEDED\s+a", listed) and re.search(r"SUCCEEDED\s+c", listed)
    assert cli.main(["jobs", "logs", sid, "--address", ray_head.address]) == 0
    assert "run finished" in capsys.readouterr().out
    assert cli.main(["jobs", "status", sid, "--address", ray_head.address]) == 0
    assert capsys.readouterr().out.startswith(f"{sid}: SUCCEEDED")
    # The search's two trials are whole runs of their own, beside the two plain runs.
    trials = sorted((root / "c-tune" / "trials").glob("c-trial-*"))
    rows = list(csv.DictReader(open(root / "c-tune" / "trials.csv")))
    assert len(trials) == 2 and len(rows) == 2, outs["c"][-4000:]
    assert {r["status"] for r in rows} == {"completed"} and {r["tasks"] for r in rows} == {"2"}
    names = set()
    for run in [root / "a", root / "b", *trials]:
        if run.parent == root:  # the plain runs evaluate; a trial scores each task for Tune
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["tasks"] == 2 and metrics["job"] == run.name
        assert (run / "models" / "1" / "done.json").is_file(), run
        train_runs = [p.name for p in (run / "ray").iterdir() if p.is_dir()]
        assert len(train_runs) == 1, train_runs  # one Train run per job, in its own storage
        names.add(train_runs[0])
    assert len(names) == 4  # named after each config's digest: distinct jobs, distinct runs
    # Each replay job's memory service wrote its own folder: 2 tasks x 2 classes x 3 exemplars
    # (a shared actor would have put both jobs' exemplars in one folder and none in the other).
    from distcl.memory.service import MemoryShard

    for name in ("a", "b"):
        stats = MemoryShard(str(root / name / "memory"), per_class=3).stats()
        assert stats["tasks"] == [0, 1] and (name == "a" or stats["n"] == 12), name


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(0o600)
    return path
