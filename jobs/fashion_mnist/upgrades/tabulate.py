"""The tables of docs/upgrades.md from the study's run directories (mean ± sample std over
seeds): old/old, new/old, new/h(old) and new/new entries of the closed-set matrix (CMC@1 and
mAP), and the backfilling AUCs of `distcl backfill RUN --pairs 1,2 [--transform]`.

    python jobs/fashion_mnist/upgrades/tabulate.py runs/upgrades [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = ("finetune", "bct", "cl2r", "fct")


def cell(values) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    root = Path(a.root)
    lines = ["| method | metric | old/old | new/old | new/h(old) | new/new |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    curves = ["| method | old rows | policy | AUC CMC@1 | AUC mAP@100 | at 0 | at 1 |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in METHODS:
        runs = [json.loads((root / f"up-{m}-s{s}" / "metrics.json").read_text()) for s in seeds]
        for metric in ("cmc@1", "map"):
            ent = {"old/old": [], "new/old": [], "new/h(old)": [], "new/new": []}
            for r in runs:
                M = np.asarray(r["protocols"]["all"]["matrices"][metric], dtype=float)
                ent["old/old"].append(M[0, 0])
                ent["new/old"].append(M[1, 0])
                ent["new/new"].append(M[1, 1])
                if "transformed" in r["protocols"]:
                    T = np.asarray(r["protocols"]["transformed"]["matrices"][metric], dtype=float)
                    ent["new/h(old)"].append(T[1, 0])
            lines.append(f"| {m} | {metric} | " + " | ".join(cell(v) for v in ent.values()) + " |")
        groups: dict[tuple, list] = {}
        for s in seeds:
            path = root / f"up-{m}-s{s}" / "backfill" / "curves.json"
            if not path.exists():
                continue
            for c in json.loads(path.read_text()):
                if c["protocol"] != "closed":
                    continue
                groups.setdefault((c.get("old_rows", "stored"), c["policy"]), []).append(c)
        for (rows, policy), cs in sorted(groups.items()):
            curves.append(
                f"| {m} | {'h(old)' if rows == 'transformed' else 'old'} | {policy} | "
                f"{cell(c['auc'] for c in cs)} | {cell(c.get('auc_map@100') for c in cs)} | "
                f"{cell(c['values'][0] for c in cs)} | {cell(c['values'][-1] for c in cs)} |"
            )
    print("\n".join(lines))
    print()
    print("\n".join(curves))


if __name__ == "__main__":
    main()
