"""``distcl backfill --apply``: a partial re-index of a real run's stored gallery, killed mid-way
and re-run (each chosen item re-embedded exactly once, no other row touched), and the mixed
gallery read by the evaluation as a brute-force computation reads it.

Run: ``.venv/bin/python -m pytest tests/test_reindex.py -q`` (a Ray run of 3 tasks first).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import yaml

from distcl.eval import metrics as mt
from distcl.rundir import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(make_job, tmp_path_factory):
    """A finished 3-task finetune run: 6 classes, 12 test items each, gallery shards of 8
    items (several per arrival task, so a re-index writes several parts)."""
    from distcl.pipeline import run_job

    root = tmp_path_factory.mktemp("reindex")
    job = make_job(
        root, name="ri",
        data={"synthetic_classes": 6, "synthetic_train_per_class": 24,
              "synthetic_test_per_class": 12, "shard_size": 8},
        scenario={"tasks": 3}, model={"embedding_dim": 8},
        train={"epochs": 1, "batch_size_per_worker": 8, "workers": 2, "max_failures": 0},
    )  # fmt: skip
    run_job(job, progress=False, log=lambda *a: None)
    return job, RunDir(job.run_dir)


def _copy(job, rd: RunDir, dst: Path):
    """The finished run in another folder (each test changes its own gallery)."""
    import shutil

    shutil.copytree(rd.root, dst / job.name)
    raw = yaml.safe_load((dst / job.name / "job.yaml").read_text())
    raw["output"]["root"] = str(dst)
    raw["data"]["shards_dir"] = str(job.shards_dir)  # the same shards
    (dst / job.name / "job.yaml").write_text(yaml.safe_dump(raw))
    for lock in (dst / job.name).glob(".lock"):
        lock.unlink()
    return RunDir(dst / job.name)


def _gallery_rows(rd: RunDir) -> list[dict]:
    return ds.dataset(rd.gallery, format="parquet", partitioning="hive").to_table(
        columns=["item_id", "model", "task", "label", "embedding"]).to_pylist()  # fmt: skip


def _stamps(rd: RunDir) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in rd.gallery.rglob("part-*.parquet")}


def test_a_killed_apply_rerun_embeds_each_chosen_item_once(trained, tmp_path):
    job, base = trained
    rd = _copy(job, base, tmp_path)
    before, arrival = _gallery_rows(rd), _stamps(rd)
    marker = tmp_path / "paused"
    cmd = [sys.executable, "-m", "distcl.cli", "backfill", str(rd.root), "--apply",
           "--model", "3", "--fraction", "0.8", "--policy", "oldest"]  # fmt: skip
    env = {**os.environ, "DISTCL_PAUSE_AT": f"reindex:0:{marker}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not marker.exists():  # part 0 written: kill it there
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    plan_file = rd.root / "backfill" / "apply-1.json"
    plan = yaml.safe_load(plan_file.read_text())
    assert plan["done"] is False and plan["items"]
    written_then = {p.name for p in (rd.gallery / "model=2").glob("backfill-1-*.parquet")}
    assert written_then == {"backfill-1-0.parquet"}
    env.pop("DISTCL_PAUSE_AT")
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming the re-index apply-1" in rerun.stdout
    assert "1 of " in rerun.stdout and "parts already written" in rerun.stdout
    plan = yaml.safe_load(plan_file.read_text())
    assert plan["done"] is True
    after = _gallery_rows(rd)
    new_rows = [r for r in after if r["task"] != r["model"]]
    # every chosen item exactly once, of model 3 (index 2), and nothing else re-embedded
    counts = collections.Counter(r["item_id"] for r in new_rows)
    assert sorted(counts) == sorted(plan["items"]) and set(counts.values()) == {1}
    assert {r["model"] for r in new_rows} == {2}
    # oldest first: the 57 first of 72 items are the 48 that arrived at tasks 0 and 1 (all
    # re-embedded) and 9 of task 2, whose rows are model 3's already (left as they are)
    assert plan["first"] == 57 and plan["already"] == 9 and len(plan["items"]) == 48
    assert {r["task"] for r in new_rows} == {0, 1}
    # arrival rows untouched, bytes and files
    assert _stamps(rd) == arrival
    key = lambda r: (r["item_id"], r["model"])  # noqa: E731
    old = {key(r): r for r in before}
    assert all(old[key(r)] == r for r in after if r["task"] == r["model"])
    # the re-embedded rows are model 3's embeddings of those images (its eval rows)
    evals = {r["item_id"]: r["embedding"] for r in ds.dataset(
        rd.eval_embeddings / "model=2", format="parquet").to_table().to_pylist()}  # fmt: skip
    for r in new_rows:
        np.testing.assert_allclose(r["embedding"], evals[r["item_id"]], atol=1e-5)


def test_the_evaluation_reads_the_mixed_gallery_as_stored(trained, tmp_path):
    from distcl.eval.evaluate import evaluate_run
    from distcl.reindex import apply_backfill

    job, base = trained
    rd = _copy(job, base, tmp_path)
    plan = apply_backfill(rd.root, model=2, fraction=0.5, policy="random", log=lambda *a: None)
    assert plan["model"] == 1 and plan["items"]
    result = evaluate_run(rd.root, log=lambda *a: None)
    rows = _gallery_rows(rd)
    for s in range(3):  # brute force: each arrived item's row of the largest model <= s
        latest: dict[str, dict] = {}
        for r in rows:
            if 0 <= r["task"] <= s and r["model"] <= s:
                if r["item_id"] not in latest or r["model"] > latest[r["item_id"]]["model"]:
                    latest[r["item_id"]] = r
        ids = sorted(latest)
        g = np.array([latest[i]["embedding"] for i in ids], np.float32)
        lab = np.array([latest[i]["label"] for i in ids])
        table = ds.dataset(rd.eval_embeddings / f"model={s}", format="parquet").to_table()
        evals = {r["item_id"]: r["embedding"] for r in table.to_pylist()}
        q = np.array([evals[i] for i in ids], np.float32)
        want = mt.cmc(q, lab, g, lab, topk=(1,), exclude_self=True)[1]
        entry = result["stale_gallery"][s]
        assert entry["cmc@1"] == pytest.approx(want, abs=1e-12), s
        assert entry["gallery"] == len(ids)
        if s >= 1:  # model 2's rows are in the gallery from task 2 on
            assert 1 in entry["models_in_gallery"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "uncertainty", "--model", "3", "--fraction", "0.5"], "--policy"),
        (["--model", "3", "--fraction", "1.5"], "--fraction"),
        (["--model", "3", "--fraction", "-0.1"], "--fraction"),
        (["--model", "4", "--fraction", "0.5"], "--model 4: the run has finished models 1 .. 3"),
        (["--fraction", "0.5"], "--model"),
    ],
)
def test_bad_apply_arguments_are_refused_before_any_work(trained, tmp_path, capsys, args,
                                                         message):  # fmt: skip
    from distcl.cli import main

    job, base = trained
    rd = _copy(job, base, tmp_path)
    before = _stamps(rd)
    assert main(["backfill", str(rd.root), "--apply", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (rd.root / "backfill").exists() and _stamps(rd) == before


def test_a_run_without_stored_rows_is_refused(trained, tmp_path, capsys):
    import shutil

    from distcl.cli import main

    job, base = trained
    rd = _copy(job, base, tmp_path)
    shutil.rmtree(rd.gallery)
    assert main(["backfill", str(rd.root), "--apply", "--model", "3", "--fraction", "0.5"]) == 2
    assert "no stored gallery rows" in capsys.readouterr().err
