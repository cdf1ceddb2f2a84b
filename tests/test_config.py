"""Tests of distcl.config: YAML job files into typed frozen configs, ``--set`` overrides,
smoke variants, and errors that name the field and the file. Every job file under jobs/
is loaded (plain and smoke) by a test parametrised over the glob.

Run: ``.venv/bin/python -m pytest tests/test_config.py -q``
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

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
    with pytest.raises(ValidationError, match="frozen"):
        job.seed = 4  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
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


def test_loader_workers_and_threads_share_the_worker_cpus():
    from distcl.config import TrainConfig

    assert (TrainConfig().loaders(), TrainConfig().threads()) == (0, 1)  # 1 CPU: in-process
    t = TrainConfig(cpus_per_worker=6.0)  # auto: 5 loaders + 1 compute thread
    assert (t.loaders(), t.threads()) == (5, 1)
    t = TrainConfig(cpus_per_worker=16.0, loader_workers=4)  # 4 loaders, 12 threads
    assert (t.loaders(), t.threads()) == (4, 12)
    assert TrainConfig(cpus_per_worker=32.0).loaders() == 8  # auto caps at 8
    assert TrainConfig(cpus_per_worker=6.0, threads_per_worker=2).threads() == 2
    assert TrainConfig(cpus_per_worker=0.9).loaders() == 0  # a fraction: in-process
    with pytest.raises(ValidationError):
        TrainConfig(loader_workers=-1)


def test_gpu_fraction_needs_one_worker(tmp_path):
    from distcl.config import TrainConfig

    assert TrainConfig(gpus_per_worker=0.25, workers=1).gpus_per_worker == 0.25
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "train": {"gpus_per_worker": 0.5}}))
    with pytest.raises(ConfigError, match=r"train.gpus_per_worker: 0.5 .* train.workers: 1"):
        load_job(path)  # the default is 2 workers
    path.write_text(yaml.safe_dump({"name": "g", "train": {"gpus_per_worker": 1.5}}))
    with pytest.raises(ConfigError, match="train.gpus_per_worker"):
        load_job(path)


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


# ---------------------------------------------------------------- every field, every range


def _sections():
    """(section name, model class) for every section of a job, the method's params included."""
    from distcl.catalog import SPECS
    from distcl.config import JobConfig

    out = []
    for name, field in JobConfig.model_fields.items():
        ann = field.annotation
        for cls in getattr(ann, "__args__", (ann,)):
            if isinstance(cls, type) and hasattr(cls, "model_fields") and name != "method":
                out.append((name, cls))
    out += [(f"method.params[{m}]", cls.Params) for m, cls in SPECS.items()]
    return out


def _wrong_value(annotation) -> object:
    """A value of the wrong type for ``annotation``: a mapping where a scalar is expected,
    and a string where a mapping or number is expected."""
    text = str(annotation)
    return {"x": 1} if ("str" in text or "Literal" in text) else "not-a-value"


FIELDS = [
    (section, cls, name, info)
    for section, cls in _sections()
    for name, info in cls.model_fields.items()
]


@pytest.mark.parametrize(
    ("section", "cls", "name", "info"),
    FIELDS,
    ids=[f"{s}.{n}" for s, _c, n, _i in FIELDS],
)
def test_every_field_rejects_a_wrong_type_naming_field_and_file(tmp_path, section, cls, name, info):
    key = info.alias or name
    raw = yaml.safe_load(QUICK)
    if section.startswith("method.params"):
        method = section.split("[")[1][:-1]
        raw["method"] = {"name": method, "params": {key: _wrong_value(info.annotation)}}
        field = f"method.params.{key}"
    else:
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = _wrong_value(info.annotation)
        field = f"{section}.{key}"
    if section == "tune":
        raw["tune"].setdefault("space", {})
    path = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert field in str(e.value) and str(path) in str(e.value), str(e.value)


@pytest.mark.parametrize("section", sorted({s for s, _c in _sections()}))
def test_every_section_rejects_an_unknown_key(tmp_path, section):
    raw = yaml.safe_load(QUICK)
    if section.startswith("method.params"):
        method = section.split("[")[1][:-1]
        raw["method"] = {"name": method, "params": {"typo_weight": 1.0}}
        field = "method.params.typo_weight"
    else:
        raw[section] = {**(raw.get(section) or {}), "typo_key": 1}
        field = f"{section}.typo_key"
    message = error_of(tmp_path, yaml.safe_dump(raw))
    assert f"unknown field '{field}'" in message


@pytest.mark.parametrize(
    ("item", "field"),
    [  # the values that were accepted at load time and failed later or silently
        ("train.lr=.nan", "train.lr"),
        ("train.momentum=-0.5", "train.momentum"),
        ("train.weight_decay=-1e-4", "train.weight_decay"),
        ("train.first_task_epochs=-1", "train.first_task_epochs"),
        ("train.max_failures=-1", "train.max_failures"),
        ("train.threads_per_worker=-2", "train.threads_per_worker"),
        ("data.train_per_class=-5", "data.train_per_class"),
        ("data.test_per_class=0", "data.test_per_class"),
        ("scenario.max_tasks=0", "scenario.max_tasks"),
        ("model.embedding_dim=1", "model.embedding_dim"),
        ("model.backbone=nope", "model.backbone"),
        ("model.head=nope", "model.head"),
        ("eval.metric=cmc@x", "eval.metric"),
        ("eval.metric=cmc@0", "eval.metric"),
        ("eval.topk=[0]", "eval.topk"),
        ("eval.topk=[]", "eval.topk"),
        ("memory.per_class=-3", "memory.per_class"),
        ("name=..", "name"),
        ("name=/abs", "name"),
        ("output.root=runs/../../etc", "output.root"),
        ("data.shards_dir=../x", "data.shards_dir"),
        ("method={name: cl2r}", "model.embedding_dim"),  # 8 synthetic classes, dim 4 below
        ("method={name: finetune, align: [{name: l3}]}", "method.align.name"),
        ("method={name: cvs, params: {temperature: 0}}", "method.params.temperature"),
        ("method={name: bct, params: {lambda: -1}}", "method.params.lambda"),
        ("eval.fars=[0]", "eval.fars"),
        ("scenario.heldout_classes=-1", "scenario.heldout_classes"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_the_field(tmp_path, item, field):
    text = QUICK
    if item.startswith("method={name: cl2r}"):  # simplex head: embedding_dim >= classes - 1
        text = QUICK.replace("embedding_dim: 32", "embedding_dim: 4")
    assert field in error_of(tmp_path, text, overrides=[item])


def test_misspelt_method_lists_the_known_ones(tmp_path):
    message = error_of(tmp_path, QUICK, overrides=["method.name=cl2", "method.params={}"])
    assert "method.name" in message and "'cl2'" in message and "cl2r" in message


def test_set_with_invalid_yaml_names_the_key(tmp_path):
    message = error_of(tmp_path, QUICK, overrides=["eval.topk=[1, 2"])
    assert "--set eval.topk" in message and "YAML" in message


def test_resolved_job_round_trips_with_smoke_and_set(tmp_path):
    """A saved job.yaml is the resolved job: reloading it does not re-apply smoke over the
    explicit --set values (it used to, and a resumed --smoke --set run was refused)."""
    job = load_job(write(tmp_path, QUICK), ["data.test_per_class=40", "eval.items_per_class=30"],
                   smoke=True)  # fmt: skip
    assert job.data.test_per_class == 40 and job.eval.items_per_class == 30
    again = parse_job(yaml.safe_load(dump_job(job)), "job.yaml")
    assert again == job
    # ...while a user's own file that says smoke: true is still shrunk.
    assert load_job(write(tmp_path, QUICK + "smoke: true\n", "s.yaml")).data.test_per_class == 12


def test_set_reaches_dotted_tune_space_keys(tmp_path):
    text = QUICK + (
        "tune:\n  space:\n    method.params.lambda: {type: loguniform, low: 0.1, high: 10}\n"
    )
    job = load_job(write(tmp_path, text), ["tune.space.method.params.lambda.high=20"])
    assert job.tune.space["method.params.lambda"].high == 20.0
    assert job.tune.space["method.params.lambda"].low == 0.1


def test_method_params_are_validated_once_into_the_method_model(tmp_path):
    from distcl.catalog import BCTParams

    job = load_job(write(tmp_path, QUICK), ["method={name: bct, params: {lambda: 2}}"])
    assert isinstance(job.method.params, BCTParams) and job.method.params.lambda_ == 2.0
    assert "lambda: 2.0" in dump_job(job)  # spelt as in job files


# ---------------------------------------------------------------- the catalogue, without torch
def test_the_catalogue_names_exactly_the_implementations():
    """distcl.catalog (what a job can name, no torch) and the registries of the torch
    implementations hold the same names; each method is its spec plus a loss."""
    from distcl import catalog
    from distcl.methods import ALIGN_TERMS, METHODS
    from distcl.models.backbones import BACKBONES
    from distcl.models.heads import HEADS

    assert catalog.SPECS.names() == METHODS.names()
    for name, method in METHODS.items():
        assert issubclass(method, catalog.SPECS[name]) and method.name == name
        assert method.Params is catalog.SPECS[name].Params
    assert catalog.ALIGN_TERM_NAMES.names() == ALIGN_TERMS.names()
    assert catalog.BACKBONE_NAMES.names() == BACKBONES.names()
    assert catalog.HEAD_NAMES.names() == HEADS.names()


def test_loading_a_job_and_the_cli_import_no_torch(tmp_path):
    """A job loads, validates, pickles and prints its help without torch (the CLI's submit
    and jobs commands, shard-building tasks, the Train controller)."""
    import subprocess
    import sys

    path = write(tmp_path, QUICK)
    code = (
        "import pickle, sys\n"
        "from distcl import cli\n"
        "from distcl.config import load_job\n"
        f"job = load_job({str(path)!r}, ['method={{name: bct, params: {{lambda: 2}}}}'])\n"
        "assert pickle.loads(pickle.dumps(job)) == job\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_hoc_and_er_are_in_the_catalogue_with_validated_parameters(synthetic_job):
    from distcl.catalog import SPECS, needs_of

    hoc = synthetic_job(method={"name": "hoc"})
    assert (hoc.method.params.lambda_, hoc.method.params.mu) == (0.1, 10.0)
    assert needs_of(hoc).head == "simplex" and needs_of(hoc).old_model
    assert needs_of(hoc).replay_fraction == 0.5
    assert SPECS["hoc"].later_params == {"lambda", "mu", "replay_fraction"}
    er = synthetic_job(method={"name": "er", "params": {"replay_fraction": 0.25}})
    assert needs_of(er).replay_fraction == 0.25 and not needs_of(er).old_model
    for bad, field in ((["method.params.lambda=1.5"], "method.params.lambda"),
                       (["method.params.mu=0"], "method.params.mu"),
                       (["method.params.temperature=1"], "method.params.temperature")):  # fmt: skip
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            synthetic_job(sets=bad, method={"name": "hoc"})


def test_the_iamcl2r_preset_sets_its_protocol_and_refuses_what_contradicts_it(synthetic_job):
    job = synthetic_job(scenario={"heldout_classes": 2}, eval={"preset": "iamcl2r"})
    e = job.eval
    assert (e.protocols, e.identification, e.ties) == (("identification",), "templates", "strict")
    both = synthetic_job(
        scenario={"heldout_classes": 2},
        eval={"preset": "iamcl2r", "protocols": ["closed", "identification"]},
    )
    assert both.eval.protocols == ("closed", "identification")
    with pytest.raises(ConfigError, match="eval.ties"):
        synthetic_job(
            scenario={"heldout_classes": 2}, eval={"preset": "iamcl2r", "ties": "ties_pass"}
        )
    with pytest.raises(ConfigError, match="eval.protocols"):
        synthetic_job(
            scenario={"heldout_classes": 2}, eval={"preset": "iamcl2r", "protocols": ["closed"]}
        )
    with pytest.raises(ConfigError, match="scenario.heldout_classes"):
        synthetic_job(eval={"preset": "iamcl2r"})


def test_a_class_split_that_cannot_be_made_is_refused_at_load_time(synthetic_job, tmp_path):
    """Checked when the job loads (the counts are known without data), before any Ray."""
    with pytest.raises(ConfigError, match="scenario.tasks: 1000 tasks but only 8 classes"):
        synthetic_job(scenario={"tasks": 1000})
    with pytest.raises(ConfigError, match="scenario.heldout_classes"):
        synthetic_job(scenario={"tasks": 4, "heldout_classes": 6})
    with pytest.raises(ConfigError, match="scenario.first_task_classes"):
        synthetic_job(scenario={"tasks": 4, "first_task_classes": 7})


def test_lwf_and_mmd_with_a_cosine_head_use_the_heads_temperature(synthetic_job):
    """The cosine head's temperature is the method's where it has one for it (CVS's
    NormSoftmax), else the head's own default: not LwF's or MMD's KD temperature."""
    from distcl.models.heads import CosineHead
    from distcl.train.modeling import build_model

    default = CosineHead(4, 3).temperature
    for name in ("lwf", "mmd"):
        job = synthetic_job(method={"name": name, "params": {"temperature": 2.0}},
                            model={"head": "cosine"})  # fmt: skip
        assert build_model(job, 8, 1).head.temperature == default == 0.05, name
    cvs = synthetic_job(method={"name": "cvs", "params": {"temperature": 0.1}})
    assert build_model(cvs, 8, 1).head.temperature == 0.1
