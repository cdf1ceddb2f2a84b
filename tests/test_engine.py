"""The training engine on a real local Ray: DDP, every method end to end, resume, faults.

Run: ``.venv/bin/python -m pytest tests/test_engine.py -q`` (a few minutes on 2 cores: each
run starts one Ray Train worker group for its whole task sequence).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import ray
import torch

from distcl.config import ConfigError
from distcl.localray import scoped_env
from distcl.methods import METHODS
from distcl.pipeline import run_job
from distcl.train.driver import Run, train_env
from distcl.train.modeling import CheckpointError, build_model, load_model_dir

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]  # conftest.py
# Train functions defined here travel to the workers by value (tests/ is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = {
    "data": {"synthetic_classes": 4, "synthetic_train_per_class": 24,
             "synthetic_test_per_class": 6, "shard_size": 24},
    "scenario": {"tasks": 2},
    "model": {"embedding_dim": 8},
    "memory": {"per_class": 4},
    "train": {"epochs": 1, "batch_size_per_worker": 8, "workers": 2, "max_failures": 0},
}  # fmt: skip


def test_idle_task_workers_outlive_a_runs_actors():
    """Ray kills idle workers (after a second) while it has more workers than its soft
    limit, actors counted. Train's workers hold every CPU here, as in a run; the embedded
    Ray's limit (localray.system_config) leaves room for them, so the task workers that a
    run's evaluation uses stay warm (with Ray's default they die within a second)."""

    @ray.remote
    def pid() -> int:
        time.sleep(0.3)  # both tasks at once: two worker processes
        return os.getpid()

    @ray.remote(num_cpus=1)
    class Held:  # as a Train worker: alive, holding a CPU
        def ping(self) -> int:
            return os.getpid()

    workers = set(ray.get([pid.remote() for _ in range(2)]))
    held = [Held.remote() for _ in range(2)]
    assert not workers & set(ray.get([h.ping.remote() for h in held]))
    time.sleep(2.5)
    try:
        assert all(os.path.exists(f"/proc/{p}") for p in workers), workers
    finally:
        for h in held:
            ray.kill(h)


def _ddp_step(config: dict, rank: int) -> list:
    """One SGD step of a small model on this rank's half of a fixed global batch."""
    import ray.train.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.tensor(config["x"]), torch.tensor(config["y"])
    half = len(x) // 2
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    loss = torch.nn.functional.cross_entropy(model(xs), ys)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [p.detach().numpy().tolist() for p in model.module.parameters()]


def _terms(data: dict, rank: int = 0, world: int = 1) -> dict:
    """The batch-spanning terms on this rank's share of a fixed global batch; across ranks
    they see the global batch through the engine's differentiable gather. One rank
    (world 1) is what a 1-worker run computes: no gather, no all-reduce."""
    from distcl import losses
    from distcl.train.loop import global_gather

    gather = global_gather if world > 1 else None
    new = torch.tensor(data["new"], requires_grad=True)
    old, labels = torch.tensor(data["old"]), torch.tensor(data["labels"])
    rows = slice(rank * len(new) // world, (rank + 1) * len(new) // world)
    terms = {
        "batch_hard": losses.batch_hard_triplet_loss(new[rows], labels[rows], 0.3, gather=gather),
        "cvs_triplet": losses.triplet_distillation_loss(new[rows], old[rows], labels[rows], 0.1,
                                                        gather=gather),
        "mmd": losses.mmd(new[rows], old[rows], gather=gather),
    }  # fmt: skip
    sum(terms.values()).backward()
    grad = new.grad.clone()
    if world > 1:  # DDP averages parameter gradients over ranks
        torch.distributed.all_reduce(grad)
        grad /= world
    return {"terms": {k: float(v.detach()) for k, v in terms.items()}, "grad": grad.tolist()}


def _beside() -> list[tuple[str, bool]]:
    """The Ray processes beside this worker (same raylet): (title, is torch loaded)."""
    from pathlib import Path

    def status(pid) -> dict:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)

    raylet = status("self")["PPid"].strip()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if status(proc.name)["PPid"].strip() == raylet:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
                found.append((title, "libtorch" in (proc / "maps").read_text()))
        except (OSError, KeyError):
            continue  # a process that ended meanwhile
    return found


def _two_ranks(config: dict) -> dict:
    import ray.train

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    return {"params": _ddp_step(config["step"], rank), **_terms(config["terms"], rank, world),
            "beside": _beside()}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-worker gloo Train run of distcl's trainer computing the checks below (each fit
    costs seconds)."""
    from ray.train import ScalingConfig

    from distcl.train.trainer import Trainer

    rng = np.random.default_rng(0)
    step = {"x": rng.normal(size=(16, 6)).astype(np.float32).tolist(),
            "y": rng.integers(0, 3, 16).tolist()}  # fmt: skip
    rng = np.random.default_rng(1)
    terms = {"new": rng.normal(size=(12, 5)).tolist(), "old": rng.normal(size=(12, 5)).tolist(),
             "labels": rng.integers(0, 3, 12).tolist()}  # fmt: skip
    with scoped_env(train_env()):  # as distcl's runs: the controller polls every 0.5 s
        result = Trainer(
            _two_ranks, train_loop_config={"step": step, "terms": terms},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        ).fit()  # fmt: skip
    return step, terms, result.return_value


def test_ddp_equals_single_process_on_the_same_global_batch(two_ranks):
    step, _, out = two_ranks
    ddp = [np.asarray(p) for p in out["params"]]
    x, y = np.asarray(step["x"], np.float32), np.asarray(step["y"])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    opt.step()
    single = [p.detach().numpy() for p in model.parameters()]
    # gloo all-reduce averages the two half-batch gradients = the full-batch gradient;
    # only float32 summation order differs.
    for a, b in zip(ddp, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    before = torch.nn.Sequential(torch.nn.Linear(6, 5))
    assert not np.allclose(single[0], before[0].weight.detach().numpy())


def test_the_train_controller_does_not_load_torch(two_ranks):
    # distcl's backend (distcl.train.backend): the controller holds no torch (668 -> 199 MB
    # resident per run and per tuning trial); its workers joined one process group above.
    found = [torch for title, torch in two_ranks[2]["beside"] if "TrainController" in title]
    assert found and not any(found), found  # this run's (and any still exiting)


def _train_controllers() -> dict[str, int]:
    """The live Train controllers of this Ray: actor id -> pid (Ray's State API)."""
    from ray.util.state import list_actors

    from distcl.localray import dashboard_url

    alive = list_actors(
        address=dashboard_url(),
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.actor_id: a.pid for a in alive if a.class_name.endswith("TrainController")}


def test_a_finished_runs_controller_does_not_live_on(two_ranks):
    """The two-rank run's fit ran in the main thread, where Ray Train installs a SIGINT
    handler holding the controller's handle; the Trainer puts the previous handler back,
    so the controller ends with its run instead of living on."""
    handler = signal.getsignal(signal.SIGINT)  # whatever was there before, not Ray Train's
    assert "_register_sigint_handler" not in getattr(handler, "__qualname__", ""), handler
    deadline = time.monotonic() + 30
    while _train_controllers():
        assert time.monotonic() < deadline, _train_controllers()
        time.sleep(0.2)


def _hold(config: dict) -> None:
    with open(config["started"], "w") as f:  # the worker group has started
        f.write("1")
    time.sleep(config["seconds"])


def test_a_dead_train_controller_leaves_no_placement_group(tmp_path):
    """The Train controller SIGKILLed mid-run (as a crash, or Tune killing a trial's actor):
    ``fit`` raises, and Ray Train's placement-group cleaner (Ray's default callbacks, which
    distcl's Trainer keeps) removes the run's group within seconds instead of it holding
    its CPUs for as long as the driver lives. The cleaner asks the State API of the Ray it
    runs in (the embedded Ray names its dashboard to its processes: localray.init_ray)."""
    from ray.train import RunConfig, ScalingConfig

    from distcl.train.trainer import Trainer

    def live_groups() -> set[str]:
        table = ray.util.placement_group_table()
        return {g for g, v in table.items() if v["state"] == "CREATED"}

    started = tmp_path / "started"
    trainer = Trainer(_hold, train_loop_config={"seconds": 600, "started": str(started)},
                      scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(storage_path=str(tmp_path), name="held"))  # fmt: skip
    out: dict = {}

    def fit():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # the controller's death, checked below
            out["error"] = e

    before_groups = live_groups()
    before = _train_controllers()  # none, unless a controller is still exiting
    runner = threading.Thread(target=fit, daemon=True)
    with scoped_env(train_env()):
        runner.start()
        deadline = time.monotonic() + 120
        while not started.exists():  # the worker group started (its group registered)
            assert runner.is_alive() and time.monotonic() < deadline, out
            time.sleep(0.1)
    (pg,) = live_groups() - before_groups
    (pid,) = [pid for i, pid in _train_controllers().items() if i not in before]
    os.kill(pid, signal.SIGKILL)
    runner.join(60)
    assert not runner.is_alive()
    assert isinstance(out.get("error"), ray.exceptions.RayActorError), out
    deadline = time.monotonic() + 30  # the cleaner looks every second
    while ray.util.placement_group_table()[pg]["state"] != "REMOVED":
        assert time.monotonic() < deadline, ray.util.placement_group_table()[pg]
        time.sleep(0.2)


def test_batch_spanning_terms_do_not_depend_on_the_number_of_workers(two_ranks):
    _, data, two = two_ranks
    one = _terms(data)  # what one worker computes, here in the test's process
    for k, v in one["terms"].items():  # the same global-batch loss, float32 rounding apart
        assert two["terms"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # The gradient of the mean loss over the global batch, whatever the workers.
    np.testing.assert_allclose(two["grad"], one["grad"], rtol=1e-4, atol=1e-6)


# finetune runs in a shared module fixture; cvs runs in its herding + blurry variant below.
METHOD_JOBS = {  # finetune, cvs and hoc run in their own tests, fct in the upgrade test
    name: {"method": {"name": name}}
    for name in METHODS
    if name not in ("finetune", "cvs", "hoc", "fct")
}
METHOD_JOBS["finetune+align"] = {"method": {"name": "finetune", "align": [
    {"name": "l2"}, {"name": "projection"}, {"name": "layerwise", "weight": 0.5},
    {"name": "adversarial", "weight": 0.1}, {"name": "kd"}]}}  # fmt: skip
METHOD_JOBS["cvs-herding-blurry"] = {  # and shards decoded in a DataLoader process per rank
    "method": {"name": "cvs"},
    "memory": {"selection": "herding"},
    "scenario": {"setup": "blurry"},
    "train": {"loader_workers": 1},
}


@pytest.fixture(scope="module")
def finetune_run(make_job, tmp_path_factory):
    """One finished 2-task finetune run shared by the tests that only read or resume it.
    Task 2 runs 4 epochs (task 1: one): task 1's log line, which the driver gets by polling
    the progress board every 0.5 s, must come while task 2 runs."""
    train = {**TINY["train"], "first_task_epochs": 1, "epochs": 4}
    job = make_job(tmp_path_factory.mktemp("ft"), name="smoke-finetune", **{**TINY, "train": train})
    logged.clear()
    out = run_job(job, progress=False, log=lambda msg: logged.append((time.time(), msg)))
    return job, out


logged: list[tuple[float, str]] = []  # (time, line) of the finetune run's log


def test_finetune_smoke_run(finetune_run):
    _check_smoke_run("finetune", *finetune_run)


def test_train_runs_poll_fast_and_skip_the_preemption_watcher_on_one_node(
    finetune_run, monkeypatch
):
    assert train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # fmt: skip
    assert not any(k in os.environ for k in train_env())  # set for each fit only
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's value wins
    assert train_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def test_each_task_is_logged_when_it_finishes_without_the_bar(finetune_run):
    """--no-progress (a submitted job's log): task 1's line comes while task 2 runs."""
    job, _ = finetune_run
    first = [when for when, msg in logged if msg.startswith("task 1/2: train_acc")]
    assert len(first) == 1 and sum(m.startswith("task 2/2") for _, m in logged) == 1
    assert first[0] < (job.run_dir / "models" / "1" / "meta.json").stat().st_mtime


@pytest.mark.parametrize("variant", sorted(METHOD_JOBS))
def test_two_task_smoke_run_of_every_method(variant, synthetic_job):
    overrides = {**TINY, **METHOD_JOBS[variant]}
    overrides["scenario"] = {**TINY["scenario"], **METHOD_JOBS[variant].get("scenario", {})}
    overrides["train"] = {**TINY.get("train", {}), **METHOD_JOBS[variant].get("train", {})}
    job = synthetic_job(name=f"smoke-{variant}".replace("+", "-"), **overrides)
    out = run_job(job, progress=False, log=lambda *a: None)
    _check_smoke_run(variant, job, out)


def test_hoc_three_tasks_with_the_iamcl2r_protocol(synthetic_job):
    """HOC on 2 workers over 3 tasks, evaluated as iamcl2r does: probes of held-out classes
    against class templates, strict ECC; the first task is plain cross-entropy, the later
    ones lambda * CE + (1 - lambda) * L_hoc against the frozen previous model."""
    job = synthetic_job(
        name="smoke-hoc", method={"name": "hoc"},
        data={**TINY["data"], "synthetic_classes": 6},
        scenario={"tasks": 3, "heldout_classes": 2, "first_task_classes": 2},
        model={"embedding_dim": 8}, memory={"per_class": 4},
        train={**TINY["train"], "epochs": 1}, eval={"preset": "iamcl2r", "probes_per_class": 3},
    )  # fmt: skip
    out = run_job(job, progress=False, log=lambda *a: None)
    terms = [
        {k for h in json.loads((job.run_dir / "models" / str(t) / "history.json").read_text())
         for k in h if k.startswith("loss/")}
        for t in range(3)
    ]  # fmt: skip
    assert terms[0] == {"loss/ce"} and terms[1] == terms[2] == {"loss/ce", "loss/hoc"}
    meta = json.loads((job.run_dir / "models" / "0" / "meta.json").read_text())
    assert meta["signature"]["head"] == "simplex" and meta["signature"]["num_classes"] == 9
    block = out["eval"]["protocols"]["identification"]
    M = np.asarray(block["matrices"][block["metric"]], dtype=float)
    assert M.shape == (3, 3) and np.all(np.isfinite(M[np.tril_indices(3)]))
    assert block["summary"]["ties"] == "strict" and out["eval"]["preset"] == "iamcl2r"
    assert "AM over the non-zero entries" in (job.run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("method", "dim_change"),
    [("bct", "pad"), ("cl2r", "truncate"), ("cvs", "projection"), ("hoc", "pad"), ("fct", "pad")],
)
def test_a_backbone_and_size_upgrade_trains_evaluates_and_reports(synthetic_job, method,
                                                                  dim_change):  # fmt: skip
    """model.upgrades: the model of task 2 is a ResNet-20 with 16-d embeddings (task 1's a
    ResNet-32 with 8-d ones), trained from scratch with model 1, of its own architecture, as
    the old model; new and old embeddings meet as model.dim_change says, in training and in
    every cross-model entry of the matrices."""
    params = {"inner_dim": 16, "epochs": 3, "batch_size": 32} if method == "fct" else {}
    job = synthetic_job(
        name=f"up-{method}", method={"name": method, "params": params},
        data={**TINY["data"], "synthetic_classes": 6},
        scenario={"tasks": 3, "heldout_classes": 2},
        model={"embedding_dim": 8, "dim_change": dim_change,
               "upgrades": {2: {"backbone": "resnet20", "embedding_dim": 16}}},
        memory={"per_class": 4}, train={**TINY["train"], "epochs": 1},
        eval={"protocols": ["closed", "open", "verification", "identification"],
              "probes_per_class": 3, "verification_pairs": 20},
    )  # fmt: skip
    out = run_job(job, progress=False, log=lambda *a: None)
    metas = [json.loads((job.run_dir / "models" / str(t) / "meta.json").read_text())
             for t in range(3)]  # fmt: skip
    sigs = [m["signature"] for m in metas]
    assert [(s["backbone"], s["embedding_dim"]) for s in sigs] == [
        ("resnet32", 8), ("resnet20", 16), ("resnet20", 16)]  # fmt: skip
    proj = dim_change == "projection"  # a learned map into model 0's space, kept from task 2 on
    assert [s.get("compat_dim") for s in sigs] == [None, 8, 8] if proj else [None] * 3
    assert (job.run_dir / "models" / "1" / "compat.npy").exists() == proj
    if method == "fct":  # h_1 maps 8-d rows of model 0 to 16-d rows of model 1, h_2 16 -> 16
        for t, (d_old, d_new) in ((1, (8, 16)), (2, (16, 16))):
            info = json.loads((job.run_dir / "models" / str(t) / "transform.json").read_text())
            assert (info["signature"]["old_dim"], info["signature"]["new_dim"]) == (d_old, d_new)
            assert info["export_max_abs_error"] < 1e-4 and len(info["history"]) == 3
            assert all(np.isfinite(info["history"][-1][k]) for k in ("mse", "disc", "sigma"))
            assert (job.run_dir / "models" / str(t) / "transform.npz").is_file()
            hist = json.loads((job.run_dir / "models" / str(t) / "history.json").read_text())
            assert all(h["replay_rows"] > 0 for h in hist)  # the new model trains as ER
        assert not (job.run_dir / "models" / "0" / "transform.npz").exists()
        assert "transformed" in out["eval"]["protocols"]
    else:
        hist = json.loads((job.run_dir / "models" / "1" / "history.json").read_text())
        old_term = {"bct": "loss/influence", "cl2r": "loss/feat_distill", "cvs": "loss/triplet",
                    "hoc": "loss/hoc"}[method]  # fmt: skip
        assert old_term in hist[0] and np.isfinite(hist[0][old_term])  # across the upgrade
        assert "transformed" not in out["eval"]["protocols"]
    for proto, block in out["eval"]["protocols"].items():
        M = np.asarray(block["matrices"][block["metric"]], dtype=float)
        assert M.shape == (3, 3) and np.isfinite(M[np.tril_indices(3)]).all(), proto
    assert all(np.isfinite(r["cmc@1"]) for r in out["eval"]["stale_gallery"])
    assert "## Compatibility matrix" in (job.run_dir / "report.md").read_text()
    # Model 1 is not model 0's architecture: loading one into the other names the field.
    from distcl.train.modeling import load_frozen_model

    old = load_frozen_model(job.run_dir / "models" / "0", job)  # its own saved signature
    assert old.embedding_dim == 8 and old.backbone_name == "resnet32"
    with pytest.raises(CheckpointError, match="checkpoint backbone=resnet32 but job says resnet20"):
        load_model_dir(build_model(job, 6, 1, task=1), job.run_dir / "models" / "0")


def _check_smoke_run(variant, job, out):
    run_dir = job.run_dir
    for t in (0, 1):
        meta = json.loads((run_dir / "models" / str(t) / "meta.json").read_text())
        assert meta["task"] == t and meta["method"] == job.method.name
        assert meta["loader_workers"] == job.train.loaders()  # 1 in the cvs variant
        hist = json.loads((run_dir / "models" / str(t) / "history.json").read_text())
        assert all(np.isfinite(v) for h in hist for k, v in h.items() if k.startswith("loss/"))
    assert (run_dir / "report.md").is_file() and (run_dir / "compat_all.png").is_file()
    M = np.asarray(out["eval"]["protocols"]["all"]["matrices"]["cmc@1"])
    assert M.shape == (2, 2) and np.all((M[np.tril_indices(2)] >= 0) & (M[np.tril_indices(2)] <= 1))
    terms = {k for h in hist for k in h if k.startswith("loss/")}
    expected = {
        "bct": "loss/influence",
        "cvs-herding-blurry": "loss/triplet",
        "cl2r": "loss/feat_distill",
        "mmd": "loss/mmd",
        "lwf": "loss/kd",
        "finetune+align": "loss/align_adversarial",
        "joint": "loss/ce",
        "finetune": "loss/ce",
        "er": "loss/ce",
    }
    assert expected[variant] in terms, terms
    if variant == "finetune+align":
        assert {f"loss/align_{n}" for n in ("l2", "projection", "layerwise", "kd")} <= terms
    if variant.startswith("cvs"):
        assert "loss/coherence" in terms
    # Every rank wrote its own part; together they hold each evaluation item once per model.
    import pyarrow.parquet as pq

    for t in (0, 1):
        parts = sorted((run_dir / "eval" / "embeddings" / f"model={t}").glob("part-*.parquet"))
        assert [p.name for p in parts] == ["part-0.parquet", "part-1.parquet"]
        ids = [i for p in parts for i in pq.read_table(p, columns=["item_id"])[0].to_pylist()]
        assert len(ids) == len(set(ids)) == 4 * 6  # 4 classes x 6 test items
        assert json.loads((run_dir / "models" / str(t) / "done.json").read_text())["workers"] == 2
    replays = variant.startswith(("cvs", "cl2r", "bct", "er"))  # memory rows in every batch
    assert all((h["replay_rows"] > 0) == replays for h in hist), hist
    if replays:
        assert (run_dir / "memory").is_dir()
        # Exemplar candidates are embedded only where something uses their features (CVS's
        # class means, herding); random selection reads their labels and stores none.
        files = sorted((run_dir / "memory").glob("task*-shard*.npz"))
        assert [f.name[:8] for f in files] == ["task0000", "task0001"]
        for f in files:
            with np.load(f) as z:
                assert len(z["labels"]) == len(z["images"]) == len(z["embeddings"]) > 0
                width = z["embeddings"].shape[1]
            assert width == (8 if variant.startswith("cvs") else 0), (f.name, width)


def test_the_runs_of_a_process_share_one_progress_board_a_page_each(finetune_run):
    from distcl.train.progress import RunProgress, progress_board

    board = progress_board()
    assert progress_board() is board  # the finetune run's, and every later run's here
    a, b = RunProgress(board, "a"), RunProgress(board, "b")
    a.update(task=1, epoch=0)
    b.task_done(0, {"train_s": 1.5})
    assert ray.get(a.get()) == {"task": 1, "epoch": 0, "finished": {}}
    assert ray.get(b.get()) == {"finished": {0: {"train_s": 1.5}}}
    a.end()
    assert ray.get(a.get()) == {"finished": {}} and ray.get(b.get())["finished"]
    run_id = Run(finetune_run[0], progress=False).run_id
    assert ray.get(RunProgress(board, run_id).get()) == {"finished": {}}  # ended with its run


def test_rerun_skips_finished_tasks_and_other_jobs_are_refused(finetune_run, make_job):
    job, _ = finetune_run
    model_pt = job.run_dir / "models" / "1" / "model.pt"
    before = model_pt.stat().st_mtime_ns
    lines = []
    run_job(job, progress=False, evaluate=False, log=lines.append)
    assert model_pt.stat().st_mtime_ns == before
    assert sum("done, skipped" in line for line in lines) == 2

    other = make_job(
        job.output.root.rsplit("/runs", 1)[0], name=job.name, sets=["train.lr=0.01"], **TINY
    )
    with pytest.raises(ConfigError, match="different job.*train"):
        Run(other, progress=False).prepare()


def test_checkpoint_of_another_job_or_architecture_is_refused(finetune_run, synthetic_job):
    job, _ = finetune_run
    model_dir = job.run_dir / "models" / "0"
    model = build_model(job, 4, 1)
    load_model_dir(model, model_dir, job_name="smoke-finetune")
    with pytest.raises(CheckpointError, match="job 'smoke-finetune', not 'other'"):
        load_model_dir(model, model_dir, job_name="other")
    wider = synthetic_job(name="ckpt", sets=["model.embedding_dim=12"], **TINY)
    with pytest.raises(CheckpointError, match="embedding_dim"):
        load_model_dir(build_model(wider, 4, 1), model_dir)
    assert os.path.exists(model_dir / "model.pt")


def test_bct_upgrades_backbone_against_an_external_old_model(finetune_run, synthetic_job):
    old_job, _ = finetune_run
    old_dir = str(old_job.run_dir / "models" / "0")  # resnet32, embedding_dim 8
    bad = synthetic_job(
        name="bct-bad",
        sets=["model.embedding_dim=12"],
        **{**TINY, "method": {"name": "bct", "params": {"old_model_dir": old_dir}}},
    )
    with pytest.raises(ConfigError, match="old_model_dir.*embedding_dim=12"):
        Run(bad, progress=False).prepare()
    job = synthetic_job(
        name="bct-upgrade",
        sets=["scenario.max_tasks=1"],
        **{
            **TINY,
            "model": {"backbone": "resnet18", "embedding_dim": 8},
            "method": {"name": "bct", "params": {"old_model_dir": old_dir}},
        },
    )
    run_job(job, progress=False, evaluate=False, log=lambda *a: None)
    meta = json.loads((job.run_dir / "models" / "0" / "meta.json").read_text())
    hist = json.loads((job.run_dir / "models" / "0" / "history.json").read_text())
    assert meta["signature"]["backbone"] == "resnet18"
    assert "loss/influence" in hist[-1]  # the resnet32 classifier judged resnet18 embeddings


def test_bench_sequence_runs_a_job_in_both_shapes(tmp_path, synthetic_raw_job):
    """``distcl bench sequence --job FILE`` end to end on a 2-task job (no timing
    assertions: the test checks that it runs and that its figures add up)."""
    import yaml

    from distcl.bench.sequence import format_sequence_bench, run_sequence_bench

    raw = synthetic_raw_job(  # 2 epochs: a task's first epoch is checkpointed, its last not
        tmp_path, name="seq", **{**TINY, "train": {**TINY["train"], "workers": 1, "epochs": 2}}
    )
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = run_sequence_bench(job_file=str(path), log=lambda *a: None)
    assert (r["tasks"], r["workers"], r["job"]) == (2, 1, str(path))
    for shape in ("per_task", "one_run"):
        s = r[shape]
        assert s["wall_s"] > s["train_s"] > 0
        assert s["overhead_per_task_s"] == pytest.approx((s["wall_s"] - s["train_s"]) / 2)
    assert len(r["one_run"]["end_task_vs_train"]) == 2
    assert r["wall_ratio_one_run_vs_per_task"] == pytest.approx(
        r["one_run"]["wall_s"] / r["per_task"]["wall_s"])  # fmt: skip
    for b in r["breakdown"]:  # every part measured; no part counted twice (other >= 0)
        assert b["steps_s"] > 0 and b["prepare_s"] > 0 and b["checkpoint_s"] > 0
        assert b["save_s"] > 0 and b["end_task_s"] > 0 and b["other_s"] >= 0
        assert b["report_s"] == pytest.approx(0.0, abs=0.01)  # a task report: trials only
    assert sum(b["wall_s"] for b in r["breakdown"]) < r["one_run"]["wall_s"]
    once = r["run_overhead"]  # one node: rank 0's clock is this machine's
    assert set(once) == {"startup_s", "setup_s", "shutdown_s"} and min(once.values()) > 0
    assert sum(once.values()) + sum(b["wall_s"] for b in r["breakdown"]) < r["one_run"]["wall_s"]
    text = format_sequence_bench(r)
    assert "end-of-task / training time per task" in text and "task  1:" in text
    assert not list(tmp_path.glob("runs/seq*"))  # the bench's runs live in its temp folder


def test_a_50_task_sequence_trains_evaluates_and_reports(synthetic_job):
    """50 tasks of a general sequence on 6 synthetic classes (recurrences after the sixth),
    CL2R with its memory, one worker: every task trained and evaluated, the report
    summarised (row table, heatmap with sparse ticks, AM/AC/BC curves), the memory's files
    compacted (not one per task)."""
    job = synthetic_job(
        name="long50", method={"name": "cl2r"},
        data={"synthetic_classes": 6, "synthetic_train_per_class": 100,
              "synthetic_test_per_class": 10, "shard_size": 64},
        scenario={"setup": "general", "tasks": 50, "recur_prob": 0.15},
        model={"embedding_dim": 8}, memory={"per_class": 2},
        train={"epochs": 1, "batch_size_per_worker": 8, "workers": 1, "max_failures": 0},
    )  # fmt: skip
    out = run_job(job, progress=False, log=lambda *a: None)
    block = out["eval"]["protocols"]["all"]
    M = np.asarray(block["matrices"]["cmc@1"], dtype=float)
    assert M.shape == (50, 50) and np.isfinite(M[np.tril_indices(50)]).all()
    report = (job.run_dir / "report.md").read_text()
    assert "| query model | M[i][i] | row mean (j < i) |" in report and "| φ50 |" in report
    assert "| φ7 |" not in report  # every 5th row only
    assert (job.run_dir / "summary_all.png").stat().st_size > 1000
    memory = list((job.run_dir / "memory").iterdir())
    assert len(memory) < 20, sorted(p.name for p in memory)
    assert any(p.name.startswith("compact-") for p in memory)
