"""``distcl tune JOB --confirm K``: is the best trial better than the job's own values, or
was it one lucky seed?

The best trial's values and the job's own values of the searched keys (the baseline) are
each run again on K seeds (``seed, seed + 1, ..., seed + K - 1``; the seed also draws the
scenario's class order and data subset, so the spread includes them), as one Tune run of
2K trials packed like the search's (no early stopping). Run dirs:
``<tune_dir>/confirm/<job>-{best-<values digest>,baseline}-seed<s>/``; a rerun finds the
finished ones (no task is retrained), and a best of other values (a search resumed with
more trials, ``--best`` another file) gets run dirs of its own. When the search shares its
first task, best and baseline of one seed share theirs too (one base per seed). A
configuration the search already ran to its last task on the job's own seed (the best
trial; the baseline where ``tune.start_with_job`` or the grid holds the job's values) is not
run again: that trial's run dir is read instead, since the same config and seed train the
same models.

Reported per objective metric (``tune.objectives``, or AC and AM): the mean and the spread
(sample standard deviation over the seeds; 0 for one seed) of each configuration, and the
per-seed difference best - baseline. The improvement is called one only when the mean
difference is larger than the larger of the two spreads (and positive); otherwise "within
the spread". Written to ``confirm.md`` and ``confirm.json``.

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q -k confirm``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distcl import storage
from distcl.config import ConfigError, JobConfig, TuneConfig
from distcl.storage import Loc
from distcl.tune.space import base_dict


def baseline_point(job: JobConfig, keys: Sequence[str] | None = None,
                   what: str = "the job") -> dict[str, Any]:  # fmt: skip
    """``job``'s value of every searched key (``keys``, default ``job.tune.space``; it may
    lie outside the space). ``what`` names the job in the error."""
    raw = base_dict(job, resolve_paths=False)
    out = {}
    for key in job.tune.space if keys is None else keys:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"--confirm: {what} sets no value for tune.space.{key}")
            node = node[part]
        out[key] = node
    return out


def summarize(values: Mapping[str, Mapping[int, Mapping[str, float]]],
              metrics: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """{metric: {variant: {mean, spread, seeds}, diff: {mean, per_seed}, verdict}} from
    ``values[variant][seed][metric]`` (variants ``best`` and ``baseline``)."""
    out: dict[str, Any] = {}
    for m in metrics:
        entry: dict[str, Any] = {}
        for v in ("best", "baseline"):
            xs = [values[v][s][m] for s in sorted(values[v])]
            entry[v] = {
                "mean": float(np.mean(xs)),
                "spread": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
                "seeds": {int(s): values[v][s][m] for s in sorted(values[v])},
            }
        common = sorted(set(values["best"]) & set(values["baseline"]))
        diffs = [values["best"][s][m] - values["baseline"][s][m] for s in common]
        mean_diff = entry["best"]["mean"] - entry["baseline"]["mean"]
        spread = max(entry["best"]["spread"], entry["baseline"]["spread"])
        entry["diff"] = {"mean": mean_diff, "per_seed": dict(zip(common, diffs, strict=True))}
        if len(common) < 2:
            entry["verdict"] = "one seed: no spread to judge by"
        elif mean_diff > spread:
            entry["verdict"] = "improvement (larger than the spread)"
        elif -mean_diff > spread:
            entry["verdict"] = "worse (by more than the spread)"
        else:
            entry["verdict"] = "within the spread: no improvement shown"
        out[m] = entry
    return out


def confirm_markdown(summary: Mapping[str, Any], best: Mapping[str, Any],
                     baseline: Mapping[str, Any], seeds: Sequence[int]) -> str:  # fmt: skip
    lines = [
        f"# Confirmation on {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "best: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()
        ),  # fmt: skip
        "baseline (the job's values): " + ", ".join(f"{k}={v}" for k, v in baseline.items()),
        "",
        "| metric | best mean ± spread | baseline mean ± spread | best - baseline | per seed "
        "| verdict |",
        "|---|---|---|---|---|---|",
    ]
    for m, e in summary.items():
        per = " ".join(f"{d:+.3f}" for d in e["diff"]["per_seed"].values())
        lines.append(
            f"| {m.upper()} | {e['best']['mean']:.4f} ± {e['best']['spread']:.4f} "
            f"| {e['baseline']['mean']:.4f} ± {e['baseline']['spread']:.4f} "
            f"| {e['diff']['mean']:+.4f} | {per} | {e['verdict']} |"
        )
    lines += ["", "spread: sample standard deviation over the seeds; an improvement is called "
              "one only when best - baseline exceeds the larger spread."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _point_key(point: Mapping[str, Any]) -> str:
    return json.dumps({k: point[k] for k in sorted(point)}, default=str)


def point_digest(point: Mapping[str, Any]) -> str:
    """8 hex digits naming a configuration's values (its confirm run dirs)."""
    return hashlib.sha256(_point_key(point).encode()).hexdigest()[:8]


def finished_search_runs(
    job: JobConfig, rows: Sequence[Mapping[str, Any]], params: Sequence[str], tune_dir: Loc,
    num_tasks: int,
) -> dict[str, Loc]:  # fmt: skip
    """{point key: run dir} of the search's trials that finished every task."""
    from distcl.rundir import RunDir

    out = {}
    for r in rows:
        run_dir = tune_dir / "trials" / f"{job.name}-trial-{str(r['trial']).split()[0]}"
        if r["status"] != "error" and RunDir(run_dir).finished_tasks() >= num_tasks:
            out.setdefault(_point_key({p: r[p] for p in params}), run_dir)
    return out


def confirm_best(
    job: JobConfig,
    tc: TuneConfig,
    best: Mapping[str, Any] | None,
    k: int,
    tune_dir: Loc,
    concurrency: int,
    log=print,
    searched: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Run best and baseline on ``k`` seeds (one Tune run), write ``confirm.md``/``.json``.
    ``searched``: :func:`finished_search_runs`, reused for the job's own seed."""
    from ray import tune

    from distcl.data.shards import build_shards
    from distcl.rundir import RunDir
    from distcl.train.progress import progress_board
    from distcl.tune.base import prepare_bases
    from distcl.tune.groups import SweepIdleGroups
    from distcl.tune.space import trial_job
    from distcl.tune.trial import score_tune

    if best is None:
        raise ValueError("--confirm: no best trial to confirm")
    params = list(tc.space)
    points = {"best": {p: best[p] for p in params}, "baseline": baseline_point(job)}
    seeds = [job.seed + i for i in range(k)]
    base = base_dict(job)
    root = tune_dir / "confirm"
    # The baseline's values are the job's (a changed job is refused); the best's may change.
    tags = {"best": f"best-{point_digest(points['best'])}", "baseline": "baseline"}
    run_dirs = {(v, s): root / f"{job.name}-{tags[v]}-seed{s}" for v in points for s in seeds}
    for v in points:  # the search's own run of this config on the job's seed
        found = (searched or {}).get(_point_key(points[v]))
        if found is not None:
            run_dirs[(v, job.seed)] = found
            log(f"confirm: {v} on seed {job.seed} is the search's {found.name} (not run again)")
    configs = [{"variant": tags[v], "point": {**points[v], "seed": s}} for v in points
               for s in seeds if run_dirs[(v, s)].parent == root]  # fmt: skip
    to_run = sorted({c["point"]["seed"] for c in configs})
    for s in to_run:  # shards before the trials (they would race to build them)
        build_shards(trial_job(base, {"seed": s}, f"{job.name}-probe", str(root)))
    shared, later = prepare_bases(job, tc, base, root, to_run, log)
    log(f"confirm: best and baseline on seeds {seeds} ({len(configs)} runs)")
    exp = tune_dir / "confirm-experiment"
    storage.delete_dir(exp)  # the runs on disk are what resumes
    results = [] if not configs else tune.Tuner(
        tune.with_resources(
            tune.with_parameters(_confirm_trial, base=base, trials_root=str(root),
                                 job_name=job.name, tc=tc, shared_base=shared,
                                 later_keys=later,
                                 board=progress_board()),
            tune.PlacementGroupFactory([{"CPU": tc.driver_cpus}]),
        ),
        param_space={"cfg": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
        run_config=tune.RunConfig(
            name=exp.name, **storage.ray_storage(tune_dir),
            failure_config=tune.FailureConfig(max_failures=tc.max_trial_failures),
            callbacks=[SweepIdleGroups()],
        ),
    ).fit()  # fmt: skip
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"--confirm: {len(errors)} run(s) failed; first: {errors[0]}")
    metrics = list(tc.objectives) or ["ac", "am", "objective"]
    values: dict[str, dict[int, dict[str, float]]] = {"best": {}, "baseline": {}}
    for v in points:
        for s in seeds:
            run_dir = run_dirs[(v, s)]
            T = RunDir(run_dir).finished_tasks()
            m = score_tune(str(run_dir), T - 1, tc=tc)
            values[v][s] = {x: (m[f"obj_{x}"] if f"obj_{x}" in m else m[x]) for x in metrics}
    summary = summarize(values, metrics)
    text = confirm_markdown(summary, points["best"], points["baseline"], seeds)
    reused = [f"{v} seed {s}: {d.name}" for (v, s), d in run_dirs.items() if d.parent != root]
    if reused:
        text += "\nRead from the search's trials (same config and seed): " + "; ".join(reused)
        text += "\n"
    storage.write_text(tune_dir / "confirm.md", text)
    storage.write_text(
        tune_dir / "confirm.json",
        json.dumps(
            {"seeds": seeds, "points": points, "summary": summary}, indent=1, default=_plain
        ),
    )
    log("\n" + text)
    return {"seeds": seeds, "points": points, "summary": summary, "values": values,
            "run_dirs": {f"{v}-seed{s}": str(d) for (v, s), d in run_dirs.items()}}  # fmt: skip


def _plain(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(type(o))


def _confirm_trial(config: Mapping[str, Any], **kw) -> None:
    """The confirm runs' trainable: one grid value ``cfg`` = {variant, point}."""
    from distcl.tune.trial import run_trial

    run_trial(config["cfg"], **kw)
