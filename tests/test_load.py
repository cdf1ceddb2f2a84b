"""Under load: several jobs submitted at once to one Ray head all finish, with disjoint
outputs and no collision of actor or Ray Train run names.

Three smoke jobs (two of them replay methods, so each has a memory service and a progress
board on the head) go to the same head through ``distcl submit --wait`` in parallel. The
head has 2 CPUs and each job's Train run wants 1: they queue for CPUs, which is the point.

Run: ``.venv/bin/python -m pytest tests/test_load.py -q`` (minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _job(path: Path, name: str, method: str, root: Path) -> Path:
    raw = {
        "name": name,
        "data": {"source": "synthetic", "synthetic_classes": 4, "synthetic_train_per_class": 24,
                 "synthetic_test_per_class": 6, "shard_size": 24},
        "scenario": {"tasks": 2}, "model": {"embedding_dim": 8},
        "method": {"name": method}, "memory": {"per_class": 3},
        "train": {"epochs": 1, "batch_size_per_worker": 8, "workers": 1, "use_gpu": "no"},
        "output": {"root": str(root)},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    return path


def test_three_jobs_at_once_on_one_head_finish_with_disjoint_outputs(ray_head, tmp_path):
    root = tmp_path / "runs"  # one output root: the run dirs differ by job name only
    jobs = {name: _job(tmp_path / f"{name}.yaml", name, method, root)
            for name, method in (("a", "cl2r"), ("b", "cvs"), ("c", "finetune"))}  # fmt: skip
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
    names = set()
    for name in jobs:
        run = root / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["tasks"] == 2 and metrics["job"] == name
        train_runs = [p.name for p in (run / "ray").iterdir() if p.is_dir()]
        assert len(train_runs) == 1, train_runs  # one Train run per job, in its own storage
        names.add(train_runs[0])
    assert len(names) == 3  # named after each config's digest: distinct jobs, distinct runs
    # Each replay job's memory service wrote its own folder: 2 tasks x 2 classes x 3 exemplars
    # (a shared actor would have put both jobs' exemplars in one folder and none in the other).
    from distcl.memory.service import MemoryShard

    for name in ("a", "b"):
        memory = MemoryShard(str(root / name / "memory"), per_class=3)
        assert memory.stats()["n"] == 12 and memory.stats()["tasks"] == [0, 1], name


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(0o600)
    return path
