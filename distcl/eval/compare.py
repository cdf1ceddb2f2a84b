"""The table and figure of ``distcl compare JOB [JOB ...]`` (which runs or reads the jobs:
:func:`distcl.pipeline.compare_jobs`).

    distcl compare jobs/fashion_mnist/*.yaml --out runs/compare

Writes ``<out>/compare.md`` (one row per job: AC, AM, BC, FC on both protocols, AC again
on the mAP matrices (``ac_all_map``, ``ac_seen_map``: the papers use mAP, Recall@K or
verification accuracy, and ECC depends on the metric), final self-test CMC@1 and mAP, stale-gallery
Recall@1 averaged over tasks, training time) and ``<out>/compare.png`` (the compatibility
matrices side by side). Jobs must share the scenario (same data, scenario and seed),
otherwise the table would compare different problems: that is checked.

With ``--seeds 0,1,2`` each job runs once per seed (run dirs ``<name>-s<seed>``; every job of a
seed shares that seed's scenario), each table cell is ``mean ± std`` over the seeds (sample
standard deviation; ``n`` seeds), ``compare.json`` keeps every seed's row beside the
aggregate, and the figure shows each job's matrix averaged over the seeds (and the ECC of
that mean matrix).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distcl.config import JobConfig
from distcl.eval.compat import average_compatibility
from distcl.eval.figures import panel_grid
from distcl.rundir import RunDir, atomic_write


def _row(job: JobConfig, metrics: dict) -> dict:
    metric = metrics["metric"]
    out = {"job": job.name, "method": job.method.name}
    for proto, block in metrics["protocols"].items():
        s = block["summary"]
        for k in ("ac", "am", "bc", "fc"):
            out[f"{k}_{proto}"] = s[k]
        if "map" in block["matrices"]:
            out[f"ac_{proto}_map"] = average_compatibility(
                np.asarray(block["matrices"]["map"], dtype=float), metrics.get("ties", "strict")
            )
    first = next(iter(metrics["protocols"].values()))
    main = first.get("metric", metric)
    M = np.asarray(first["matrices"][main], dtype=float)
    out["final_" + main] = float(M[-1, -1])
    if "map" in first["matrices"]:
        out["final_map"] = float(np.asarray(first["matrices"]["map"], dtype=float)[-1, -1])
    stale = metrics["stale_gallery"]
    out["stale_recall@1"] = float(np.nanmean([r["recall@1"] for r in stale]))
    # Seconds inside training epochs (the histories; meta.json of the one-run engine has no
    # per-task wall time, and start-up is the run's, not a task's).
    rd = RunDir(job.run_dir)
    out["train_s"] = sum(
        h.get("epoch_s", 0.0) for t in range(metrics["tasks"]) for h in rd.history(t)
    )
    return out


def aggregate(rows: list[dict]) -> dict:
    """One job's rows over seeds -> {column: (mean, std, n)} (text columns kept as they are);
    the sample standard deviation (ddof 1), 0 for one seed; NaNs left out of both."""
    out: dict = {"job": rows[0]["job"].rsplit("-s", 1)[0] if len(rows) > 1 else rows[0]["job"],
                 "method": rows[0]["method"], "seeds": len(rows)}  # fmt: skip
    for key in dict.fromkeys(k for r in rows for k in r if k not in ("job", "method")):
        vals = np.array([r[key] for r in rows if key in r], dtype=float)
        vals = vals[~np.isnan(vals)]
        if len(vals) == 0:
            out[key] = (float("nan"), float("nan"), 0)
        else:
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            out[key] = (float(vals.mean()), std, len(vals))
    return out


def _cell(value, column: str) -> str:
    if isinstance(value, tuple):
        mean, std, n = value
        if column == "train_s":
            return f"{mean:.0f}"
        return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"
    return f"{value:.0f}" if column == "train_s" else f"{value:.3f}"


def compare_table(rows: list[dict], metric: str) -> str:
    """One row per job; columns: every score present in the rows (protocols may differ)."""
    preferred = ["ac_all", "am_all", "bc_all", "fc_all", "ac_seen", "am_seen", "bc_seen",
                 "ac_all_map", "ac_seen_map"]  # fmt: skip
    present = list(dict.fromkeys(k for r in rows for k in r if k not in ("job", "method", "seeds")))
    tail = [f"final_{metric}", "final_map", "stale_recall@1", "train_s"]
    cols = [c for c in preferred if c in present]
    cols += [c for c in present if c not in cols and c not in tail]
    cols += [c for c in tail if c in present]
    head = "| job | method | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = ["" if c not in r else _cell(r[c], c) for c in cols]
        lines.append(f"| {r['job']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_side_by_side(results: list[tuple[str, dict]], path: Path,
                      protocol: str | None = None) -> None:  # fmt: skip
    import matplotlib

    from distcl.eval.report import draw_matrix

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = panel_grid(len(results), 5, 3.2, 3.0)
    for ax, (name, metrics) in zip(axes.flat, results, strict=False):
        protocols = metrics["protocols"]
        proto = protocol if protocol in protocols else "all" if "all" in protocols else (
            next(iter(protocols)))  # fmt: skip
        block = metrics["protocols"][proto]
        metric = block.get("metric", metrics["metric"])
        draw_matrix(ax, block["matrices"][metric], block["summary"]["ecc"], fontsize=7)
        s = block["summary"]
        ax.set_title(f"{name}\nAC={s['ac']:.2f} AM={s['am']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"compatibility matrices ({results[0][1]['metric']}; x: ECC fails)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_metrics(runs: list[dict]) -> dict:
    """One job's metrics.json over seeds, for the figure: every matrix averaged over the seeds
    and each protocol's summary recomputed from its mean main matrix."""
    from distcl.eval.compat import summarize

    if len(runs) == 1:
        return runs[0]
    out = {**runs[0], "protocols": {}}
    for proto, block in runs[0]["protocols"].items():
        mats = {name: np.nanmean([np.asarray(r["protocols"][proto]["matrices"][name], float)
                                  for r in runs], axis=0)
                for name in block["matrices"]}  # fmt: skip
        main = block.get("metric", runs[0]["metric"])
        summary = summarize(mats[main], runs[0].get("ties", "strict"),
                            am_ignores_zeros=runs[0].get("preset") == "iamcl2r"
                            and proto == "identification")  # fmt: skip
        out["protocols"][proto] = {
            **block,
            "summary": summary,
            "matrices": {k: v.tolist() for k, v in mats.items()},
        }
    return out


def write_comparison(results: list[tuple[JobConfig, list[dict]]], out: Path, log=print,
                     protocol: str | None = None) -> list:  # fmt: skip
    """``compare.md`` / ``.json`` / ``.png`` in ``out`` from (job, [its metrics.json, one per
    seed]) pairs; ``protocol``: the matrices the figure shows (default ``all``)."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [[_row(job, m) for job, m in zip(jobs, runs, strict=True)]
                for jobs, runs in results]  # fmt: skip
    rows = [aggregate(r) for r in per_seed]
    metric = results[0][1][0]["metric"]
    table = compare_table(rows, metric)
    seeds = sorted({job.seed for jobs, _ in results for job in jobs})
    title = rows[0]["job"] if len(rows) == 1 else f"{len(rows)} jobs"
    plot_side_by_side([(r["job"], mean_metrics(runs)) for r, (_, runs) in
                       zip(rows, results, strict=True)], out / "compare.png",
                      protocol)  # fmt: skip
    atomic_write(
        out / "compare.json",
        json.dumps({"seeds": seeds, "rows": rows, "per_seed": per_seed}, indent=1),
    )
    note = (
        f"Each cell: mean ± sample std over seeds {seeds} (n = {len(seeds)}); the figure: "
        "each job's matrix averaged over the seeds.\n\n"
        if len(seeds) > 1
        else ""
    )
    atomic_write(
        out / "compare.md",
        f"# distcl compare ({title})\n\n{note}{table}\n\n![matrices](compare.png)\n",
    )
    log(table)
    return rows
