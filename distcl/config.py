"""Job specs: YAML files validated into typed, frozen, picklable config objects.

A job is data, never code: ``load_job("jobs/quickstart.yaml", overrides=["train.epochs=3"])``
returns a :class:`JobConfig`. Every unknown, missing or mistyped field is a
:class:`ConfigError` that names the field and the file. ``smoke: true`` (or ``--smoke``)
shrinks any job to seconds: fewer samples, one epoch, two tasks.

Method-specific weights live in ``method.params`` and are validated against the
registered method's own parameter dataclass (see ``distcl.methods``), so a typo in
``lambda`` is as loud as a typo in ``train.epochs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A job spec is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how many of them are used."""

    source: Literal["fashion-mnist", "image-folder", "synthetic"] = "fashion-mnist"
    #: Folder with the IDX files (fashion-mnist) or the ImageFolder tree (``root/train``,
    #: ``root/test``, or one tree split by ``test_fraction``). None: the Debian path.
    root: str | None = None
    #: image-folder: images are resized to this square size when shards are built.
    image_size: int = 32
    #: image-folder without a ``test`` tree: fraction of each class held out for evaluation.
    test_fraction: float = 0.2
    #: Keep at most this many training / test items per class (seeded); None keeps all.
    train_per_class: int | None = None
    test_per_class: int | None = None
    #: Samples per WebDataset shard.
    shard_size: int = 2000
    #: Where shards are written; None: ``<output.root>/shards/<fingerprint>``.
    shards_dir: str | None = None
    #: synthetic source: classes, items per class and image side (learnable blobs).
    synthetic_classes: int = 8
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    synthetic_size: int = 16


@dataclass(frozen=True)
class ScenarioConfig:
    """How classes and items are spread over the incremental tasks."""

    setup: Literal["disjoint", "blurry", "general"] = "disjoint"
    tasks: int = 5
    #: New classes per task; None splits the classes evenly over the tasks.
    classes_per_task: int | None = None
    #: Classes of the first task (the "base" model, as BCT and CL2R start from half the
    #: classes); the later tasks share the rest as above. None treats task 0 like the others.
    first_task_classes: int | None = None
    #: blurry: fraction of each task's training items drawn from other tasks' classes.
    blurry_fraction: float = 0.1
    #: general: probability that a class seen before recurs in a later task.
    recur_prob: float = 0.3
    #: Run only the first N tasks of the scenario (smoke runs); None runs all.
    max_tasks: int | None = None
    #: Shuffle the class order with the job seed (False keeps label order).
    shuffle_classes: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, embedding and classifier head."""

    backbone: str = "resnet32"
    embedding_dim: int = 64
    #: linear | cosine | simplex; None lets the method choose (CL2R: simplex, CVS: cosine).
    head: str | None = None
    #: Small-image stem for torchvision ResNets (28-32 px inputs).
    small_input: bool = True


@dataclass(frozen=True)
class AlignConfig:
    """One alignment term added to any method: ``{name: l2, weight: 1.0}``."""

    name: Literal["kd", "l2", "projection", "layerwise", "adversarial"]
    weight: float = 1.0
    #: Apply to memory (replay) samples only, or to the whole batch.
    on: Literal["batch", "memory"] = "batch"


@dataclass(frozen=True)
class MethodConfig:
    """The training method and its loss weights (validated against the method)."""

    name: str = "finetune"
    params: Mapping[str, Any] = field(default_factory=dict)
    align: tuple[AlignConfig, ...] = ()


@dataclass(frozen=True)
class MemoryConfig:
    """Episodic memory budget and selection policy (used only by replay methods)."""

    per_class: int | None = 20
    total: int | None = None
    selection: Literal["random", "herding", "reservoir"] = "random"
    #: Fraction of each batch taken from memory; None: the method's default.
    replay_fraction: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train resources."""

    epochs: int = 2
    #: Epochs for the first task (often longer); None: same as ``epochs``.
    first_task_epochs: int | None = None
    batch_size_per_worker: int = 64
    lr: float = 0.05
    #: Learning rate of the tasks after the first (incremental steps often take a smaller
    #: one, so the first updates on new classes move the old embedding less); None: lr.
    later_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    workers: int = 2
    #: auto: GPUs when the cluster has them.
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    #: torch threads per worker (Ray sets OMP_NUM_THREADS=1); None: CPUs per worker.
    threads_per_worker: int | None = None
    cpus_per_worker: float = 1.0
    #: Worker-group restarts allowed per task (Ray Train FailureConfig).
    max_failures: int = 2
    #: Random crop + flip on training images.
    augment: bool = True

    def epochs_for(self, task: int) -> int:
        """Epochs of task ``task`` (0-based)."""
        return self.first_task_epochs if task == 0 and self.first_task_epochs else self.epochs

    def lr_for(self, task: int) -> float:
        """Initial learning rate of task ``task`` (0-based)."""
        return self.lr if task == 0 or self.later_lr is None else self.later_lr


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation."""

    #: The metric of the compatibility matrix: cmc@1, cmc@5, map, recall@1, ...
    metric: str = "cmc@1"
    topk: tuple[int, ...] = (1, 5)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    index: Literal["flat", "ivf"] = "flat"
    #: Evaluate on at most this many items per class (seeded subset); None: all.
    items_per_class: int | None = None


@dataclass(frozen=True)
class OutputConfig:
    """Where runs are written."""

    root: str = "runs"


@dataclass(frozen=True)
class SearchSpace:
    """One tuned parameter: ``{type: loguniform, low: 0.1, high: 10}``."""

    type: Literal["uniform", "loguniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over config fields (``method.params.lambda`` etc.)."""

    space: Mapping[str, SearchSpace] = field(default_factory=dict)
    num_samples: int = 8
    max_concurrent_trials: int = 1
    search: Literal["optuna", "random", "grid"] = "random"
    #: ac | am | am_if_ac (AM, with trials below ``ac_floor`` penalised).
    objective: Literal["ac", "am", "am_if_ac"] = "am"
    ac_floor: float = 0.5
    #: ASHA early stopping by task index.
    asha: bool = True
    grace_tasks: int = 1
    reduction_factor: int = 2
    #: Evaluation set of the objective's compatibility matrix (see ``distcl.eval``): ``seen``
    #: compares like with like in ECC/AC; ``all`` is every class of the scenario.
    protocol: Literal["all", "seen"] = "seen"
    #: Train workers per trial; None: ``train.workers``.
    workers_per_trial: int | None = None
    #: CPUs reserved for each trial's driver (Ray refuses 0); it only waits on Train runs.
    driver_cpus: float = 0.1
    #: Retries of a failed trial; a retried trial resumes from its finished tasks.
    max_trial_failures: int = 0
    #: The first trial runs the job's own values of the searched fields (the papers'
    #: defaults), so the baseline is measured with the same budget and stopping rule.
    start_with_job: bool = False


@dataclass(frozen=True)
class JobConfig:
    """One job: everything needed to rebuild the scenario and retrain every model."""

    name: str
    seed: int = 0
    smoke: bool = False
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    memory: MemoryConfig = MemoryConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    tune: TuneConfig | None = None

    # -- derived paths ---------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.output.root) / self.name

    def data_fingerprint(self) -> str:
        """Hash of everything that decides the shards' content (data, scenario, seed)."""
        blob = json.dumps(
            {"data": to_dict(self.data), "scenario": to_dict(self.scenario), "seed": self.seed},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def shards_dir(self) -> Path:
        if self.data.shards_dir:
            return Path(self.data.shards_dir)
        return Path(self.output.root) / "shards" / self.data_fingerprint()


# ------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with field-naming errors.
# ------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        # A plain dict (MappingProxyType would not pickle to Ray workers).
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown/missing/mistyped fields raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown field '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing field '{prefix}{f.name}'")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON-able) view of a config object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------
# Loading, overrides, smoke.
# ------------------------------------------------------------------------------------


def set_path(raw: dict, key: str, value: Any, where: str) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``; missing sections are created so
    that validation names an unknown key; ``where`` prefixes the error of a non-section."""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, _, text = item.partition("=")
    value = yaml.safe_load(text) if text.strip() else None
    set_path(raw, key, value, f"--set {key}")


SMOKE = {
    "data": {"train_per_class": 48, "test_per_class": 12, "shard_size": 64},
    "scenario": {"max_tasks": 2},
    "train": {"epochs": 1, "first_task_epochs": 1, "batch_size_per_worker": 16},
    "memory": {"per_class": 4, "total": None},
    "eval": {"items_per_class": 12},
}


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def parse_job(
    raw: Mapping[str, Any],
    source: str = "<job>",
    overrides: Sequence[str] = (),
    smoke: bool | None = None,
) -> JobConfig:
    """Validate a job mapping (plus ``key=value`` overrides) into a :class:`JobConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a job file must be a mapping, got {type(raw).__name__}")
    data = json.loads(json.dumps(raw))  # deep copy, plain types
    try:
        for item in overrides:
            _apply_override(data, item)
        if smoke is not None:
            data["smoke"] = smoke
        if data.get("smoke"):
            data = _deep_merge(data, SMOKE)
            for item in overrides:  # an explicit --set wins over the smoke defaults
                _apply_override(data, item)
        job = from_dict(JobConfig, data)
        _check_semantics(job)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return job


def load_job(
    path: str | Path, overrides: Sequence[str] = (), smoke: bool | None = None
) -> JobConfig:
    """Read and validate a YAML job file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such job file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_job(raw or {}, str(path), overrides, smoke)


def dump_job(job: JobConfig) -> str:
    """YAML text that :func:`parse_job` turns back into an equal job."""
    return yaml.safe_dump(to_dict(job), sort_keys=False)


def _check_semantics(job: JobConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if not job.name or "/" in job.name:
        raise ConfigError("name: must be a non-empty string without '/'")
    positive = {
        "scenario.tasks": job.scenario.tasks,
        "train.epochs": job.train.epochs,
        "train.batch_size_per_worker": job.train.batch_size_per_worker,
        "train.workers": job.train.workers,
        "model.embedding_dim": job.model.embedding_dim,
        "data.shard_size": job.data.shard_size,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if not 0.0 <= job.scenario.blurry_fraction < 1.0:
        raise ConfigError("scenario.blurry_fraction: must be in [0, 1)")
    if job.memory.replay_fraction is not None and not 0 < job.memory.replay_fraction < 1:
        raise ConfigError("memory.replay_fraction: must be in (0, 1)")
    if job.train.lr <= 0:
        raise ConfigError("train.lr: must be > 0")
    if job.train.later_lr is not None and job.train.later_lr <= 0:
        raise ConfigError("train.later_lr: must be > 0")
    # Method name and params are checked against the method registry.
    from distcl.methods import validate_method_config

    validate_method_config(job.method)
