"""Tuning results: the trials table, objective-vs-parameter plots and the best job file.

Written into the tuning folder ``<output.root>/<job>-tune/``:
    trials.csv, trials.md       one row per trial: parameters, status, tasks completed,
                                objective, AC, AM (at the trial's last reported task)
    objective_vs_<param>.png    final objective against each searched parameter
    best.yaml                   the base job + the best trial's values, a plain job file
                                (no tune block) that ``distcl run best.yaml`` reproduces

The best trial is the one with the highest objective among the trials that finished every
task: an early-stopped trial's objective is measured on a shorter sequence (often higher:
AM falls as tasks accumulate), so it is not comparable. If no trial finished, the trials
with the most tasks are compared.

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

COLUMNS = ("trial", "status", "tasks", "objective", "ac", "am")


def make_row(
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    error: BaseException | str | None,
    num_tasks: int,
) -> dict[str, Any]:
    """One table row from a trial's config, last reported metrics and error."""
    metrics = metrics or {}
    tasks = int(metrics.get("task") or 0)
    if error is not None:
        status = "error"
    elif tasks >= num_tasks:
        status = "completed"
    else:
        status = "stopped early"
    row = {"trial": trial_id, "status": status, "tasks": tasks}
    for key in ("objective", "ac", "am"):
        value = metrics.get(key)
        row[key] = float(value) if value is not None else float("nan")
    row.update({k: v for k, v in params.items()})
    if error is not None:
        text = str(error).strip().splitlines()
        row["error"] = text[-1][:200] if text else type(error).__name__
    return row


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The best trial (see the module docstring); None when no trial reported."""
    ok = [r for r in rows if r["status"] != "error" and r["tasks"] > 0
          and not math.isnan(r["objective"])]  # fmt: skip
    if not ok:
        return None
    most = max(r["tasks"] for r in ok)
    return max((r for r in ok if r["tasks"] == most), key=lambda r: r["objective"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def table_markdown(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> str:
    """The trials table in Markdown, best objective first."""
    cols = [*COLUMNS, *params] + (["error"] if any("error" in r for r in rows) else [])
    order = sorted(rows, key=lambda r: (r["status"] == "error", -r["tasks"],
                                        -(r["objective"] if not math.isnan(r["objective"])
                                          else -math.inf)))  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in order]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], params: Sequence[str], out: Path) -> str:
    """Write ``trials.csv`` and ``trials.md`` into ``out``; return the Markdown table."""
    cols = [*COLUMNS, *params, "error"]
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = table_markdown(rows, params)
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
    header = (
        f"# Best trial {row['trial']} of `distcl tune` {job.name}: objective "
        f"{_fmt(row['objective'])} ({job.tune.objective}), AC {_fmt(row['ac'])}, "
        f"AM {_fmt(row['am'])} over {row['tasks']} tasks.\n"
        f"# Values: " + ", ".join(f"{p}={row[p]!r}" for p in params) + "\n"
        f"# Reproduce: distcl run {out / 'best.yaml'}\n"
    )
    path = out / "best.yaml"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path
