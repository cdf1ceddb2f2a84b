"""Job specs: YAML files validated once into the typed, frozen models of ``distcl.schema``.

    job = load_job("jobs/quickstart.yaml", overrides=["train.epochs=3"], smoke=True)

A job is data, never code. Every unknown, missing, mistyped or out-of-range field, and every
name that a registry does not know (backbone, head, method, alignment term), is a
:class:`ConfigError` naming the field and the file, raised at load time, before Ray starts.

``smoke: true`` (or ``--smoke``) shrinks any job to seconds; an explicit ``--set`` wins over
the smoke values. :func:`dump_job` writes the *resolved* job (smoke applied, marked
``resolved: true``), so reloading a saved ``job.yaml`` gives the same config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from distcl import schema
from distcl.catalog import SPECS, model_at, upgrade_tasks
from distcl.errors import ConfigError
from distcl.schema import (
    AlignConfig,
    DataConfig,
    EvalConfig,
    JobConfig,
    MemoryConfig,
    ModelConfig,
    OutputConfig,
    ScenarioConfig,
    SearchSpace,
    TrainConfig,
    TuneConfig,
    to_dict,
)

__all__ = [
    "SMOKE", "AlignConfig", "ConfigError", "DataConfig", "EvalConfig", "JobConfig",
    "MemoryConfig", "ModelConfig", "OutputConfig", "ScenarioConfig", "SearchSpace",
    "TrainConfig", "TuneConfig", "dump_job", "load_job", "parse_job", "set_path", "to_dict",
]  # fmt: skip

# ------------------------------------------------------------------------- loading
SMOKE = {
    "data": {"train_per_class": 48, "test_per_class": 12, "shard_size": 64},
    "scenario": {"max_tasks": 2},
    "train": {"epochs": 1, "first_task_epochs": 1, "batch_size_per_worker": 16},
    "memory": {"per_class": 4, "total": None},
    "eval": {"items_per_class": 12},
}


def set_path(raw: dict, key: str, value: Any, where: str) -> None:
    """``raw[a][b][c] = value`` for ``key = "a.b.c"``; an existing dotted key wins over
    nesting (``tune.space.method.params.lambda.low`` reaches the space entry)."""
    node, parts = raw, key.strip().split(".")
    while len(parts) > 1:
        n = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in node), 1)
        head, parts = ".".join(parts[:n]), parts[n:]
        if node.get(head) is None:
            node[head] = {}
        if not isinstance(node[head], dict):
            raise ConfigError(f"{where}: '{head}' is not a section")
        node = node[head]
    node[parts[0]] = value


def _apply_override(raw: dict, item: str) -> None:
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: not a valid YAML value ({e.problem})") from None
    set_path(raw, key, value, f"--set {key}")


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def parse_job(
    raw: Any, source: str = "<job>", overrides: Sequence[str] = (), smoke: bool | None = None
) -> JobConfig:
    """Validate a job mapping (plus ``key=value`` overrides) into a :class:`JobConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a job file must be a mapping, got {type(raw).__name__}")
    data = json.loads(json.dumps(raw))  # deep copy, plain types
    resolved = data.pop("resolved", False) is True  # a dumped job: smoke already applied
    try:
        for item in overrides:
            _apply_override(data, item)
        if smoke is not None:
            data["smoke"] = smoke
        if data.get("smoke") is True and (not resolved or smoke):
            data = _deep_merge(data, SMOKE)
            for item in overrides:  # an explicit --set wins over the smoke values
                _apply_override(data, item)
        job = JobConfig.model_validate(data)
        _check_cross_fields(job)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e, data)}") from None
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
    return parse_job({} if raw is None else raw, str(path), overrides, smoke)


def dump_job(job: JobConfig) -> str:
    """YAML of the resolved job: :func:`parse_job` turns it back into an equal job."""
    return yaml.safe_dump({**to_dict(job), "resolved": True}, sort_keys=False)


def _check_cross_fields(job: JobConfig) -> None:
    """Checks that span fields (one field's range depends on another), and the scenario's
    class split where the number of classes is known without reading data."""
    from distcl.data.scenario import check_class_split

    known = {"synthetic": job.data.synthetic_classes, "fashion-mnist": 10}.get(job.data.source)
    _check_upgrades(job)
    _check_tracking(job)
    for task in range(job.scenario.tasks if job.model.upgrades else 1):
        arch = model_at(job, task)
        if arch.head == "simplex" and known and arch.embedding_dim + 1 < known:
            field = "model.embedding_dim" if task == 0 else "model.upgrades.embedding_dim"
            raise ConfigError(
                f"{field}: the d-simplex head needs embedding_dim >= classes - 1 = "
                f"{known - 1}, got {arch.embedding_dim}"
                + (f" (the model of task {task + 1})" if task else "")
            )
    if job.eval.preset == "iamcl2r" and not job.scenario.heldout_classes:
        raise ConfigError("scenario.heldout_classes: eval.preset iamcl2r identifies probes of "
                          "classes no model trained on: hold some out (> 0)")  # fmt: skip
    if known:
        try:
            check_class_split(job.scenario, known)
        except ValueError as e:
            raise ConfigError(f"{e} ({job.data.source} has {known} classes)") from None


def _check_tracking(job: JobConfig) -> None:
    """``output.tracking`` names a tracker whose client is installed (not its server: that
    is checked when a run starts)."""
    import importlib.util

    if job.output.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("output.tracking: mlflow needs its client, which is not installed: "
                          "pip install 'distcl[tracking]' (mlflow-skinny)")  # fmt: skip
    if job.output.tracking == "tensorboard" and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("output.tracking: tensorboard needs tensorboardX (pip install "
                          "tensorboardX; Ray Tune installs it)")  # fmt: skip
    if job.output.tracking == "tensorboard" and "://" in job.output.root:
        raise ConfigError(f"output.tracking: tensorboard writes event files into a local run "
                          f"directory; output.root is {job.output.root}")  # fmt: skip


def _check_upgrades(job: JobConfig) -> None:
    """``model.upgrades``: tasks that exist, and a method (and alignment terms) that can train
    across a change of architecture."""
    if not job.model.upgrades:
        return
    tasks = job.scenario.tasks
    for start in job.model.upgrades:
        if not 2 <= start <= tasks:
            raise ConfigError(
                f"model.upgrades: task {start} is not a later task of this scenario (2 .. "
                f"{tasks}, 1-indexed: the first task's model is model.backbone)"
            )
    spec = SPECS[job.method.name]
    if not spec.supports_upgrades:
        raise ConfigError(f"model.upgrades: method {job.method.name!r} cannot train across "
                          "a change of architecture")  # fmt: skip
    for t in upgrade_tasks(job):
        if model_at(job, t).backbone != model_at(job, t - 1).backbone and any(
            a.name == "layerwise" for a in job.method.align
        ):
            raise ConfigError(
                f"method.align: layerwise aligns the stages of two backbones of one kind; the "
                f"model of task {t + 1} changes the backbone ({model_at(job, t - 1).backbone} "
                f"-> {model_at(job, t).backbone})"
            )


# ------------------------------------------------------------------------- errors
_WORDS = {
    "int": "expected an integer", "float": "expected a number", "bool": "expected true/false",
    "string": "expected a string", "tuple": "expected a list", "list": "expected a list",
    "model": "expected a mapping", "dict": "expected a mapping",
}  # fmt: skip


def _describe(err: ValidationError, data: Any) -> str:
    """The first error of ``err`` as ``field: what is wrong`` in the project's words."""
    e = err.errors(include_url=False)[0]
    loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
    if len(loc) > 1 and loc[0] == "method" and loc[1] in SPECS:
        loc.pop(1)  # the discriminator's tag is not a field
    field = ".".join(loc)
    kind, value = e["type"], e.get("input")
    if kind == "missing":
        return f"missing field '{field}'"
    if kind == "extra_forbidden":
        return f"unknown field '{field}' (known: {', '.join(_known(loc[:-1], data))})"
    if kind == "union_tag_invalid":
        return f"method.name: unknown method {e['ctx']['tag']!r} (known: {SPECS.names()})"
    if kind == "literal_error":
        return f"{field}: {value!r} is not one of [{e['ctx']['expected']}]"
    base = kind.split("_")[0]
    if base in _WORDS and kind in (f"{base}_type", f"{base}_parsing", "int_from_float"):
        return f"{field}: {_WORDS[base]}, got {value!r}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{field}: {msg}" if not msg.startswith(field) else msg


def _known(loc: list[str], data: Any) -> list[str]:
    """Field names of the section at ``loc`` (for 'unknown field' messages)."""
    model: Any = JobConfig
    for part in loc:
        if model is JobConfig and part == "method":
            name = (data.get("method") or {}).get("name", "finetune")
            model = getattr(schema, f"Method_{name}", None)
        else:
            ann = model.model_fields[part].annotation if part in model.model_fields else None
            kinds = [a for a in get_args(ann) or (ann,) if isinstance(a, type)]
            model = next((a for a in kinds if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return sorted(f.alias or n for n, f in model.model_fields.items())
