"""Tuning results: the trials table, objective-vs-parameter plots and the best job file.

Written into the tuning folder ``<output.root>/<job>-tune/``:
    trials.csv, trials.md       one row per trial: parameters, status, tasks completed,
                                objective, AC, AM, BC, FC (at the trial's last reported
                                task), ``base`` (shared: its first task came from the
                                search's shared base; own: trained in the trial) and, for a
                                Pareto search, ``front`` (yes: on the Pareto front)
    objective_vs_<param>.png    final objective against each searched parameter
    pareto.png                  Pareto search: every pair of objectives, the front joined
    best.yaml                   the base job + the best trial's values, a plain job file
                                (no tune block) that ``distcl run best.yaml`` reproduces

The best trial is the one with the highest objective among the trials that finished every
task: an early-stopped trial's objective is measured on a shorter sequence (often higher:
AM falls as tasks accumulate), so it is not comparable. If no trial finished, the trials
with the most tasks are compared. In a Pareto search the front is taken among those same
trials, ``objective`` is the weighted sum of the picked trade-off (``tune.pick``), and the
best trial is the front trial with the highest such sum.

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q -k "not ray"``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distcl.config import JobConfig, parse_job
from distcl.tune.space import base_dict, set_path

COLUMNS = ("trial", "status", "tasks", "objective", "ac", "am", "bc", "fc", "base")


def _columns(objectives: Sequence[str]) -> list[str]:
    cols = list(COLUMNS)
    if len(objectives) > 1:
        cols.insert(3, "front")
    return cols


def make_row(
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    error: BaseException | str | None,
    num_tasks: int,
    objectives: Sequence[str] = (),
) -> dict[str, Any]:
    """One table row from a trial's config, last reported (per-task) metrics and error."""
    metrics = metrics or {}
    tasks = int(metrics.get("tasks_done") or 0)
    if error is not None:
        status = "error"
    elif tasks >= num_tasks:
        status = "completed"
    else:
        status = "stopped early"
    row = {"trial": trial_id, "status": status, "tasks": tasks, "base": metrics.get("base", "")}
    for key in ("objective", "ac", "am", "bc", "fc", *(f"obj_{m}" for m in objectives)):
        value = metrics.get(key)
        row[key] = float(value) if value is not None else float("nan")
    row.update({k: v for k, v in params.items()})
    if error is not None:
        text = str(error).strip().splitlines()
        row["error"] = text[-1][:200] if text else type(error).__name__
    return row


def _comparable(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list:
    """Trials that reported, none failed, with the most tasks (see the module docstring)."""
    ok = [r for r in rows if r["status"] != "error" and r["tasks"] > 0
          and not any(math.isnan(r[k]) for k in keys)]  # fmt: skip
    most = max((r["tasks"] for r in ok), default=0)
    return [r for r in ok if r["tasks"] == most]


def mark_front(rows: Sequence[dict[str, Any]], objectives: Sequence[str],
               pick: str | None = None) -> None:  # fmt: skip
    """Set ``front`` ("yes" on the Pareto front among the comparable trials, "" otherwise)
    and ``objective`` (the weighted sum of the picked trade-off) on every row."""
    from distcl.tune.pareto import pareto_mask, pick_weights

    keys = [f"obj_{m}" for m in objectives]
    weights = pick_weights(pick, objectives)
    for r in rows:
        r["front"] = ""
        if not any(math.isnan(r.get(k, math.nan)) for k in keys):
            r["objective"] = sum(w * r[k] for w, k in zip(weights, keys, strict=True))
    pool = _comparable(rows, keys)
    for r, on in zip(pool, pareto_mask([[r[k] for k in keys] for r in pool]), strict=True):
        r["front"] = "yes" if on else ""


def best_row(
    rows: Sequence[Mapping[str, Any]], objectives: Sequence[str] = (), pick: str | None = None
) -> Mapping[str, Any] | None:
    """The best trial (see the module docstring); None when no trial reported."""
    if len(objectives) > 1:
        from distcl.tune.pareto import pick_best, pick_weights

        keys = [f"obj_{m}" for m in objectives]
        pool = _comparable(rows, keys)
        i = pick_best([[r[k] for k in keys] for r in pool], pick_weights(pick, objectives))
        return None if i is None else pool[i]
    key = f"obj_{objectives[0]}" if objectives else "objective"
    pool = _comparable(rows, [key])
    return max(pool, key=lambda r: r[key]) if pool else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def table_markdown(
    rows: Sequence[Mapping[str, Any]], params: Sequence[str], objectives: Sequence[str] = ()
) -> str:
    """The trials table in Markdown, best objective first."""
    cols = [*_columns(objectives), *params] + (["error"] if any("error" in r for r in rows)
                                                else [])  # fmt: skip
    order = sorted(rows, key=lambda r: (r["status"] == "error", -r["tasks"],
                                        -(r["objective"] if not math.isnan(r["objective"])
                                          else -math.inf)))  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in order]
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]], params: Sequence[str], out: Path,
    objectives: Sequence[str] = (),
) -> str:  # fmt: skip
    """Write ``trials.csv`` and ``trials.md`` into ``out``; return the Markdown table."""
    cols = [*_columns(objectives), *params, *(f"obj_{m}" for m in objectives), "error"]
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = table_markdown(rows, params, objectives)
    if len(objectives) > 1:
        text += ("\nfront = yes: on the Pareto front of " + ", ".join(objectives)
                 + " among the trials with the most tasks; objective = the picked trade-off"
                 " (weighted sum).\n")  # fmt: skip
    (out / "trials.md").write_text(text)
    return text


def plot_objective(
    rows: Sequence[Mapping[str, Any]], params: Sequence[str], log_params: Sequence[str], out: Path
) -> list[Path]:
    """``objective_vs_<param>.png`` per parameter: completed trials as dots, early-stopped
    ones as crosses, coloured by tasks completed. Errored trials are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] != "error" and not math.isnan(r["objective"])]
    paths = []
    for p in params:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r[p] for r in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:  # categorical values: one column each, in first-seen order
            cats = list(dict.fromkeys(str(x) for x in xs))
            xs = [cats.index(str(x)) for x in xs]
            ax.set_xticks(range(len(cats)), cats)
        max_t = max([r["tasks"] for r in done], default=1)
        # Every trial that did not complete (ASHA-stopped, or unfinished under --report): x
        for marker, status, completed in (("o", "completed", True), ("x", "stopped early", False)):
            sel = [i for i, r in enumerate(done) if (r["status"] == "completed") == completed]
            if sel:
                sc = ax.scatter([xs[i] for i in sel], [done[i]["objective"] for i in sel],
                                c=[done[i]["tasks"] for i in sel], vmin=1, vmax=max_t,
                                marker=marker, cmap="viridis", label=status)  # fmt: skip
        if done:
            fig.colorbar(sc, ax=ax, label="tasks completed")
            ax.legend(fontsize=8)
        if p in log_params and numeric:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap
        ax.set_xlabel(p)
        ax.set_ylabel("objective")
        ax.set_title(f"objective vs {p}")
        fig.tight_layout()
        path = out / f"objective_vs_{p}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pareto(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], out: Path) -> Path:
    """``pareto.png``: each pair of objectives; comparable trials as dots, the front in red
    and joined, the others (stopped early, fewer tasks) as grey crosses."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(objectives, 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    keys = {m: f"obj_{m}" for m in objectives}
    pool = _comparable(rows, list(keys.values()))
    others = [r for r in rows if r not in pool and r["status"] != "error"
              and not any(math.isnan(r[k]) for k in keys.values())]  # fmt: skip
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ka, kb = keys[a], keys[b]
        if others:
            ax.scatter([r[ka] for r in others], [r[kb] for r in others], marker="x",
                       c="0.6", label="stopped early")  # fmt: skip
        rest = [r for r in pool if r.get("front") != "yes"]
        front = sorted((r for r in pool if r.get("front") == "yes"), key=lambda r: r[ka])
        if rest:
            ax.scatter([r[ka] for r in rest], [r[kb] for r in rest], c="C0", label="dominated")
        if front:
            ax.plot([r[ka] for r in front], [r[kb] for r in front], "o-", c="C3",
                    label="Pareto front")  # fmt: skip
            for r in front:
                ax.annotate(str(r["trial"]).split()[0][:8], (r[ka], r[kb]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
        ax.set_xlabel(a.upper())
        ax.set_ylabel(b.upper())
        ax.legend(fontsize=8)
    fig.suptitle(f"Pareto front over {len(pool)} comparable trials")
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_job(job: JobConfig, params: Mapping[str, Any]) -> JobConfig:
    """The base job with the best values set, renamed ``<job>-best``, tune block removed;
    paths stay as the job file wrote them (relative to where ``distcl run`` is started)."""
    raw = base_dict(job, resolve_paths=False)
    for key, value in params.items():
        set_path(raw, key, value)
    raw["name"] = f"{job.name}-best"
    return parse_job(raw, "best job")


def write_best(job: JobConfig, row: Mapping[str, Any], params: Sequence[str], out: Path) -> Path:
    """Write ``best.yaml``: a normal job file (loadable by ``load_job``) with provenance."""
    from distcl.config import to_dict

    best = best_job(job, {p: row[p] for p in params})
    raw = to_dict(best)
    raw.pop("tune", None)
    tc = job.tune
    what = (
        f"the trade-off {tc.pick or 'equal weights'} of {', '.join(tc.objectives)}"
        if len(tc.objectives) > 1
        else (tc.objectives or (tc.objective,))[0]
    )
    header = (
        f"# Best trial {row['trial']} of `distcl tune` {job.name}: objective "
        f"{_fmt(row['objective'])} ({what}), AC {_fmt(row['ac'])}, "
        f"AM {_fmt(row['am'])}, BC {_fmt(row.get('bc', math.nan))} over {row['tasks']} "
        f"tasks.\n"
        f"# Values: " + ", ".join(f"{p}={row[p]!r}" for p in params) + "\n"
        f"# Reproduce: distcl run {out / 'best.yaml'}\n"
    )
    path = out / "best.yaml"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path
