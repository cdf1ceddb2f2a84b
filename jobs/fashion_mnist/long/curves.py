"""The 50-task figure and table of docs/results.md ("Fifty tasks") from finished runs: AM, AC
and BC of the matrix of the first t models, t = 1 .. T, one line per run, and the values
every 10 tasks.

    python jobs/fashion_mnist/long/curves.py runs/long-finetune runs/long-cl2r runs/long-hoc \
        --out docs/results/long50.png [--protocol all]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distcl.eval.report import summary_over_tasks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", default="all")
    a = p.parse_args()
    curves = {}
    for run in a.runs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        block = m["protocols"][a.protocol]
        M = np.asarray(block["matrices"][block.get("metric", m["metric"])], dtype=float)
        curves[m["job"]] = summary_over_tasks(M, m.get("ties", "strict"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharex=True)
    for name, c in curves.items():
        for ax, key in zip(axes, ("am", "ac", "bc"), strict=True):
            ys = np.array([np.nan if v is None else v for v in c[key]], dtype=float)
            ax.plot(np.arange(1, len(ys) + 1), ys, label=name)
            ax.set_title(f"{key.upper()} of the first t models ({a.protocol})", fontsize=9)
            ax.set_xlabel("tasks so far (t)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)

    ticks = [t for t in (10, 20, 30, 40, 50) if t <= min(len(c["am"]) for c in curves.values())]
    print("| run | " + " | ".join(f"t={t}: AM / AC / BC" for t in ticks) + " |")
    print("|---|" + "---|" * len(ticks))
    for name, c in curves.items():
        cells = []
        for t in ticks:
            am, ac, bc = (c[k][t - 1] for k in ("am", "ac", "bc"))
            cells.append(f"{am:.3f} / " + ("–" if ac is None else f"{ac:.3f}") + " / "
                         + ("–" if bc is None else f"{bc:.3f}"))  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
