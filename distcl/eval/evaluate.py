"""Evaluate a run directory: every protocol's compatibility matrices, the stale-gallery curve
and the report (definitions: docs/metrics.md; engine: ``distcl.eval.engine``).

    distcl eval runs/quickstart      # scores the finished tasks (all of them, or the first few)

Inputs, written after each task t: ``eval/embeddings/model=<t>/part-*.parquet`` (the
evaluation set embedded by model t) and ``gallery/model=<t>/part-*.parquet`` (items arriving
at t, embedded by model t). The matrix grows one row per task: ``score_task(run_dir, job,
scenario, t)`` computes row t (query model t against gallery models j <= t, and the stale
gallery after task t) and caches it in ``eval/rows/<t>.json`` with a digest of its inputs
(settings, scenario, the parts of models <= t); ``evaluate_run`` reuses every cached row whose
inputs are unchanged, computes the missing rows in one pass per gallery model (as Ray tasks
when this process is a Ray driver: ``distcl.eval.distributed``), and writes ``metrics.json``,
``report.md`` and the figures. The run directory may be an object-store URI
(``distcl eval s3://bucket/runs/quickstart``): every file goes through :mod:`distcl.storage`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from distcl import storage
from distcl.data.scenario import Scenario
from distcl.eval import compat
from distcl.eval import protocols as pr
from distcl.eval.distributed import compute_rows
from distcl.eval.engine import EvalSettings
from distcl.rundir import RunDir, atomic_write_json
from distcl.storage import Loc, Uri

ROW_FORMAT = 1


def finished_tasks(run_dir: str | Path | Uri) -> int:
    """Number of leading tasks whose end-of-task outputs are complete (``RunDir.done``)."""
    return RunDir(run_dir).finished_tasks()


def _parts_stat(folder: Loc) -> list:
    return sorted(
        (e.name, e.size, e.mtime_ns)
        for e in storage.listdir(folder)  # [] for a missing folder
        if e.name.endswith(".parquet") and not e.is_dir and not e.name.startswith((".", "_"))
    )


def _inputs_digest(run_dir: Loc, settings: EvalSettings, scenario: Scenario, t: int) -> str:
    """What row t depends on: settings, scenario, and the Parquet parts of models <= t."""
    rd = RunDir(run_dir)
    files = {
        f"{kind}/{j}": _parts_stat(root / f"model={j}")
        for kind, root in (("eval/embeddings", rd.eval_embeddings), ("gallery", rd.gallery))
        for j in range(t + 1)
    }
    key = {"format": ROW_FORMAT, "settings": settings.key(), "scenario": scenario.digest(),
           "files": files}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _cached_row(run_dir: Loc, t: int, digest: str) -> dict | None:
    path = RunDir(run_dir).row_json(t)
    try:
        row = storage.read_json(path)
    except (OSError, ValueError):
        return None
    return row if row.get("inputs") == digest else None


def _score_rows(
    run_dir: Loc, settings: EvalSettings, scenario: Scenario, tasks: list[int], log=None
) -> dict[int, dict]:
    """Rows ``tasks`` from the cache where their inputs are unchanged, computed otherwise."""
    digests = {t: _inputs_digest(run_dir, settings, scenario, t) for t in tasks}
    rows = {t: r for t in tasks if (r := _cached_row(run_dir, t, digests[t])) is not None}
    missing = [t for t in tasks if t not in rows]
    if missing:  # as Ray tasks in a Ray driver (distcl.eval.distributed), else in this process
        for t, row in compute_rows(run_dir, settings, scenario, missing, log=log).items():
            row["inputs"] = digests[t]
            atomic_write_json(RunDir(run_dir).row_json(t), row, default=_json_default)
            rows[t] = row
    return rows


def score_task(
    run_dir: str | Path | Uri,
    job: Any,
    scenario: Scenario,
    t: int,
    *,
    settings: EvalSettings | None = None,
) -> dict:
    """Row t of every matrix (query model t against gallery models j <= t) and the stale
    gallery after task t, from what is on disk; cached as ``eval/rows/<t>.json``."""
    settings = settings or EvalSettings.from_job(job)
    return _score_rows(storage.location(run_dir), settings, scenario, [t])[t]


def evaluate_run(
    run_dir: str | Path | Uri, log=print, *, settings: EvalSettings | None = None
) -> dict:
    """Every metric of a finished (or partly finished) run; writes the report."""
    from distcl.eval.report import print_summary, write_report

    rd = RunDir(run_dir).require("scenario_json")
    run_dir = rd.root
    job, scenario = rd.load_job(), rd.load_scenario()
    settings = settings or EvalSettings.from_job(job)
    T = rd.finished_tasks()
    if T == 0:
        raise ValueError(f"{run_dir}: no finished task to evaluate")
    if T < scenario.num_tasks:
        log(f"{run_dir}: {T} of {scenario.num_tasks} tasks finished; scoring those")
    t0 = time.perf_counter()
    rows = _score_rows(run_dir, settings, scenario, list(range(T)), log=None)
    result = assemble(rows, settings, T)
    result.update(job=job.name, method=job.method.name, tasks_planned=scenario.num_tasks)
    result["eval_s"] = time.perf_counter() - t0
    result["history"] = [record for t in range(T) for record in rd.history(t)]
    atomic_write_json(rd.metrics_json, result, indent=1, default=_json_default)
    write_report(run_dir, result)
    print_summary(result, log=log)
    return result


def assemble(rows: dict[int, dict], settings: EvalSettings, T: int) -> dict:
    """The metrics.json dict from rows 0..T-1: matrices (NaN above the diagonal), the
    summaries (AC, AM, BC, FC, ECC with the configured tie rule) and the stale curve."""
    protocols: dict[str, dict] = {}
    for name in rows[0]["protocols"]:
        got = rows[0]["protocols"][name]["values"]
        names = pr.metric_names(name, settings.topk, settings.recall_ks, settings.metric,
                                settings.fars, settings.fpirs)  # fmt: skip
        missing = [m for m in names if m not in got]
        if missing:
            raise ValueError(f"eval/rows/0.json: protocol {name!r} lacks {missing}")
        names += [m for m in got if m not in names]  # e.g. ann_recall@k of IVF searches
        mats = {m: np.full((T, T), np.nan) for m in names}
        for i in range(T):
            for m in names:
                mats[m][i, : i + 1] = rows[i]["protocols"][name]["values"][m]
        main = pr.main_metric(name, settings.metric, settings.topk, settings.fpirs)
        iamcl2r = settings.preset == "iamcl2r" and name == "identification"
        summary = compat.summarize(mats[main], settings.ties, am_ignores_zeros=iamcl2r)
        protocols[name] = {
            "metric": main,
            "map_kind": rows[0]["protocols"][name].get("map_kind"),
            "matrices": {m: M.tolist() for m, M in mats.items()},
            "summary": summary,
        }
    return {
        "metric": settings.metric,
        "tasks": T,
        "ties": settings.ties,
        "preset": settings.preset,
        "protocol_names": list(protocols),
        "eval_items": rows[0]["items"]["closed"],
        "items": rows[0]["items"],
        "embedding_passes": T,
        "protocols": protocols,
        "stale_gallery": [rows[t]["stale"] for t in range(T)],
        "settings": settings.key(),
    }


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
