"""Building models and methods from a job, and the per-task model folder on disk.

``run_dir/models/<t>/`` holds ``model.pt`` (state dict, loaded with weights_only=True),
``meta.json`` (architecture signature, job name, task, scenario digest) and
``history.json`` (per-epoch loss terms). ``meta.json`` is written last and the folder is
renamed into place, so a half-written model folder never counts as a finished task. On an
object store (``output.root: s3://...``) the folder's objects are uploaded one by one with
``meta.json`` last, which keeps that rule.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distcl import storage
from distcl.catalog import compat_dim, head_kwargs, head_size, model_at
from distcl.config import JobConfig
from distcl.methods import METHODS, TaskContext
from distcl.models.embedding import EmbeddingModel, load_state_checked, model_signature
from distcl.rundir import (  # noqa: F401  (CheckpointError, read_meta: re-exported)
    CheckpointError,
    RunDir,
    atomic_dir,
    read_meta,
)
from distcl.storage import Loc, Uri


def build_model(
    job: JobConfig, num_classes: int, in_channels: int, task: int = 0
) -> EmbeddingModel:
    """The embedding model of ``task`` (``model.upgrades`` may change it); the head is
    pre-allocated for every class."""
    arch, n_head = model_at(job, task), head_size(job, num_classes, task)  # simplex: d + 1
    return EmbeddingModel(
        backbone=arch.backbone,
        in_channels=in_channels,
        embedding_dim=arch.embedding_dim,
        head=arch.head,
        num_classes=n_head,
        small_input=arch.small_input,
        head_kwargs=head_kwargs(job, arch.head),
        compat_dim=compat_dim(job, task),
    )


def build_method(job: JobConfig, ctx: TaskContext):
    return METHODS[job.method.name](job.method.params, ctx)


def save_model_dir(
    run_dir: Path | Uri | str, task: int, model_pt: Path, history: list, meta: dict,
    arrays: dict[str, np.ndarray] | None = None,
) -> Loc:  # fmt: skip
    """Move a finished task's model into ``models/<task>`` atomically (meta.json last);
    ``arrays``: numpy files beside it (``<name>.npy``: what torch-free readers need, e.g. the
    evaluation engine's projection of an upgraded model's rows)."""
    final = RunDir(run_dir).model(task)
    with atomic_dir(final, last="meta.json") as tmp:
        shutil.copyfile(model_pt, tmp / "model.pt")
        for name, array in (arrays or {}).items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "history.json").write_text(json.dumps(history, indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return final


def load_model_dir(
    model: nn.Module,
    model_dir: str | Path | Uri,
    job_name: str | None = None,
    scenario_digest: str | None = None,
) -> dict:
    """Load ``model_dir/model.pt`` into ``model`` after checking it belongs to this job
    and this architecture; errors name the mismatching field."""
    meta = read_meta(model_dir)
    if job_name is not None and meta.get("job") != job_name:
        raise CheckpointError(
            f"{model_dir}: checkpoint of job {meta.get('job')!r}, not {job_name!r}"
        )
    if scenario_digest is not None and meta.get("scenario") != scenario_digest:
        raise CheckpointError(f"{model_dir}: checkpoint trained on another scenario")
    path = storage.join(model_dir, "model.pt")
    src = io.BytesIO(storage.read_bytes(path)) if isinstance(path, Uri) else path
    state = torch.load(src, map_location="cpu", weights_only=True)
    try:
        load_state_checked(model, state, meta["signature"])
    except ValueError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    return meta


def load_frozen_model(model_dir: str | Path | Uri, job: JobConfig) -> EmbeddingModel:
    """The model of ``model_dir`` built from its own saved signature (it may differ from
    the job's architecture: BCT's old model), frozen and in eval mode."""
    sig = read_meta(model_dir)["signature"]
    model = EmbeddingModel(
        backbone=sig["backbone"], in_channels=sig["in_channels"],
        embedding_dim=sig["embedding_dim"], head=sig["head"],
        num_classes=sig["num_classes"], small_input=sig["small_input"],
        head_kwargs=head_kwargs(job, sig["head"]), compat_dim=sig.get("compat_dim"),
    )  # fmt: skip
    load_model_dir(model, model_dir)
    return model.eval().requires_grad_(False)


def model_meta(job: JobConfig, model: nn.Module, task: int, scenario_digest: str) -> dict:
    return {
        "job": job.name,
        "task": task,
        "scenario": scenario_digest,
        "method": job.method.name,
        "signature": model_signature(model),
    }
