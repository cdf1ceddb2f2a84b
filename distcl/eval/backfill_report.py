"""The outputs of ``distcl backfill RUN``: the curves as Parquet and JSON, their AUC table and
the figure (one panel per pair, one line per policy, AUC in the legend); read back by the
report (``distcl.eval.report``)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from distcl import storage
from distcl.eval.figures import panel_grid, save_png
from distcl.rundir import RunDir, atomic_write


def write_curves(run_dir, curves: list[dict]) -> dict:
    """``backfill/curves.parquet`` (a row per curve step), ``backfill/curves.json`` (the
    curves with their AUCs), ``backfill.png``; returns the AUC summary."""
    rd = RunDir(run_dir)
    rows = []
    for c in curves:
        for i, (f, v) in enumerate(zip(c["fractions"], c["values"], strict=True)):
            row = {"old": c["old"], "new": c["new"], "protocol": c["protocol"],
                   "policy": c["policy"], "old_rows": c.get("old_rows", "stored"),
                   "step": i, "fraction": f,
                   "rows_new": c["rows_new"][i], "cmc@1": v}  # fmt: skip
            for key in c:
                if key.startswith("map@"):
                    row[key] = c[key][i]
            rows.append(row)
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(rd.root / "backfill" / "curves.parquet", sink.getvalue().to_pybytes())
    atomic_write(rd.root / "backfill" / "curves.json", json.dumps(curves, indent=1))
    plot_curves(curves, rd.root / "backfill.png")
    return summary(curves)


def summary(curves: list[dict]) -> list[dict]:
    """One row per (protocol, pair, policy): AUC (CMC@1), AUC mAP@100, start and end values."""
    out = []
    for c in curves:
        row = {"protocol": c["protocol"], "old": c["old"], "new": c["new"], "policy": c["policy"],
               "old_rows": c.get("old_rows", "stored"), "auc": c["auc"],
               "start": c["values"][0], "end": c["values"][-1]}  # fmt: skip
        for key in c:
            if key.startswith("auc_map@"):
                row[key] = c[key]
        out.append(row)
    return out


def summary_markdown(curves: list[dict]) -> str:
    rows = summary(curves)
    maps = sorted({k for r in rows for k in r if k.startswith("auc_map@")})
    head = "| protocol | old -> new | old rows | policy | AUC (CMC@1) | " + " | ".join(
        f"AUC {k[4:]}" for k in maps) + " | at 0 | at 1 |"  # fmt: skip
    lines = [head, "|" + "---|" * (7 + len(maps))]
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f}" for k in maps)
        rows_kind = "h(old)" if r["old_rows"] == "transformed" else "old"
        lines.append(f"| {r['protocol']} | {r['old'] + 1} -> {r['new'] + 1} | {rows_kind} | "
                     f"{r['policy']} | {r['auc']:.3f} | {cells} | {r['start']:.3f} | "
                     f"{r['end']:.3f} |")  # fmt: skip
    return "\n".join(lines).replace("|  |", "|")


def plot_curves(curves: list[dict], path) -> None:
    """One panel per (protocol, pair), one line per policy, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    for c in curves:
        panels.setdefault((c["protocol"], c["old"], c["new"]), []).append(c)
    fig, axes = panel_grid(len(panels), 4, 3.6, 3.0)
    for ax, ((proto, old, new), group) in zip(axes.flat, panels.items(), strict=False):
        for c in group:
            h = c.get("old_rows") == "transformed"
            label = f"{'h(old), ' if h else ''}{c['policy']} (AUC {c['auc']:.3f})"
            ax.plot(c["fractions"], c["values"], marker=".", linestyle="-" if h else "--",
                    label=label)  # fmt: skip
        ax.set_title(f"{proto}: model {new + 1} over model {old + 1}'s gallery", fontsize=8)
        ax.set_xlabel("fraction of the gallery re-embedded", fontsize=7)
        ax.set_ylabel("CMC@1", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def load_curves(run_dir) -> list[dict] | None:
    path = RunDir(run_dir).root / "backfill" / "curves.json"
    return storage.read_json(path) if storage.is_file(path) else None
