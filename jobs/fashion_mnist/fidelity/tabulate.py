"""The headline table of docs/fidelity.md from the study's comparisons (one `distcl compare`
per budget, `--out DIR/e<N>`): per method and budget, AC and AM (mean ± sample std over the
seeds) of a protocol's matrix, and BC/FC beside them.

    python jobs/fashion_mnist/fidelity/tabulate.py docs/fidelity e3 e10 e30 [--protocol all]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(v) -> str:
    mean, std, n = v
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("budgets", nargs="+")
    p.add_argument("--protocol", default="identification")
    a = p.parse_args()
    tables = {b: json.loads((Path(a.root) / b / "compare.json").read_text()) for b in a.budgets}
    proto = a.protocol
    head = "| method | " + " | ".join(f"{b}: AC | {b}: AM" for b in a.budgets) + " |"
    lines = [head, "|---|" + "---|---|" * len(a.budgets)]
    methods = [r["method"] for r in next(iter(tables.values()))["rows"]]
    for m in methods:
        cells = []
        for b in a.budgets:
            row = next(r for r in tables[b]["rows"] if r["method"] == m)
            cells += [cell(row[f"ac_{proto}"]), cell(row[f"am_{proto}"])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    lines = ["| method | budget | BC | FC | seeds |", "|---|---|---|---|---|"]
    for m in methods:
        for b in a.budgets:
            row = next(r for r in tables[b]["rows"] if r["method"] == m)
            lines.append(f"| {m} | {b} | {cell(row[f'bc_{proto}'])} | {cell(row[f'fc_{proto}'])} "
                         f"| {row['seeds']} |")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
