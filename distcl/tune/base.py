"""The shared base task: train the first task once per search, start every trial from it.

A tuned key that acts only from the second task on (a weight on a term that needs the old
model, the learning rate of later tasks, ...) cannot change how task 0 trains: every trial
would train the same first model. :func:`base_plan` decides, per key and conservatively,
whether the search can share it; the search then trains task 0 once in
``<tune_dir>/trials/<job>-base[-seed<s>]/`` (:func:`train_base`) and every trial adopts it
before its own Train run (:func:`adopt_base`): ``models/0`` (with ``done.json``),
``eval/embeddings/model=0``, ``gallery/model=0``, ``eval/rows/0.json`` and the memory files
are hard-linked (copied across file systems; on an object store, copied server-side) into
the trial's run dir. The base's files are made read-only and are never written again (every
later write in a run dir replaces a file by rename, which never touches a linked inode; an
object store replaces whole objects). A copied object has a new mtime, so a trial on an
object store scores its row 0 again (one pair of models, from the copied embeddings).

Verified before a trial adopts the base (``base.json`` beside it): the trial's task-0 key
(every training field, minus the later-only keys of the space, plus what the method needs
from the memory) equals the base's; the scenario digest equals the trial's; model 0's meta
names that scenario and the architecture signature the trial job builds; every linked file
has the size and sha256 the base recorded. A mismatch trains task 0 in the trial instead
(and says so).

Which keys act only later (no external old model for task 0):
    train.later_lr                       the lr of tasks 1..T-1
    train.epochs                         when train.first_task_epochs is set
    memory.replay_fraction               (> 0) rows drawn from memory: none before task 1
    method.params.<p>                    p in the method's ``later_params`` (its spec in
                                         distcl.catalog; a replay fraction only when > 0)
Anything else (seed, data, scenario, model, lr, batch size, method temperature of a head,
margin of a batch-hard triplet, ...) changes task 0: no sharing.

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q -k base``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distcl import storage
from distcl.catalog import SPECS, model_signature_for, needs_of
from distcl.config import ConfigError, JobConfig, SearchSpace, TuneConfig, to_dict
from distcl.data.shardio import sha256_file
from distcl.storage import Loc, Uri

#: Keys whose 0 would switch the memory off (then task 0's end-of-task work differs).
_POSITIVE = ("replay_fraction",)
#: The run-dir paths a trial takes from the base (relative; folders or files).
BASE_PATHS = ("models/0", "eval/embeddings/model=0", "gallery/model=0", "eval/rows/0.json",
              "memory")  # fmt: skip
MARKER = "base.json"


def _values(s: SearchSpace) -> list[Any]:
    return [s.low, s.high] if s.type in ("uniform", "loguniform") else list(s.values)


def later_only(job: JobConfig, key: str, s: SearchSpace) -> str | None:
    """None when tuning ``key`` over ``s`` cannot change how task 0 trains; otherwise the
    reason it can (a short phrase for the log)."""
    parts = key.split(".")
    if key == "train.later_lr":
        return None
    if key == "train.epochs":
        return None if job.train.first_task_epochs else "train.first_task_epochs is not set"
    positive = all(isinstance(v, (int, float)) and v > 0 for v in _values(s))
    if key == "memory.replay_fraction":
        return None if positive else "a replay fraction of 0 changes the memory of task 0"
    if len(parts) == 3 and parts[:2] == ["method", "params"]:
        name, param = job.method.name, parts[2]
        spec = SPECS[name]
        if param not in spec.later_params:
            return f"{name}'s {param} acts on the first task"
        if spec.external_old_model(job.method.params):
            return "the method's external old model gives task 0 an old model"
        if param in _POSITIVE and not positive:
            return "a replay fraction of 0 changes the memory of task 0"
        return None
    return f"{key} acts on the first task"


def base_plan(job: JobConfig, space: Mapping[str, SearchSpace], mode: str) -> tuple[bool, str]:
    """(share the first task?, why): ``mode`` is tune.shared_base (auto | yes | no)."""
    if mode == "no":
        return False, "tune.shared_base: no"
    reasons = {k: r for k, s in space.items() if (r := later_only(job, k, s)) is not None}
    if reasons:
        why = "; ".join(f"{k}: {r}" for k, r in reasons.items())
        if mode == "yes":
            raise ConfigError(f"tune.shared_base: yes, but {why}")
        return False, why
    return True, f"no tuned key acts on task 0 ({', '.join(space)})"


def task0_key(job: JobConfig, later_keys: list[str]) -> dict:
    """What decides task 0's outputs: the training fields without the name and without the
    later-only keys, plus whether the method keeps a memory (and which kind)."""
    from distcl.train.driver import TRAINING_FIELDS

    raw = {k: v for k, v in to_dict(job).items() if k in TRAINING_FIELDS and k != "name"}
    for key in later_keys:
        node, parts = raw, key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    needs = needs_of(job)
    raw["_memory"] = {"replay": needs.replay_fraction > 0, "class_means": needs.class_means}
    return raw


def base_job(job_base: Mapping[str, Any], trials_root: str, name: str, seed: int | None = None):
    """The job that trains the base (the job's own values; ``seed`` for confirm runs)."""
    from distcl.tune.space import trial_job

    params = {} if seed is None else {"seed": seed}
    return trial_job(job_base, params, name, trials_root)


def _files(root: Loc) -> list[Loc]:
    out = []
    for rel in BASE_PATHS:
        p = root / rel
        if storage.is_file(p):
            out.append(p)
        else:  # a folder (or nothing)
            out += [f for f in storage.walk_files(p) if not f.name.startswith(".")]
    return out


def train_base(job: JobConfig, later_keys: list[str], protocol: str = "seen", log=print) -> Path:
    """Train (or find) task 0 of ``job`` in its run dir; write ``base.json``; return the dir.
    ``protocol``: the search's (``eval/rows/0.json`` is scored for it, once).

    Resumable: a base whose ``base.json`` matches is reused; a half-trained one resumes.
    """
    from distcl.eval.evaluate import score_task  # noqa: F401 (fail before training)
    from distcl.train.driver import Run
    from distcl.tune.scoring import score_rows

    run = Run(job, progress=False, log=lambda m: log(f"[base {job.name}] {m}"))
    marker = run.dir / MARKER
    key = task0_key(job, later_keys)
    with run.rd.lock():
        scenario = run.prepare()
        if storage.is_file(marker):
            info = storage.read_json(marker)
            if info.get("key") == key and info.get("scenario") == scenario.digest():
                return run.dir
        if not run.rd.done(0):
            log(f"shared base: training task 1 of {job.name} once for every trial")
            try:
                run.train(upto=1)
            finally:
                _stop_actors(run)
        score_rows(run.dir, 0, protocol)  # eval/rows/0.json, so trials do not recompute it
        meta = storage.read_json(run.rd.model(0) / "meta.json")
        files = {storage.relative(p, run.dir): {"size": storage.size(p), "sha256": sha256_file(p)}
                 for p in _files(run.dir)}  # fmt: skip
        for rel in files if isinstance(run.dir, Path) else ():
            p = run.dir / rel  # read-only: an in-place write through a link would fail loudly
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        info = {"key": key, "scenario": scenario.digest(), "signature": meta["signature"],
                "job": job.name, "files": files}  # fmt: skip
        storage.write_text(marker, json.dumps(info, indent=1, sort_keys=True))
    return run.dir


def _stop_actors(run) -> None:
    """The base run's memory service and progress board (the search's driver owns them and
    would keep them for the whole search): the memory is on disk."""
    import ray

    for name in (f"memory-{run.run_id}", f"progress-{run.run_id}"):
        try:
            ray.kill(ray.get_actor(name, namespace="distcl"))
        except ValueError:  # not there
            pass
    run._memory = None


def _link(src: Loc, dst: Loc) -> None:
    """A hard link of ``src`` at ``dst`` (atomic: a temp name, then a rename); where there
    can be none (an object store, another file system) a copy (:func:`storage.copy`)."""
    if isinstance(src, Path) and isinstance(dst, Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:  # another file system, or no hard links
            tmp.unlink(missing_ok=True)
    storage.copy(src, dst)


def adopt_base(base_dir: str | Path, run, later_keys: list[str]) -> str:
    """Link the base's task 0 into ``run`` (a prepared :class:`~distcl.train.driver.Run`,
    task 0 not finished) after verifying it; returns "shared" or why not ("own: ...")."""
    base_dir = storage.location(base_dir)
    path = base_dir / MARKER
    if not storage.is_file(path):
        return "own: no finished base"
    info = storage.read_json(path)
    if info["key"] != task0_key(run.job, later_keys):
        return "own: task-0 fields differ from the base"
    if info["scenario"] != run.scenario.digest():
        return "own: another scenario"
    meta = storage.read_json(base_dir / "models" / "0" / "meta.json")
    sig = model_signature_for(run.job, run.num_classes, run.in_channels)  # no torch
    if meta.get("scenario") != info["scenario"] or meta.get("signature") != sig:
        return "own: model 0 of the base has another architecture or scenario"
    for rel, want in info["files"].items():
        src = storage.stat(base_dir / rel)
        same = src is not None and not src.is_dir and src.size == want["size"]
        if not same or sha256_file(base_dir / rel) != want["sha256"]:
            return f"own: {rel} of the base changed since it was trained"
    # done.json last: until it is in place the trial's task 0 does not count as finished.
    rels = sorted(info["files"], key=lambda r: r.endswith("models/0/done.json"))
    for rel in rels:
        _link(base_dir / rel, run.dir / rel)
    storage.write_json(run.dir / MARKER, {"base": str(base_dir), "job": info["job"]})
    return "shared"


def base_status(run_dir: str | Path | Uri) -> str:
    """`shared` when a run dir's task 0 came from a base, `own` otherwise."""
    try:
        return "shared" if "base" in storage.read_json(storage.join(run_dir, MARKER)) else "own"
    except (OSError, ValueError):
        return "own"


def prepare_bases(job: JobConfig, tc: TuneConfig, base: dict, trials_root: Loc,
                   seeds: list[int], log) -> tuple[dict[int, str], list[str]]:  # fmt: skip
    """Train the shared first task once per seed when the search allows it (else nothing):
    ({seed: base run dir}, the later-only keys)."""
    shared, why = base_plan(job, tc.space, tc.shared_base)
    log(f"shared base task: {'yes' if shared else 'no'} ({why})")
    if not shared:
        return {}, []
    later = list(tc.space)
    out = {}
    for s in seeds:
        name = f"{job.name}-base" + ("" if s == job.seed else f"-seed{s}")
        bj = base_job(base, str(trials_root), name, seed=None if s == job.seed else s)
        out[s] = str(train_base(bj, later, tc.protocol, log=log))
    return out, later
