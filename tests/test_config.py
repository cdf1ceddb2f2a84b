"""Tests of distcl.config: YAML job files into typed frozen configs, ``--set`` overrides,
smoke variants, and errors that name the field and the file. Every job file under jobs/
is loaded (plain and smoke) by a test parametrised over the glob.

Run: ``.venv/bin/python -m pytest tests/test_config.py -q``
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from distcl.config import (
    SMOKE,
    ConfigError,
    JobConfig,
    dump_job,
    load_job,
    parse_job,
)

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(
    p.relative_to(REPO).as_posix()
    for p in (REPO / "jobs").rglob("*")
    if p.suffix in (".yaml", ".yml")
)

QUICK = """\
name: quick
seed: 3
data: {source: synthetic, train_per_class: 20, shard_size: 100}
scenario: {setup: blurry, tasks: 4, blurry_fraction: 0.2}
model: {backbone: resnet32, embedding_dim: 32}
method: {name: finetune}
memory: {per_class: 10, selection: herding}
train: {epochs: 3, batch_size_per_worker: 32, lr: 0.1, workers: 2}
eval: {metric: map, topk: [1, 10]}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading


def test_load_typed_values(tmp_path):
    job = load_job(write(tmp_path, QUICK))
    assert isinstance(job, JobConfig)
    assert job.name == "quick" and job.seed == 3 and job.smoke is False
    assert job.data.source == "synthetic" and job.data.train_per_class == 20
    assert job.scenario.setup == "blurry" and job.scenario.blurry_fraction == 0.2
    assert job.train.lr == 0.1 and isinstance(job.train.lr, float)
    assert job.eval.topk == (1, 10)  # YAML list -> tuple
    assert job.memory.selection == "herding"
    # Untouched fields keep their defaults.
    assert job.train.momentum == 0.9 and job.tune is None
    assert job.run_dir == Path("runs") / "quick"


def test_int_accepted_where_float_expected(tmp_path):
    job = load_job(write(tmp_path, QUICK), overrides=["train.lr=1"])
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float)


def test_frozen_picklable_and_dump_round_trip(tmp_path):
    job = load_job(write(tmp_path, QUICK))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.seed = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.train.epochs = 4  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(job)) == job
    again = parse_job(yaml.safe_load(dump_job(job)), "dumped")
    assert again == job


def test_overrides(tmp_path):
    job = load_job(
        write(tmp_path, QUICK),
        overrides=[
            "train.epochs=7",
            "scenario.setup=general",
            "data.train_per_class=null",
            "eval.topk=[1, 2, 3]",
            "tune.num_samples=4",  # creates a section the file does not have
            "seed= 11",
        ],
    )
    assert job.train.epochs == 7
    assert job.scenario.setup == "general"
    assert job.data.train_per_class is None
    assert job.eval.topk == (1, 2, 3)
    assert job.tune is not None and job.tune.num_samples == 4
    assert job.seed == 11


def test_per_task_epochs_and_lr():
    from distcl.config import TrainConfig

    t = TrainConfig(epochs=3, first_task_epochs=5, lr=0.05, later_lr=0.01)
    assert [t.epochs_for(i) for i in range(3)] == [5, 3, 3]
    assert [t.lr_for(i) for i in range(3)] == [0.05, 0.01, 0.01]
    t = TrainConfig(epochs=2, lr=0.1)  # unset: every task alike
    assert [t.epochs_for(i) for i in range(2)] == [2, 2]
    assert [t.lr_for(i) for i in range(2)] == [0.1, 0.1]


def test_smoke_shrinks_any_job(tmp_path):
    path = write(tmp_path, QUICK)
    job = load_job(path, smoke=True)
    assert job.smoke is True
    assert job.scenario.max_tasks == 2
    assert job.train.epochs == 1 and job.train.first_task_epochs == 1
    assert job.data.train_per_class == SMOKE["data"]["train_per_class"]
    assert job.data.shard_size == SMOKE["data"]["shard_size"]
    # The same via the file's own `smoke: true`, and smoke=False wins over the file.
    smoky = write(tmp_path, QUICK + "smoke: true\n", "smoky.yaml")
    assert load_job(smoky) == job
    assert load_job(smoky, smoke=False) == load_job(path)


def test_explicit_set_beats_smoke(tmp_path):
    job = load_job(write(tmp_path, QUICK), overrides=["train.epochs=2"], smoke=True)
    assert job.train.epochs == 2
    assert job.scenario.max_tasks == 2  # the rest of smoke still applies


def test_fingerprint_tracks_data_scenario_seed_only(tmp_path):
    path = write(tmp_path, QUICK)
    base = load_job(path)
    assert base.data_fingerprint() == load_job(path).data_fingerprint()
    assert base.data_fingerprint() == load_job(path, ["train.epochs=9"]).data_fingerprint()
    for change in ("seed=4", "scenario.tasks=2", "data.shard_size=50"):
        assert load_job(path, [change]).data_fingerprint() != base.data_fingerprint(), change
    assert base.shards_dir == Path("runs") / "shards" / base.data_fingerprint()
    assert load_job(path, ["data.shards_dir=/x/y"]).shards_dir == Path("/x/y")


def test_synthetic_job_fixture(synthetic_job, tmp_path):
    job = synthetic_job(scenario={"tasks": 2}, seed=5, sets=["train.epochs=3"])
    assert job.data.source == "synthetic" and job.scenario.tasks == 2 and job.seed == 5
    assert job.train.epochs == 3
    assert Path(job.output.root).is_relative_to(tmp_path)
    assert job.shards_dir.is_relative_to(tmp_path)


# ---------------------------------------------------------------- errors


def error_of(tmp_path: Path, text: str, overrides=(), name: str = "bad.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides=overrides)
    message = str(info.value)
    assert str(path) in message, message  # every error names the file
    return message


def test_unknown_key_names_field_and_file(tmp_path):
    message = error_of(tmp_path, QUICK.replace("epochs: 3", "epoch: 3"))
    assert "train.epoch" in message and "epochs" in message  # lists the known fields
    message = error_of(tmp_path, QUICK + "datta: {}\n")
    assert "'datta'" in message


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [
        ("epochs: 3", "epochs: three", "train.epochs", "expected an integer"),
        ("epochs: 3", "epochs: true", "train.epochs", "expected an integer"),
        ("lr: 0.1", "lr: true", "train.lr", "expected a number"),
        ("setup: blurry", "setup: mixed", "scenario.setup", "is not one of"),
        ("per_class: 10", "per_class: 1.5", "memory.per_class", "expected an integer"),
        ("topk: [1, 10]", "topk: 5", "eval.topk", "expected a list"),
    ],
)
def test_mistyped_value_names_field(tmp_path, old, new, field, words):
    message = error_of(tmp_path, QUICK.replace(old, new))
    assert field in message and words in message


def test_section_must_be_mapping(tmp_path):
    message = error_of(tmp_path, QUICK.replace("eval: {metric: map, topk: [1, 10]}", "eval: 3"))
    assert "eval" in message and "mapping" in message


def test_missing_name(tmp_path):
    message = error_of(tmp_path, QUICK.replace("name: quick\n", ""))
    assert "missing field 'name'" in message


def test_empty_file_names_missing_name(tmp_path):
    assert "missing field 'name'" in error_of(tmp_path, "")


def test_not_a_mapping_and_not_yaml(tmp_path):
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "not valid YAML" in error_of(tmp_path, "name: [unclosed\n")


def test_no_such_file(tmp_path):
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("train.epochs", "expected key=value"),
        ("name.x=1", "'name' is not a section"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.nope=1", "unknown field 'train.nope'"),
    ],
)
def test_bad_set(tmp_path, item, words):
    message = error_of(tmp_path, QUICK, overrides=[item])
    assert words in message


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("scenario.tasks=0", "scenario.tasks"),
        ("train.workers=0", "train.workers"),
        ("scenario.blurry_fraction=1.0", "scenario.blurry_fraction"),
        ("train.lr=0", "train.lr"),
        ("train.later_lr=-0.1", "train.later_lr"),
        ("memory.replay_fraction=1.5", "memory.replay_fraction"),
        ("method={name: cl2r, params: {replay_fraction: 1.0}}", "method.params.replay_fraction"),
        ("name=a/b", "name"),
        ("method.name=nope", "method.name"),
        ("method.params.lambda=1.0", "method.params"),  # finetune takes no weights
    ],
)
def test_semantic_errors_name_field(tmp_path, item, field):
    assert field in error_of(tmp_path, QUICK, overrides=[item])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="<inline>: missing field 'name'"):
        parse_job({}, "<inline>")


# ---------------------------------------------------------------- every job in jobs/


def test_jobs_folder_not_empty():
    assert "jobs/quickstart.yaml" in JOB_FILES


@pytest.mark.parametrize("path", JOB_FILES)
def test_job_file_loads(path):
    job = load_job(REPO / path)
    assert job.name
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.mark.parametrize("path", JOB_FILES)
def test_job_file_loads_smoke(path):
    job = load_job(REPO / path, smoke=True)
    assert job.smoke is True and job.train.epochs == 1
    assert job.scenario.max_tasks is not None and job.scenario.max_tasks <= 2
