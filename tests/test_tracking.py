"""Experiment tracking against a real MLflow server (``tests/mlflowserver.py``: full mlflow of
.venv-mlflow on 127.0.0.1, SQLite in a temp folder) and TensorBoard event files read back:
a tracked run's parameters, epochs, matrix rows and artifacts; a resumed run continuing its
tracked run; the server gone mid-run; a search as a parent run with its trials; a
comparison as one run; the errors a user meets at load and start time.

Run: ``.venv/bin/python -m pytest tests/test_tracking.py -q``
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from mlflowserver import start_server

from distcl.config import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]

SMALL = {
    "data": {"synthetic_classes": 4, "synthetic_train_per_class": 16},
    "scenario": {"tasks": 2},
    "train": {"epochs": 2},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.stop()


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, experiment, filter_string=""):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string)


def test_a_tracked_run_logs_params_epochs_rows_and_artifacts_and_resumes(server, synthetic_job):
    """A 2-task run: the job as parameters, tags, each epoch's loss terms (step = epochs so
    far), each task's matrix row and summaries (step = task), the report and metrics.json as
    artifacts. Run again after model 2 is deleted: the same MLflow run continues (one run in
    the experiment, its id kept in tracking.json)."""
    from distcl.pipeline import run_job

    job = synthetic_job(name="tracked", **SMALL,
                        output={"tracking": "mlflow", "tracking_uri": server.uri,
                                "experiment": "t-run"})  # fmt: skip
    logs = []
    run_job(job, progress=False, log=logs.append)
    (run,) = _runs(server.uri, "t-run")
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    p = run.data.params
    assert p["method.name"] == "finetune" and p["train.epochs"] == "2" and p["seed"] == "0"
    assert run.data.tags["distcl.method"] == "finetune" and "distcl.version" in run.data.tags
    client = _client(server.uri)
    ce = client.get_metric_history(run.info.run_id, "train.loss.ce")
    assert sorted(m.step for m in ce) == [0, 1, 2, 3]  # 2 tasks x 2 epochs
    assert {m.step for m in client.get_metric_history(run.info.run_id, "task.train_s")} == {0, 1}
    diag = client.get_metric_history(run.info.run_id, "all.cmc_at_1.diagonal")
    assert sorted(m.step for m in diag) == [0, 1]
    assert "all.cmc_at_1.M_2_1" in run.data.metrics and "all.cmc_at_1.ac" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "metrics.json"} <= arts and any(a.endswith(".png") for a in arts)
    state = (job.run_dir / "tracking.json").read_text()
    assert run.info.run_id in state
    # resumed: task 2 trained again, into the same tracked run
    shutil.rmtree(job.run_dir / "models" / "1")
    run_job(job, progress=False, log=logs.append)
    (again,) = _runs(server.uri, "t-run")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    ce = client.get_metric_history(run.info.run_id, "train.loss.ce")
    # task 2 resumed from its epoch-1 checkpoint: its last epoch again, in the same run
    assert sorted(m.step for m in ce) == [0, 1, 2, 3, 3]
    assert any("continuing MLflow run" in m for m in logs)


def test_the_server_gone_mid_run_leaves_a_finished_run_and_a_warning(tmp_path, synthetic_job):
    from distcl.pipeline import run_job

    srv = start_server(tmp_path / "mlflow")
    job = synthetic_job(name="orphan", **SMALL,
                        output={"tracking": "mlflow", "tracking_uri": srv.uri})  # fmt: skip
    logs = []

    def log(msg):  # the server goes away once the run is created, before training
        logs.append(msg)
        if msg.startswith("tracking: MLflow run"):
            srv.stop()

    with pytest.warns(RuntimeWarning, match="the run goes on untracked"):
        out = run_job(job, progress=False, log=log)
    assert (job.run_dir / "metrics.json").exists() and (job.run_dir / "report.md").exists()
    assert out["eval"]["tasks"] == 2
    assert any("failed" in m and "untracked" in m for m in logs)


def test_an_unreachable_server_fails_before_ray_starts(tmp_path, synthetic_job, monkeypatch):
    import socket

    from distcl import localray
    from distcl.pipeline import run_job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    job = synthetic_job(name="nowhere", output={"tracking": "mlflow", "tracking_uri": uri})
    started = []
    monkeypatch.setattr(localray, "init_ray", lambda *a, **k: started.append(1))
    with pytest.raises(ValueError, match=f"output.tracking_uri: the MLflow tracker at {uri}"):
        run_job(job, progress=False, log=lambda *a: None)
    assert not started and not job.run_dir.exists()


def test_mlflow_without_its_client_fails_at_load_naming_the_extra(synthetic_job, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match=r"distcl\[tracking\]"):
        synthetic_job(output={"tracking": "mlflow"})


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``folder`` (tensorboardX's protobuf, TFRecord
    framing: length, CRC, event, CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        with open(f, "rb") as fh:
            while (head := fh.read(12)) and len(head) == 12:
                n = struct.unpack("<Q", head[:8])[0]
                ev = event_pb2.Event.FromString(fh.read(n))
                fh.read(4)
                for v in ev.summary.value:
                    if v.HasField("simple_value"):
                        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_event_files_hold_the_epochs_and_the_matrix(synthetic_job):
    from distcl.pipeline import run_job

    job = synthetic_job(name="tb", **SMALL, output={"tracking": "tensorboard"})
    run_job(job, progress=False, log=lambda *a: None)
    train = _scalars(job.run_dir / "tensorboard" / "train")
    assert sorted(s for s, _ in train["train.loss.ce"]) == [0, 1, 2, 3]
    ev = _scalars(job.run_dir / "tensorboard" / "eval")
    assert sorted(s for s, _ in ev["all.cmc_at_1.diagonal"]) == [0, 1]
    assert "all.cmc_at_1.am" in ev


def test_a_search_is_a_parent_run_with_a_child_per_trial(server, synthetic_job):
    from distcl.tune.search import tune_job

    job = synthetic_job(
        name="tsearch", data=SMALL["data"], scenario=SMALL["scenario"],
        method={"name": "lwf"}, train={"epochs": 1, "workers": 1},
        output={"tracking": "mlflow", "tracking_uri": server.uri, "experiment": "t-tune"},
        tune={"space": {"method.params.alpha": {"type": "grid", "values": [0.5, 2.0]}},
              "search": "grid", "asha": False, "max_concurrent_trials": 1},
    )  # fmt: skip
    tune_job(job, log=lambda *a: None)
    runs = _runs(server.uri, "t-tune")
    (parent,) = [r for r in runs if r.data.tags.get("distcl.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3  # no run per trial's Train workers
    assert {c.data.params["method.params.alpha"] for c in children} == {"0.5", "2.0"}
    assert all(c.data.tags.get("distcl.status") == "completed" for c in children)
    arts = {a.path for a in _client(server.uri).list_artifacts(parent.info.run_id)}
    assert "trials.md" in arts and "best.yaml" in arts
    assert parent.info.status == "FINISHED"


def test_a_comparison_is_one_run(server, synthetic_job, tmp_path):
    from distcl.pipeline import compare_jobs

    out = {"tracking": "mlflow", "tracking_uri": server.uri, "experiment": "t-compare"}
    jobs = [synthetic_job(name=f"c-{m}", **SMALL, method={"name": m}, output=out)
            for m in ("finetune", "lwf")]  # fmt: skip
    compare_jobs(jobs, tmp_path / "cmp", log=lambda *a: None)
    runs = _runs(server.uri, "t-compare")
    (cmp,) = [r for r in runs if r.data.tags.get("distcl.kind") == "compare"]
    assert len(runs) == 3  # the two jobs' runs and the comparison
    assert (
        "c-lwf.am_all" in cmp.data.metrics and cmp.data.params["jobs"] == '["c-finetune", "c-lwf"]'
    )
    arts = {a.path for a in _client(server.uri).list_artifacts(cmp.info.run_id)}
    assert {"compare.md", "compare.json", "compare.png"} <= arts
