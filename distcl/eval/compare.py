"""The table and figure of ``distcl compare JOB [JOB ...]`` (which runs or reads the jobs:
:func:`distcl.pipeline.compare_jobs`).

    distcl compare jobs/fashion_mnist/*.yaml --out runs/compare

Writes ``<out>/compare.md`` (one row per job: AC, AM, BC, FC on both protocols, AC again
on the mAP matrices (``ac_all_map``, ``ac_seen_map``: the papers use mAP, Recall@K or
verification accuracy, and ECC depends on the metric), final self-test CMC@1 and mAP, stale-gallery
Recall@1 averaged over tasks, training time) and ``<out>/compare.png`` (the compatibility
matrices side by side). Jobs must share the scenario (same data, scenario and seed),
otherwise the table would compare different problems: that is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distcl.config import JobConfig
from distcl.eval.compat import average_compatibility
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
    out["stale_recall@1"] = float(np.mean([r["recall@1"] for r in stale]))
    # Seconds inside training epochs (the histories; meta.json of the one-run engine has no
    # per-task wall time, and start-up is the run's, not a task's).
    rd = RunDir(job.run_dir)
    out["train_s"] = sum(
        h.get("epoch_s", 0.0) for t in range(metrics["tasks"]) for h in rd.history(t)
    )
    return out


def compare_table(rows: list[dict], metric: str) -> str:
    """One row per job; columns: every score present in the rows (protocols may differ)."""
    preferred = ["ac_all", "am_all", "bc_all", "fc_all", "ac_seen", "am_seen", "bc_seen",
                 "ac_all_map", "ac_seen_map"]  # fmt: skip
    present = list(dict.fromkeys(k for r in rows for k in r if k not in ("job", "method")))
    tail = [f"final_{metric}", "final_map", "stale_recall@1", "train_s"]
    cols = [c for c in preferred if c in present]
    cols += [c for c in present if c not in cols and c not in tail]
    cols += [c for c in tail if c in present]
    head = "| job | method | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [
            "" if c not in r else f"{r[c]:.0f}" if c == "train_s" else f"{r[c]:.3f}" for c in cols
        ]
        lines.append(f"| {r['job']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_side_by_side(results: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    from distcl.eval.report import draw_matrix

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, metrics) in zip(axes.flat, results, strict=False):
        proto = "all" if "all" in metrics["protocols"] else next(iter(metrics["protocols"]))
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


def write_comparison(results: list[tuple[JobConfig, dict]], out: Path, log=print) -> list[dict]:
    """``compare.md`` / ``.json`` / ``.png`` in ``out`` from (job, its metrics.json) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [_row(job, metrics) for job, metrics in results]
    metric = results[0][1]["metric"]
    table = compare_table(rows, metric)
    plot_side_by_side([(job.name, m) for job, m in results], out / "compare.png")
    atomic_write(out / "compare.json", json.dumps(rows, indent=1))
    atomic_write(
        out / "compare.md", "# distcl compare\n\n" + table + "\n\n![matrices](compare.png)\n"
    )
    log(table)
    return rows
