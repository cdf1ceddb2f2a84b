"""Tuning: the tune block, trial jobs, the objective, results, and real Ray Tune runs.

Unit tests (no Ray cluster, ~5 s):   .venv/bin/python -m pytest tests/test_tune.py -q -m "not ray"
Real Ray (synthetic data, 2 CPUs):   .venv/bin/python -m pytest tests/test_tune.py -q -m ray
The real-Ray part (each trial is one Ray Train run over its tasks; ~3 minutes on 2 cores):
- ``tuned`` (its own Ray, in a subprocess, so that it can be SIGKILLed): a 3-trial grid where
  ASHA stops trials between tasks, killed once a trial has finished and started again; it
  runs beside the Pareto search (a thread waits on it), its tests after the Pareto ones;
- ``pareto`` (one in-process Ray for the module, ``local_ray``): a two-objective search with
  a shared first task, then ``--confirm 2``; then the best job is retrained, a stored search
  is tabulated, and a failing trial is reported. No placement group is left behind.
Pure parts of the Pareto search, shared base and confirmation: tests/test_tune_pareto.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from notorch import NO_TORCH
from rayhead import kill_until_gone
from reference import grow_matrix

from distcl.config import ConfigError, load_job, parse_job
from distcl.eval import compat
from distcl.tune.results import best_job, best_row, make_row, plot_objective, write_table
from distcl.tune.search import TaskASHA, max_concurrency
from distcl.tune.space import base_dict, objective, param_space, trial_job, validate_tune

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"synthetic_classes": 4, "synthetic_train_per_class": 32,
             "synthetic_test_per_class": 8, "shard_size": 40},
    "scenario": {"tasks": 2},
    "model": {"embedding_dim": 16},
    "method": {"name": "lwf", "params": {"alpha": 1.0}},
    "train": {"epochs": 1, "batch_size_per_worker": 16, "workers": 1, "max_failures": 0},
}  # fmt: skip


def _raw(tmp_path: Path, synthetic_raw_job, tune: dict, **kw) -> dict:
    raw = synthetic_raw_job(tmp_path, name="tiny", **TINY, **kw)
    raw["tune"] = tune
    return raw


# ---------------------------------------------------------------- the tune block
def test_validate_accepts_a_good_space(tmp_path, synthetic_raw_job):
    job = parse_job(_raw(tmp_path, synthetic_raw_job, {"space": {
        "method.params.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
        "method.params.temperature": {"type": "uniform", "low": 1.0, "high": 4.0},
        "train.lr": {"type": "choice", "values": [0.01, 0.05]},
    }}))  # fmt: skip
    assert set(validate_tune(job).space) == {
        "method.params.alpha",
        "method.params.temperature",
        "train.lr",
    }


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {"train.lrr": {"type": "uniform", "low": 0.1, "high": 1}}},
         "tune.space.train.lrr"),
        ({"space": {"method.params.alphaa": {"type": "uniform", "low": 0.1, "high": 1}}},
         "tune.space.method.params.alphaa"),
        ({"space": {"nosuch.section": {"type": "choice", "values": [1]}}},
         "tune.space.nosuch.section"),
        ({"space": {"train.lr": {"type": "uniform", "low": 0.0, "high": 1}}},
         "train.lr: Input should be greater than 0"),
        ({"space": {"train.epochs": {"type": "choice", "values": [1, "two"]}}},
         "tune.space.train.epochs = 'two'"),
        ({"space": {"train.lr": {"type": "uniform", "low": 0.5, "high": 0.1}}},
         "low must be < high"),
        ({"space": {"train.lr": {"type": "loguniform", "low": -1, "high": 0.1}}},
         "loguniform needs low > 0"),
        ({"space": {"train.lr": {"type": "choice"}}}, "non-empty list of values"),
        ({"space": {"train.lr": {"type": "uniform", "low": 0.1}}}, "needs low and high"),
        ({"space": {"output.root": {"type": "choice", "values": ["x"]}}},
         "tune.space.output.root: not a searchable"),
        ({"space": {"train.lr": {"type": "grid", "values": [0.1]}}, "search": "optuna"},
         "search 'optuna' samples"),
        ({"space": {"train.lr": {"type": "uniform", "low": 0.1, "high": 1}}, "search": "grid"},
         "search 'grid' needs grid or choice"),
        ({"space": {}}, "tune.space: no parameter"),
        ({"space": {"train.lr": {"type": "choice", "values": [0.1]}}, "reduction_factor": 1},
         "tune.reduction_factor"),
        ({"space": {"train.lr": {"type": "choice", "values": [0.1]}}, "driver_cpus": 0},
         "tune.driver_cpus"),
    ],
)  # fmt: skip
def test_validate_names_the_bad_key(tmp_path, synthetic_raw_job, tune, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_tune(parse_job(_raw(tmp_path, synthetic_raw_job, tune)))


def test_validate_needs_a_tune_block(synthetic_job):
    with pytest.raises(ConfigError, match="no tune: block"):
        validate_tune(synthetic_job())


def test_trial_job_sets_values_name_and_root(tmp_path, synthetic_raw_job):
    raw = _raw(tmp_path, synthetic_raw_job, {"space": {
        "method.params.alpha": {"type": "uniform", "low": 0.1, "high": 1}},
        "workers_per_trial": 1})  # fmt: skip
    raw["train"]["workers"] = 2
    job = parse_job(raw)
    base = base_dict(job)
    t = trial_job(
        base,
        {"method.params.alpha": np.float64(0.25), "train.lr": 0.003},
        "tiny-trial-x",
        str(tmp_path / "trials"),
    )
    assert t.name == "tiny-trial-x" and t.tune is None
    assert t.method.params.alpha == 0.25 and type(t.method.params.alpha) is float
    assert t.train.lr == 0.003 and t.train.workers == 1  # workers_per_trial applied
    assert t.output.root == str(tmp_path / "trials")


def test_trial_job_maps_lambda_for_cl2r(tmp_path, synthetic_raw_job):
    raw = _raw(tmp_path, synthetic_raw_job, {"space": {
        "method.params.lambda": {"type": "loguniform", "low": 0.1, "high": 10}}})  # fmt: skip
    raw["method"] = {"name": "cl2r", "params": {"lambda": 1.0}}
    job = parse_job(raw)
    validate_tune(job)
    t = trial_job(base_dict(job), {"method.params.lambda": 3.5}, "x", None)
    assert t.method.params.lambda_ == 3.5


def test_param_space_domains(tmp_path, synthetic_raw_job):
    from ray.tune.search.sample import Categorical, Float, LogUniform

    job = parse_job(_raw(tmp_path, synthetic_raw_job, {"space": {
        "method.params.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
        "method.params.temperature": {"type": "uniform", "low": 1.0, "high": 4.0},
        "train.lr": {"type": "choice", "values": [0.01, 0.05]},
        "train.epochs": {"type": "grid", "values": [1, 2]},
    }}))  # fmt: skip
    space = param_space(job.tune)
    a, temp = space["method.params.alpha"], space["method.params.temperature"]
    assert isinstance(a, Float) and isinstance(a.get_sampler(), LogUniform)
    assert (a.lower, a.upper, temp.lower, temp.upper) == (0.1, 10, 1.0, 4.0)
    assert isinstance(space["train.lr"], Categorical)
    assert space["train.lr"].categories == [0.01, 0.05]
    assert space["train.epochs"] == {"grid_search": [1, 2]}


# ---------------------------------------------------------------- objective and scoring
@pytest.mark.parametrize(
    ("ac", "am", "kind", "floor", "expected"),
    [
        (0.6, 0.7, "ac", 0.5, 0.6),
        (0.6, 0.7, "am", 0.5, 0.7),
        (0.6, 0.7, "am_if_ac", 0.5, 0.7),
        (0.6, 0.7, "am_if_ac", 0.6, 0.7),  # the floor is inclusive
        (0.6, 0.7, "am_if_ac", 0.8, 0.7 - 1.0),
        (float("nan"), 0.9, "ac", 0.5, 1.0),  # one model: vacuously compatible
        (float("nan"), 0.9, "am_if_ac", 0.99, 0.9),
    ],
)
def test_objective_golden(ac, am, kind, floor, expected):
    assert objective(ac, am, kind, floor) == pytest.approx(expected, abs=1e-12)


def test_objective_rejects_unknown_kind():
    with pytest.raises(ValueError, match="objective"):
        objective(0.5, 0.5, "bc")


@pytest.mark.parametrize("metric", ["cmc@1", "cmc@3", "map", "recall@2"])
@pytest.mark.parametrize("seen", [False, True])
def test_grow_matrix_matches_compat(metric, seen):
    """Rows added one call at a time equal the full matrix of distcl.eval.compat."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 6)  # (24,)
    embs = [rng.normal(size=(24, 5)).astype(np.float32) for _ in range(4)]
    embs = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in embs]
    seen_sets = [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    masks = [np.isin(labels, s) for s in seen_sets] if seen else None
    ref = compat.compatibility_matrix(embs, labels, metric, True, masks)
    M = np.zeros((0, 0))
    for t in (1, 3, 4):  # grow by 1, then 2, then 1 rows
        M = grow_matrix(M, embs[:t], labels, None if masks is None else masks[:t], metric)
    np.testing.assert_allclose(np.tril(M), np.tril(np.nan_to_num(ref)), atol=1e-12)


def test_grow_matrix_rejects_bad_metric_and_shape():
    e = [np.eye(4, dtype=np.float32)]
    with pytest.raises(ValueError, match="eval.metric"):
        grow_matrix(np.zeros((0, 0)), e, np.array([0, 0, 1, 1]), None, "top1")
    with pytest.raises(ValueError, match="M must be"):
        grow_matrix(np.zeros((2, 2)), e, np.array([0, 0, 1, 1]), None, "cmc@1")


# ---------------------------------------------------------------- resources and ASHA
@pytest.mark.parametrize(
    ("requested", "driver", "workers", "cpw", "gpus", "cluster", "expected"),
    [
        (3, 0.1, 1, 1.0, False, {"CPU": 2.0}, 1),  # 1.1 CPU per trial on 2 CPUs
        (1, 0.1, 2, 0.9, False, {"CPU": 2.0}, 1),  # 1.9 fits exactly-ish
        (4, 0.1, 2, 1.0, False, {"CPU": 8.0}, 3),  # floor(8 / 2.1)
        (2, 0.1, 2, 1.0, False, {"CPU": 8.0}, 2),  # not raised above the request
        (8, 0.5, 1, 1.0, True, {"CPU": 16.0, "GPU": 2.0}, 2),  # GPUs bind first
        ("auto", 0.1, 1, 0.9, False, {"CPU": 2.0}, 2),  # packed: 1.0 CPU per trial
        ("auto", 0.1, 2, 0.45, False, {"CPU": 16.0}, 16),  # follows the cluster
    ],
)  # fmt: skip
def test_max_concurrency(requested, driver, workers, cpw, gpus, cluster, expected):
    assert max_concurrency(requested, driver, workers, cpw, gpus, cluster) == expected


def test_max_concurrency_packs_gpu_fractions():
    cluster = {"CPU": 64.0, "GPU": 1.0}
    assert max_concurrency("auto", 0.1, 1, 1.0, True, cluster, gpus_per_worker=0.25) == 4
    assert max_concurrency("auto", 0.1, 2, 1.0, True, cluster, gpus_per_worker=0.25) == 2


def test_max_concurrency_refuses_a_trial_that_cannot_fit():
    with pytest.raises(ValueError, match="workers_per_trial"):
        max_concurrency(1, 0.1, 2, 1.0, False, {"CPU": 2.0})


def _fake_trial(tmp_path: Path, trial_id: str, results: list[dict] | None):
    path = tmp_path / trial_id
    path.mkdir()
    if results is not None:
        (path / "result.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")
    return SimpleNamespace(
        trial_id=trial_id,
        path=str(path),
        local_path=str(path),
        has_reported_at_least_once=results is not None,
    )


def test_task_asha_restores_rungs_from_results(tmp_path):
    """After a restart, a restored trial's reports are back in the rungs: a new trial below
    them is stopped at the first rung, as it would have been without the restart."""
    asha = TaskASHA(time_attr="task", max_t=3, grace_period=1, reduction_factor=2)
    asha.set_search_properties("objective", "max")
    old = _fake_trial(
        tmp_path, "old", [{"task": 1, "objective": 0.9}, {"task": 2, "objective": 0.8}]
    )
    asha.on_trial_add(None, old)
    new = _fake_trial(tmp_path, "new", None)
    asha.on_trial_add(None, new)
    assert asha.on_trial_result(None, new, {"task": 1, "objective": 0.5}) == "STOP"
    # Without the restored rungs the same report continues (the first at its rung).
    plain = TaskASHA(time_attr="task", max_t=3, grace_period=1, reduction_factor=2)
    plain.set_search_properties("objective", "max")
    fresh = _fake_trial(tmp_path, "fresh", None)
    plain.on_trial_add(None, fresh)
    assert plain.on_trial_result(None, fresh, {"task": 1, "objective": 0.5}) == "CONTINUE"


# ---------------------------------------------------------------- results
def _rows():
    return [
        make_row("a", {"train.lr": 0.05}, {"tasks_done": 3, "objective": 0.6, "ac": 0.5,
                                           "am": 0.6, "base": "own"}, None, 3),
        make_row("b", {"train.lr": 0.01}, {"tasks_done": 3, "objective": 0.7, "ac": 1.0,
                                           "am": 0.7, "base": "own"}, None, 3),
        make_row("c", {"train.lr": 0.2}, {"tasks_done": 1, "objective": 0.95,
                                          "ac": float("nan"), "am": 0.95}, None, 3),
        make_row("d", {"train.lr": 0.3}, {}, RuntimeError("boom\nValueError: bad path"), 3),
    ]  # fmt: skip


def test_rows_status_and_best():
    rows = _rows()
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped early", "error"]
    assert rows[3]["error"] == "ValueError: bad path" and math.isnan(rows[3]["objective"])
    # c's objective is higher but over 1 task of 3: not comparable, b wins.
    assert best_row(rows)["trial"] == "b"
    assert best_row([rows[2], rows[3]])["trial"] == "c"
    assert best_row([rows[3]]) is None


def test_table_and_plots_written(tmp_path):
    rows = _rows()
    text = write_table(rows, ["train.lr"], tmp_path)
    assert (
        text.splitlines()[0] == "| trial | status | tasks | objective | ac | am | bc | fc "
        "| base | train.lr | error |"
    )
    assert text.splitlines()[2].startswith("| b | completed | 3 | 0.7 |")  # best first
    assert (tmp_path / "trials.md").read_text() == text
    csv_lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert csv_lines[0] == "trial,status,tasks,objective,ac,am,bc,fc,base,train.lr,error"
    assert len(csv_lines) == 5
    paths = plot_objective(rows, ["train.lr"], ["train.lr"], tmp_path)
    assert paths == [tmp_path / "objective_vs_train.lr.png"] and paths[0].stat().st_size > 1000


def test_best_job_is_a_normal_job(tmp_path, synthetic_raw_job):
    from distcl.tune.results import write_best

    raw = _raw(tmp_path, synthetic_raw_job, {"space": {
        "train.lr": {"type": "choice", "values": [0.01, 0.05]}}})  # fmt: skip
    raw["output"]["root"] = "runs"  # relative paths stay relative in best.yaml
    job = parse_job(raw)
    row = _rows()[1]
    path = write_best(job, row, ["train.lr"], tmp_path)
    best = load_job(path)
    assert best.name == "tiny-best" and best.tune is None
    assert best.train.lr == 0.01 and best.output.root == "runs"
    assert best == best_job(job, {"train.lr": 0.01})
    assert path.read_text().startswith("# Best trial b of `distcl tune` tiny")


@pytest.mark.parametrize("path", sorted((REPO / "jobs").rglob("tune_*.yaml")), ids=lambda p: p.stem)
def test_tune_job_files_validate(path):
    for smoke in (None, True):
        job = load_job(path, smoke=smoke)
        tc = validate_tune(job)
        assert tc.space and job.tune.search in ("optuna", "random", "grid")
    from distcl.data.scenario import _split_classes

    sc = job.scenario  # every Fashion-MNIST class is trained or held out
    groups = _split_classes(list(range(10 - sc.heldout_classes)), sc.tasks, sc.classes_per_task,
                            sc.first_task_classes)  # fmt: skip
    assert sum(map(len, groups)) + sc.heldout_classes == 10


# ---------------------------------------------------------------- real Ray Tune runs
# The search's driver with torch blocked (tests/notorch.py): only the Train workers load it.
LAUNCH = NO_TORCH + ("from distcl.config import load_job\n"
                     "from distcl.tune.search import tune_job\n"
                     "tune_job(load_job(sys.argv[1]), num_cpus=2)\n")  # fmt: skip


def _launch(job_file: Path, log: Path) -> subprocess.Popen:
    # A new local Ray of its own: never a `ray start` cluster another process left running.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    # A new session: the kill below takes the driver and the Ray processes it started.
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(job_file)], cwd=job_file.parent,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started, then any process left in its session."""
    sid = proc.pid
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    ps = ["ps", "-o", "pid=", "-s", str(sid)]
    kill_until_gone(lambda: [int(p) for p in subprocess.run(ps, capture_output=True,
                                                            text=True).stdout.split()])  # fmt: skip


@pytest.fixture(scope="module")
def tuned_search(tmp_path_factory, synthetic_raw_job):
    """The killed-and-resumed search (:func:`_tuned`), started in a thread: it runs in
    processes and a Ray of its own, beside the module's in-process Pareto search (which
    asks for this fixture to start it first); ``tuned`` waits for it."""
    root = tmp_path_factory.mktemp("tune")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(_tuned, root, synthetic_raw_job)
        yield future
        wait([future])  # never leave it running past the module


@pytest.fixture(scope="module")
def tuned(tuned_search):
    return tuned_search.result()


def _tuned(root: Path, synthetic_raw_job) -> SimpleNamespace:
    """A 3-trial grid, one trial at a time, over the metric the objective reads: Recall@10
    first, then CMC@1 and Recall@5, which cannot exceed it on the same models. (How well a
    tiny synthetic model trains is not a reliable ordering: seen here, an lr of 1e-5 beats
    0.05 on one run and loses on the next.) So ASHA stops CMC@1 after task 1 whatever the
    training gives. eval.metric is not a later-only key: no shared base. SIGKILLed once the
    first trial has finished, then started again to completion. Three tasks, graded after
    the second (after the first every metric is 1.0: two well separated classes)."""
    raw = synthetic_raw_job(root, name="tiny", **TINY)
    raw["data"]["synthetic_classes"] = 6
    raw["scenario"]["tasks"] = 3
    raw["output"]["root"] = "runs"
    grid = ["recall@10", "cmc@1", "recall@5"]
    raw["tune"] = {"space": {"eval.metric": {"type": "grid", "values": grid}},
                   "search": "grid", "objective": "am", "grace_tasks": 2,
                   "reduction_factor": 2, "max_concurrent_trials": 1}  # fmt: skip
    job_file = root / "tune_tiny.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    tune_dir = root / "runs" / "tiny-tune"
    t0 = time.monotonic()
    proc = _launch(job_file, root / "first.log")
    try:
        deadline = time.monotonic() + 420
        # With one trial at a time, a second trial's run dir means the first one finished.
        while len(list((tune_dir / "trials").glob("tiny-trial-*"))) < 2:
            assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial did not finish in time"
            time.sleep(1)
    finally:
        _kill_session(proc)
    first = next(
        d
        for d in sorted((tune_dir / "trials").glob("tiny-trial-*"))
        if (d / "models" / "2" / "done.json").is_file()
    )
    # Every finished task of every trial (the one that finished, and any task the next
    # trial had finished when the kill came): none may be trained or embedded again.
    stamps = {p: p.stat().st_mtime_ns for d in (tune_dir / "trials").glob("tiny-trial-*")
              for t in range(3) if (d / "models" / str(t) / "done.json").is_file()
              for p in [*(d / "models" / str(t)).iterdir(),
                        *(d / "eval" / "embeddings" / f"model={t}").iterdir()]}  # fmt: skip
    proc = _launch(job_file, root / "second.log")
    try:
        assert proc.wait(timeout=480) == 0, (root / "second.log").read_text()[-3000:]
    finally:
        _kill_session(proc)
    return SimpleNamespace(
        root=root,
        tune_dir=tune_dir,
        job_file=job_file,
        first=first,
        stamps=stamps,
        seconds=time.monotonic() - t0,
        log=(root / "second.log").read_text(),
    )


@pytest.fixture(scope="module")
def local_ray():
    """One Ray for the module's in-process runs: distcl's embedded Ray (a new local instance,
    never another process's cluster), whose processes find its own dashboard: Ray Train's
    placement-group cleaner asks it about the trials' controllers."""
    import ray

    from distcl.localray import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _leftover_groups(timeout: float = 60.0) -> list:
    """Placement groups not removed, after waiting up to ``timeout`` for them to go."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        left = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


@pytest.fixture(scope="module")
def pareto(tuned_search, tmp_path_factory, synthetic_raw_job, local_ray):
    """A two-objective (AM, BC) grid over LwF's alpha, a weight that acts only from the
    second task on: the first task is trained once for the search. Workers of 0.9 CPU pack
    two trials on 2 CPUs. Then ``--confirm 2``: best and baseline on seeds 0 and 1 (seed 0
    of both read from the search's trials: the grid holds the job's own alpha)."""
    from distcl.tune.search import tune_job

    root = tmp_path_factory.mktemp("pareto")
    raw = synthetic_raw_job(root, name="two", **TINY)
    raw["train"].update(cpus_per_worker=0.9, threads_per_worker=1)
    raw["tune"] = {"space": {"method.params.alpha": {"type": "grid",
                                                     "values": [0.0, 1.0, 2.0]}},
                   "search": "grid", "objectives": ["am", "bc"], "pick": "am",
                   "grace_tasks": 1}  # fmt: skip
    job = parse_job(raw)
    logs: list[str] = []
    t0 = time.monotonic()
    out = tune_job(job, log=logs.append, confirm=2)
    return SimpleNamespace(
        job=job,
        out=out,
        log="\n".join(logs),
        root=root,
        tune_dir=Path(out["tune_dir"]),
        seconds=time.monotonic() - t0,
    )


@pytest.mark.ray
def test_shared_base_task_is_trained_once(pareto):
    trials_dir = pareto.tune_dir / "trials"
    base = trials_dir / "two-base"
    trials = sorted(trials_dir.glob("two-trial-*"))
    assert len(trials) == 3 and "shared base task: yes" in pareto.log
    assert json.loads((base / "base.json").read_text())["files"]  # recorded with sha256
    # One model 0 on disk: every trial holds links to the base's files (same inode), so no
    # trial trained or embedded task 0 itself; its later tasks are its own.
    for rel in ("models/0/model.pt", "models/0/history.json", "models/0/done.json"):
        inodes = {(d / rel).stat().st_ino for d in [base, *trials]}
        assert len(inodes) == 1, rel
    for d in trials:
        assert (d / "models" / "1" / "done.json").is_file()
        assert (d / "models" / "1" / "model.pt").stat().st_ino != (
            base / "models" / "0" / "model.pt").stat().st_ino  # fmt: skip
        parts = list((d / "eval" / "embeddings" / "model=0").glob("*.parquet"))
        assert parts and all(p.stat().st_nlink > 1 for p in parts)
    assert not (base / "models" / "1").exists()  # the base trains only task 0
    rows = list(__import__("csv").DictReader(open(pareto.tune_dir / "trials.csv")))
    assert {r["base"] for r in rows} == {"shared"}
    assert "| shared |" in (pareto.tune_dir / "trials.md").read_text()


@pytest.mark.ray
def test_pareto_front_has_no_dominated_trial(pareto):
    from distcl.tune.pareto import dominates

    rows = list(__import__("csv").DictReader(open(pareto.tune_dir / "trials.csv")))
    done = [r for r in rows if r["status"] == "completed"]
    assert len(done) == 3  # two tasks, one rung (all equal there: the shared task 0)
    pts = {r["trial"]: (float(r["obj_am"]), float(r["obj_bc"])) for r in done}
    front = {r["trial"] for r in done if r["front"] == "yes"}
    assert front
    for r in done:
        beaten = any(dominates(q, pts[r["trial"]]) for q in pts.values())
        assert (r["trial"] in front) == (not beaten)
    # best.yaml: the front trial with the best AM (--pick am)
    best = pareto.out["best"]
    assert best["trial"] in front and best["am"] == max(pts[t][0] for t in front)
    assert load_job(pareto.out["best_job"]).method.params.alpha == best["method.params.alpha"]
    assert (pareto.tune_dir / "pareto.png").stat().st_size > 1000
    assert "front" in (pareto.tune_dir / "trials.md").read_text().splitlines()[0]


@pytest.mark.ray
def test_confirm_reports_two_seeds_per_configuration(pareto):
    c = json.loads((pareto.tune_dir / "confirm.json").read_text())
    assert c["seeds"] == [0, 1]
    assert c["points"]["baseline"] == {"method.params.alpha": 1.0}  # the job's own value
    for m in ("am", "bc"):
        entry = c["summary"][m]
        for v in ("best", "baseline"):
            assert sorted(entry[v]["seeds"]) == ["0", "1"]
            xs = list(entry[v]["seeds"].values())
            assert entry[v]["mean"] == pytest.approx(np.mean(xs))
            assert entry[v]["spread"] == pytest.approx(np.std(xs, ddof=1))
        assert entry["verdict"]
    # Seed 0 of both is the search's own trial of that config (the grid holds the job's
    # alpha = 1.0): read, not run again. Seed 1 of both ran under confirm/, from a shared
    # base of seed 1; no base of seed 0 was trained for the confirmation.
    from distcl.tune.confirm import point_digest

    best = f"two-best-{point_digest(c['points']['best'])}-seed1"
    assert sorted(p.name for p in (pareto.tune_dir / "confirm").glob("two-*-seed*")) == [
        "two-base-seed1", "two-baseline-seed1", best]  # fmt: skip
    for v in ("best", "baseline"):
        for seed in (0, 1):
            d = Path(pareto.out["confirm"]["run_dirs"][f"{v}-seed{seed}"])
            assert (d / "models" / "1" / "done.json").is_file()
            assert (d.parent.name == "trials") == (seed == 0), d
    text = (pareto.tune_dir / "confirm.md").read_text()
    assert "Confirmation on 2 seeds" in text and "spread" in text
    assert "Read from the search's trials" in text
    print(f"Pareto search (3 trials) + confirm (2 runs): {pareto.seconds:.0f}s")


def _alpha(job, alpha: float):
    """The job's method parameters with another alpha (a params model, as a loaded job's)."""
    return job.method.params.model_copy(update={"alpha": alpha})


@pytest.mark.ray
def test_confirm_a_best_file_runs_no_search(pareto, local_ray):
    """``--confirm 1 --best FILE``: no search; FILE's alpha and the job's own on seed 0, both
    run under confirm/ (no search trial to read), from one shared base."""
    from distcl.tune.confirm import point_digest
    from distcl.tune.search import tune_job

    job = pareto.job.model_copy(update={"output": pareto.job.output.model_copy(
        update={"root": str(pareto.root / "confirm-only")})})  # fmt: skip
    best = pareto.job.model_copy(update={"name": "somebest", "tune": None, "method":
        pareto.job.method.model_copy(update={"params": _alpha(pareto.job, 2.0)})})  # fmt: skip
    logs: list[str] = []
    out = tune_job(job, log=logs.append, confirm=1, best_from=best)
    tune_dir = Path(out["tune_dir"])
    assert out["rows"] == [] and not list(tune_dir.glob("trials/two-*"))  # no search
    c = json.loads((tune_dir / "confirm.json").read_text())
    assert c["points"] == {"best": {"method.params.alpha": 2.0},
                           "baseline": {"method.params.alpha": 1.0}}  # fmt: skip
    assert sorted(p.name for p in (tune_dir / "confirm").glob("two-*")) == [
        "two-base",
        "two-baseline-seed0",
        f"two-best-{point_digest(c['points']['best'])}-seed0",
    ]
    assert "one seed" in c["summary"]["am"]["verdict"]
    with pytest.raises(ConfigError, match=r"--best \(somebest\) sets no value"):
        from distcl.tune.confirm import baseline_point

        baseline_point(best, ["method.params.beta"], what="--best (somebest)")
    # Another --best file: its own run dirs; the baseline's finished run is found again.
    other = best.model_copy(update={"method": best.method.model_copy(
        update={"params": _alpha(best, 0.0)})})  # fmt: skip
    model = tune_dir / "confirm" / "two-baseline-seed0" / "models" / "1" / "model.pt"
    before = model.stat().st_mtime_ns
    tune_job(job, log=logs.append, confirm=1, best_from=other)
    assert len(list((tune_dir / "confirm").glob("two-best-*"))) == 2
    assert model.stat().st_mtime_ns == before


@pytest.mark.ray
def test_no_placement_group_is_left(pareto, local_ray):
    """Trials that ended (completed here; ASHA-stopped and failed ones in the other tests)
    leave no Train placement group behind (Ray Train's cleaner removes a stopped trial's)."""
    assert _leftover_groups() == []


@pytest.mark.ray
def test_tuning_resumes_instead_of_starting_over(tuned):
    assert "resuming the tuning run" in tuned.log
    # The finished trial was not trained again: its model files are the ones from before.
    now = {p: p.stat().st_mtime_ns for p in tuned.stamps}
    assert tuned.stamps and now == tuned.stamps
    # The same 3 trials (ids kept across the restart), none added.
    assert len(list((tuned.tune_dir / "trials").glob("tiny-trial-*"))) == 3
    rows = list(__import__("csv").DictReader(open(tuned.tune_dir / "trials.csv")))
    assert len(rows) == 3 and {r["trial"] for r in rows} == {
        d.name.removeprefix("tiny-trial-") for d in (tuned.tune_dir / "trials").glob("tiny-*")
    }


@pytest.mark.ray
def test_asha_stops_a_trial_early_and_no_trial_hangs(tuned):
    rows = list(__import__("csv").DictReader(open(tuned.tune_dir / "trials.csv")))
    by_metric = {r["eval.metric"]: r for r in rows}
    assert by_metric["recall@10"]["status"] == "completed"
    assert by_metric["recall@10"]["tasks"] == "3"
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert by_metric["cmc@1"] in stopped and all(r["tasks"] == "2" for r in stopped), rows
    # Stopped between tasks, inside their one Train run: task 2 finished, task 3 never did.
    for r in stopped:
        d = tuned.tune_dir / "trials" / f"tiny-trial-{r['trial']}"
        assert (d / "models" / "1" / "done.json").is_file()
        assert not (d / "models" / "2").exists()
    assert {r["base"] for r in rows} == {"own"}  # not a later-only key: nothing shared
    # Every trial ended (the run returned within its timeout): none failed, none hung.
    assert all(r["status"] != "error" for r in rows)
    assert (tuned.tune_dir / "trials.md").is_file()
    assert (tuned.tune_dir / "objective_vs_eval.metric.png").stat().st_size > 1000
    print(f"tuning with a kill and a resume: {tuned.seconds:.0f}s")


@pytest.mark.ray
def test_best_job_reproduces_its_trial(tuned, local_ray):
    """``best.yaml`` retrained from scratch scores the trial's objective (same seed: equal
    up to nondeterminism; tolerance 0.05, about one eval item per matrix cell here)."""
    from reference import score_run

    from distcl.train.driver import Run
    from distcl.tune.trial import score_tune

    tune_job = load_job(tuned.job_file)
    best = load_job(tuned.tune_dir / "best.yaml", overrides=[
        f"output.root={tuned.root / 'repro'}"])  # fmt: skip
    assert best.name == "tiny-best" and best.tune is None
    rows = list(__import__("csv").DictReader(open(tuned.tune_dir / "trials.csv")))
    trial = next(r for r in rows if r["eval.metric"] == best.eval.metric)
    assert trial["status"] == "completed"
    run = Run(best, progress=False)
    run.run()
    metrics, M = score_run(run.dir, tune_job.tune, 3)
    assert metrics["objective"] == pytest.approx(float(trial["objective"]), abs=0.05)
    assert metrics["am"] == pytest.approx(float(trial["am"]), abs=0.05)
    # The workers' scorer (the evaluation engine's cached rows) equals the reference.
    fast = score_tune(str(run.dir), 2, tc=tune_job.tune)
    for key in ("ac", "am", "bc", "fc", "objective"):
        assert fast[key] == pytest.approx(metrics[key], abs=1e-9, nan_ok=True)


@pytest.mark.ray
def test_report_tabulates_the_stored_trials_without_running(tuned, local_ray, monkeypatch):
    """``distcl tune --report``: the table and best job of the stored trials; nothing runs."""
    from distcl.tune.search import tune_job

    monkeypatch.chdir(tuned.root)  # the job's output.root is relative
    with open(tuned.tune_dir / "trials.csv") as f:
        before = {r["trial"]: r for r in __import__("csv").DictReader(f)}
    dirs = sorted((tuned.tune_dir / "trials").glob("tiny-trial-*"))
    out = tune_job(load_job(tuned.job_file), report_only=True, log=lambda *a: None)
    assert sorted((tuned.tune_dir / "trials").glob("tiny-trial-*")) == dirs
    rows = {r["trial"]: r for r in out["rows"]}
    assert rows.keys() == before.keys()
    for trial, row in rows.items():
        assert row["objective"] == pytest.approx(float(before[trial]["objective"]))
        assert row["status"] == {"stopped early": "stopped early or unfinished"}.get(
            before[trial]["status"], before[trial]["status"])  # fmt: skip
    best = max((r for r in before.values() if r["status"] == "completed"),
               key=lambda r: float(r["objective"]))  # fmt: skip
    assert load_job(out["best_job"]).eval.metric == best["eval.metric"] == "recall@10"
    other = load_job(tuned.job_file, overrides=["name=never-tuned"])
    with pytest.raises(ValueError, match="no tuning run to report on"):
        tune_job(other, report_only=True, log=lambda *a: None)


@pytest.mark.ray
def test_failed_trial_is_reported_not_fatal(tmp_path, synthetic_raw_job, local_ray):
    """A trial that raises is a row with status error; the other trial still runs."""
    from distcl.tune.search import tune_job

    raw = synthetic_raw_job(tmp_path, name="failing", **TINY)
    raw["scenario"]["max_tasks"] = 1
    good = str(tmp_path / "shards")
    raw["tune"] = {"space": {"data.shards_dir": {
        "type": "grid", "values": ["/proc/distcl-cannot-write-here", good]}},
        "search": "grid", "asha": False}  # fmt: skip
    out = tune_job(parse_job(raw))
    assert _leftover_groups() == []
    rows = {r["data.shards_dir"]: r for r in out["rows"]}
    assert rows["/proc/distcl-cannot-write-here"]["status"] == "error"
    assert "distcl-cannot-write-here" in rows["/proc/distcl-cannot-write-here"]["error"]
    assert rows[good]["status"] == "completed"
    assert out["best"]["data.shards_dir"] == good
    assert load_job(out["best_job"]).data.shards_dir == good


def test_optuna_suggests_inside_the_space(tmp_path, synthetic_raw_job):
    """OptunaSearch (TPE) takes the dotted-key space as is and samples inside it."""
    from ray.tune.search.optuna import OptunaSearch

    job = parse_job(
        _raw(
            tmp_path,
            synthetic_raw_job,
            {
                "space": {
                    "method.params.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                    "train.lr": {"type": "choice", "values": [0.01, 0.05]},
                },
                "search": "optuna",
            },
        )
    )
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("objective", "max", param_space(validate_tune(job)))
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        assert set(config) == {"method.params.alpha", "train.lr"}
        assert 0.1 <= config["method.params.alpha"] <= 10 and config["train.lr"] in (0.01, 0.05)
        trial_job(base_dict(job), config, f"t{i}")  # every suggestion is a valid job


def test_tuning_folder_refuses_another_job(tmp_path, synthetic_raw_job):
    from distcl.tune.search import _check_same_tuning

    raw = _raw(
        tmp_path, synthetic_raw_job, {"space": {"train.lr": {"type": "choice", "values": [0.1]}}}
    )
    (tmp_path / "experiment").mkdir()
    _check_same_tuning(parse_job(raw), tmp_path)
    _check_same_tuning(parse_job(raw), tmp_path)  # the same job resumes
    raw["method"]["params"]["alpha"] = 2.0
    with pytest.raises(ConfigError, match="different job.*method"):
        _check_same_tuning(parse_job(raw), tmp_path)


def test_a_search_on_few_open_probes_is_warned_about(tmp_path, synthetic_raw_job):
    from types import SimpleNamespace

    from distcl.tune.search import _warn_few_probes
    from distcl.tune.space import validate_tune

    space = {"train.lr": {"type": "choice", "values": [0.1]}}
    scen = SimpleNamespace(heldout_classes=(6, 7))
    for probes, warned in ((2, True), (25, False)):
        job = parse_job(_raw(tmp_path, synthetic_raw_job, {"space": space, "protocol": "open"},
                             eval={"probes_per_class": probes}))  # fmt: skip
        lines: list[str] = []
        _warn_few_probes(job, validate_tune(job), scen, lines.append)
        assert bool(lines) is warned, lines
    job = parse_job(_raw(tmp_path, synthetic_raw_job, {"space": space, "protocol": "open"}))
    lines = []
    _warn_few_probes(job, validate_tune(job), scen, lines.append)
    assert "scores 4 probes in all" in lines[0] and "steps of 1/4" in lines[0]


def _start_job(tmp_path, synthetic_raw_job, space, search="optuna"):
    return parse_job(_raw(tmp_path, synthetic_raw_job,
                          {"space": space, "search": search, "start_with_job": True}))  # fmt: skip


def test_start_with_job_is_the_first_suggestion(tmp_path, synthetic_raw_job):
    """``tune.start_with_job``: the first trial runs the job's own values (the baseline)."""
    from ray.tune.search.optuna import OptunaSearch

    from distcl.tune.space import job_point

    space = {"method.params.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
             "train.lr": {"type": "choice", "values": [0.01, 0.05]},
             "train.batch_size_per_worker": {"type": "choice", "values": [8, 16]}}  # fmt: skip
    job = _start_job(tmp_path, synthetic_raw_job, space)
    validate_tune(job)
    point = job_point(job)
    assert point == {"method.params.alpha": 1.0, "train.lr": job.train.lr,
                     "train.batch_size_per_worker": 16}  # fmt: skip
    searcher = OptunaSearch(seed=0, points_to_evaluate=[point])
    assert searcher.set_search_properties("objective", "max", param_space(job.tune))
    assert searcher.suggest("t0") == point
    assert searcher.suggest("t1") != point


@pytest.mark.parametrize(
    ("space", "search", "message"),
    [
        ({"method.params.alpha": {"type": "uniform", "low": 2.0, "high": 3.0}}, "optuna",
         r"job's method.params.alpha = 1.0 lies outside tune.space.method.params.alpha \[2, 3\]"),
        ({"train.batch_size_per_worker": {"type": "choice", "values": [8, 32]}}, "random",
         r"outside tune.space.train.batch_size_per_worker \[8, 32\]"),
        ({"train.lr": {"type": "grid", "values": [0.1, 0.2]}}, "grid", "search 'grid'"),
    ],
)  # fmt: skip
def test_start_with_job_names_a_value_outside_the_space(
    tmp_path, synthetic_raw_job, space, search, message
):
    with pytest.raises(ConfigError, match=f"tune.start_with_job: .*{message}"):
        validate_tune(_start_job(tmp_path, synthetic_raw_job, space, search))


@pytest.mark.ray
def test_an_idle_group_of_the_search_is_removed(local_ray):
    """A placement group of the search's job that nothing uses (a dying Train controller's,
    created after Ray's cleaner stopped looking) is removed after ``idle_s``; a used one
    stays."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from distcl.tune.groups import SweepIdleGroups

    @ray.remote(num_cpus=0.01)
    class Holder:
        def ping(self):
            return 1

    orphan, used = [placement_group([{"CPU": 0.01}]) for _ in range(2)]
    ray.get([orphan.ready(), used.ready()])
    holder = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
    assert ray.get(holder.ping.remote()) == 1
    sweep = SweepIdleGroups(idle_s=60.0)
    assert sweep.sweep(now=1000.0) == []  # idle from now on
    assert sweep.sweep(now=1059.0) == []  # not yet idle_s
    assert sweep.sweep(now=1060.0) == [orphan.id.hex()]
    table = ray.util.placement_group_table()
    assert table[orphan.id.hex()]["state"] == "REMOVED"
    assert table[used.id.hex()]["state"] == "CREATED"
    ray.kill(holder)
    remove_placement_group(used)
