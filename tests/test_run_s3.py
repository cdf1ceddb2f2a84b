"""A whole ``distcl run`` with ``output.root: s3://...`` (moto on 127.0.0.1, ``s3server.py``):
shards built by Ray tasks into the bucket, Ray Train's checkpoints, models, done markers, the
memory service's files, the gallery and evaluation Parquet parts, eval rows, metrics.json,
report.md and plots all written there and read back from there; nothing written locally
under the run's name; a re-run trains nothing. Then a ``distcl tune`` search with its
``output.root`` on the bucket: Tune's state, the trials' run dirs, the shared first task
(copied server-side into each trial) and the tables, all objects; a rerun resumes it.

Run: ``.venv/bin/python -m pytest tests/test_run_s3.py -q`` (~3 min on 2 cores)
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import ray

from distcl import storage
from distcl.localray import init_ray
from distcl.pipeline import run_job
from distcl.storage import Uri

pytestmark = pytest.mark.ray

TINY = {
    "data": {"synthetic_classes": 4, "synthetic_train_per_class": 24,
             "synthetic_test_per_class": 6, "shard_size": 24},
    "scenario": {"tasks": 2},
    "model": {"embedding_dim": 8},
    "memory": {"per_class": 4},
    "method": {"name": "cvs"},  # old model + class means + exemplars: every memory file
    "train": {"epochs": 1, "batch_size_per_worker": 8, "workers": 1, "max_failures": 0},
}  # fmt: skip


@pytest.fixture(scope="module")
def s3_ray(s3):
    """One Ray for the module, started after the AWS variables are set: its workers
    inherit them."""
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_run(s3, s3_ray, make_job, tmp_path_factory):
    """One 2-task run on the bucket, 2 epochs a task (the first is checkpointed)."""
    cwd = tmp_path_factory.mktemp("cwd")
    train = {**TINY["train"], "epochs": 2}
    job = make_job(cwd, name="s3-run", output={"root": s3.prefix("runs")},
                   **{**TINY, "train": train})  # fmt: skip
    out = run_job(job, progress=False, log=lambda *a: None)
    return job, out, cwd


def test_a_run_on_s3_writes_everything_to_the_bucket(s3_run):
    job, out, cwd = s3_run
    rd = job.run_dir
    assert isinstance(rd, Uri) and out["run_dir"] == str(rd)
    names = {str(p)[len(str(rd)) + 1 :] for p in storage.walk_files(rd)}
    for t in (0, 1):
        assert {f"models/{t}/{f}" for f in ("model.pt", "meta.json", "history.json",
                                            "done.json")} <= names  # fmt: skip
        for kind in ("gallery", "eval/embeddings"):
            assert f"{kind}/model={t}/part-0.parquet" in names
        assert f"eval/rows/{t}.json" in names
    assert {"job.yaml", "scenario.json", "metrics.json", "report.md", "compat_all.png",
            "curves.png"} <= names  # fmt: skip
    assert any(n.startswith("memory/task0000-shard00.npz") for n in names)
    assert any(n.startswith("memory/means-") for n in names)
    assert any(n.startswith("ray/seq-") and n.endswith("step.pt") for n in names)  # Train ckpt
    assert ".lock" not in names and not any("/.tmp-" in n or n.startswith(".tmp-") for n in names)
    shards = {e.name for e in storage.listdir(job.shards_dir)}
    assert "manifest.json" in shards and str(job.shards_dir).startswith("s3://")
    # the Parquet parts are ordinary Parquet objects, readable by any pyarrow reader
    fs, path = storage.filesystem(rd / "eval" / "embeddings" / "model=1" / "part-0.parquet")
    assert pq.read_table(path, filesystem=fs).num_rows == 4 * 6
    report = storage.read_text(rd / "report.md")
    assert "# s3-run (cvs)" in report and "![all](compat_all.png)" in report
    assert storage.read_json(rd / "metrics.json")["tasks"] == 2
    assert not list(cwd.rglob("s3:*")) and not (cwd / "runs").exists()  # nothing local


def test_a_rerun_on_s3_trains_nothing_and_evaluates_from_the_bucket(s3_run):
    from distcl.eval.evaluate import evaluate_run

    job, _, _ = s3_run
    model = job.run_dir / "models" / "1" / "model.pt"
    before = storage.stat(model).mtime_ns
    lines: list[str] = []
    run_job(job, progress=False, evaluate=False, log=lines.append)
    assert sum("done, skipped" in line for line in lines) == 2
    assert storage.stat(model).mtime_ns == before
    again = evaluate_run(str(job.run_dir), log=lambda *a: None)  # rows from the bucket's cache
    stored = storage.read_json(job.run_dir / "metrics.json")
    assert json.dumps(again["protocols"]) == json.dumps(stored["protocols"])  # NaN: as text


@pytest.fixture(scope="module")
def s3_tune(s3, s3_ray, make_job, tmp_path_factory):
    """A 2-trial grid over CL2R's lambda (acts from task 2 on: one shared first task, with
    the memory's files) with ``output.root`` on the bucket, 1 worker of 0.9 CPU per trial."""
    from distcl.tune.search import tune_job

    cwd = tmp_path_factory.mktemp("tune-cwd")
    job = make_job(cwd, name="s3-tune", output={"root": s3.prefix("tuning")},
                   **{**TINY, "method": {"name": "cl2r", "params": {"lambda": 1.0}},
                      "train": {**TINY["train"], "cpus_per_worker": 0.9,
                                "threads_per_worker": 1}},
                   tune={"space": {"method.params.lambda": {"type": "grid",
                                                            "values": [1.0, 10.0]}},
                         "search": "grid", "objective": "am", "asha": False})  # fmt: skip
    logs: list[str] = []
    out = tune_job(job, log=logs.append)
    return job, out, cwd, logs


def test_a_search_on_s3_keeps_everything_in_the_bucket(s3_tune):
    from distcl.data.shardio import sha256_file

    job, out, cwd, logs = s3_tune
    tune_dir = storage.location(out["tune_dir"])
    assert isinstance(tune_dir, Uri) and str(tune_dir).endswith("/s3-tune-tune")
    names = {storage.relative(p, tune_dir) for p in storage.walk_files(tune_dir)}
    for f in ("trials.md", "trials.csv", "best.yaml", "tune_job.yaml", "objective_vs_method"
              ".params.lambda.png"):  # fmt: skip
        assert f in names, f
    assert any(n.startswith("experiment/") for n in names)  # Tune's own state
    assert [r["status"] for r in out["rows"]] == ["completed"] * 2
    assert {r["base"] for r in out["rows"]} == {"shared"}
    assert any("shared base task: yes" in line for line in logs)
    assert out["best_job"] == str(tune_dir / "best.yaml")
    # Task 0 (model, memory files, Parquet parts) trained once, copied into each trial.
    base = tune_dir / "trials" / "s3-tune-base"
    files = storage.read_json(base / "base.json")["files"]
    assert "models/0/model.pt" in files and any(f.startswith("memory/") for f in files)
    trials = sorted({n.split("/")[1] for n in names if n.startswith("trials/s3-tune-trial-")})
    assert len(trials) == 2
    for t in trials:
        run = tune_dir / "trials" / t
        for rel, want in files.items():
            if rel == "eval/rows/0.json":  # keyed on the parts' mtimes, new for a copy:
                rows = [storage.read_json(d / rel)["protocols"] for d in (run, base)]
                assert len({json.dumps(r, sort_keys=True) for r in rows}) == 1  # rescored
                continue
            assert sha256_file(run / rel) == want["sha256"], (t, rel)
        assert storage.is_file(run / "models" / "1" / "done.json")
        assert storage.read_json(run / "base.json")["base"] == str(base)
    assert not list(cwd.rglob("s3:*")) and not (cwd / "tuning").exists()  # nothing local


def test_a_search_on_s3_resumes_without_training(s3_tune):
    from distcl.tune.search import tune_job

    job, out, _, _ = s3_tune
    tune_dir = storage.location(out["tune_dir"])
    models = [p for p in storage.walk_files(tune_dir / "trials") if p.name == "model.pt"]
    before = {str(p): storage.stat(p).mtime_ns for p in models}
    logs: list[str] = []
    again = tune_job(job, log=logs.append)
    assert any("resuming the tuning run" in line for line in logs)
    assert [r["status"] for r in again["rows"]] == ["completed"] * 2
    assert {str(p): storage.stat(p).mtime_ns for p in models} == before
