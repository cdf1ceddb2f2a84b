"""The run report: tables in ``report.md``, a compatibility heatmap per protocol, curves.

Heatmap cells carry their values; a pair that fails the empirical compatibility criterion
(strict: M[i][j] <= M[j][j]; ties_pass: M[i][j] < M[j][j]) is marked with a red x. The report
names the ECC tie rule and, per protocol, whether ``map`` is exact or mAP@K from top-k lists.
``print_summary`` renders the matrices and the summary lines on the terminal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distcl import storage
from distcl.eval.figures import save_png
from distcl.rundir import atomic_write
from distcl.storage import Uri

_TITLES = {"all": "closed, all classes", "seen": "closed, classes the gallery model had seen",
           "open": "open set (held-out classes)", "verification": "1:1 verification",
           "identification": "identification",
           "transformed": "closed, old gallery rows transformed by h (FCT)"}  # fmt: skip


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def matrix_markdown(M, ecc=None) -> str:
    M = np.asarray(M, dtype=float)
    T = len(M)
    head = "| query \\ gallery | " + " | ".join(f"φ{j + 1}" for j in range(T)) + " |"
    lines = [head, "|" + "---|" * (T + 1)]
    for i in range(T):
        cells = []
        for j in range(T):
            if j > i:
                cells.append("")
                continue
            mark = ""
            if ecc is not None and j < i:
                mark = " ✓" if ecc[i][j] else " ✗"
            cells.append(_fmt(M[i][j]) + mark)
        lines.append(f"| φ{i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_matrix(ax, M, ecc, fontsize: int = 9):
    """Draw the lower triangle of M on ``ax`` with values in the cells and a red x on each
    pair that fails ECC; returns the image (for a colorbar)."""
    M = np.asarray(M, dtype=float)
    T = len(M)
    masked = np.ma.masked_invalid(np.where(np.tril(np.ones_like(M)) > 0, M, np.nan))
    im = ax.imshow(masked, cmap="viridis", vmin=0, vmax=1)
    for i in range(T):
        for j in range(i + 1):
            color = "white" if M[i, j] < 0.6 else "black"
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color=color,
                    fontsize=fontsize)  # fmt: skip
            if j < i and not ecc[i][j]:
                ax.text(j + 0.32, i - 0.3, "x", color="red", fontsize=fontsize + 1,
                        weight="bold")  # fmt: skip
    return im


def plot_matrix(M, ecc, path: Path | Uri, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(M)
    fig, ax = plt.subplots(figsize=(1.1 * T + 2, 1.0 * T + 1.5))
    im = draw_matrix(ax, M, ecc)
    ax.set_xticks(range(T), [f"φ{j + 1}" for j in range(T)])
    ax.set_yticks(range(T), [f"φ{i + 1}" for i in range(T)])
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_curves(result: dict, path: Path | Uri) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stale = result["stale_gallery"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [r["task"] + 1 for r in stale]
    for key in ("cmc@1", "map", "recall@5"):
        if all(key in r for r in stale):
            axes[0].plot(xs, [r[key] for r in stale], marker="o", label=key)
    axes[0].set_title("stale gallery (queries by model s)")
    axes[0].set_xlabel("task s")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    hist = result.get("history", [])
    if hist:
        axes[1].plot(
            range(len(hist)), [h["train_acc"] for h in hist], marker=".", label="train acc"
        )
        axes[1].set_title("train accuracy per epoch (all tasks)")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylim(0, 1)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _rule(result: dict) -> str:
    ties = result.get("ties", "strict")
    return "M[i][j] > M[j][j]" if ties == "strict" else "M[i][j] >= M[j][j]"


def write_report(run_dir: str | Path | Uri, result: dict) -> str:
    """Write report.md and the PNGs (a local folder or an object-store prefix); return the
    markdown."""
    run_dir = storage.location(run_dir)
    ties = result.get("ties", "strict")
    parts = [
        f"# {result['job']} ({result['method']})",
        "",
        f"{result['tasks']} tasks, {result['eval_items']} closed-set evaluation items, "
        f"{result['embedding_passes']} embedding passes. ECC tie rule: `{ties}` "
        f"(a pair is compatible iff {_rule(result)}).",
        "",
    ]
    for proto, block in result["protocols"].items():
        s = block["summary"]
        metric = block.get("metric", result["metric"])
        M = block["matrices"][metric]
        png = f"compat_{proto}.png"
        plot_matrix(M, s["ecc"], run_dir / png, f"{result['job']}: {metric} ({proto})")
        kind = block.get("map_kind")
        note = (
            f" `map` is {'exact mAP' if kind == 'exact' else kind + ' (top-k lists)'}."
            if kind
            else ""
        )
        parts += [
            f"## Compatibility matrix: {_TITLES.get(proto, proto)} (`{proto}`, {metric})", "",
            f"M[i][j]: queries embedded by model i, gallery by model j. ✓/✗: ECC "
            f"({_rule(result)}).{note}", "",
            matrix_markdown(M, s["ecc"]), "",
            f"AC={_fmt(s['ac'])} AM={_fmt(s['am'])} BC={_fmt(s['bc'])} FC={_fmt(s['fc'])} "
            f"compatible pairs {s['n_compatible']}/{s['n_pairs']}"
            + (" (eval.preset iamcl2r: AM over the non-zero entries, as its code)"
               if result.get("preset") == "iamcl2r" and proto == "identification" else ""),
            "",
            f"![{proto}]({png})", "",
        ]  # fmt: skip
    stale = result["stale_gallery"]
    keys = list(
        dict.fromkeys(
            k for r in stale for k in r if k == "map" or k.startswith(("cmc@", "map@", "recall@"))
        )
    )
    kind = stale[0].get("map_kind", "exact")
    parts += [
        "## Stale gallery (deployment case)",
        "",
        f"`map` is {'exact mAP' if kind == 'exact' else kind + ' (top-k lists)'}.",
        "",
        "| task | gallery | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for r in stale:
        cells = " | ".join(_fmt(r.get(k)) for k in keys)
        parts.append(f"| {r['task'] + 1} | {r['gallery']} | {cells} |")
    means = [
        _fmt(np.mean([r[k] for r in stale])) if all(k in r for r in stale) else "" for k in keys
    ]
    parts.append("| mean | | " + " | ".join(means) + " |")
    plot_curves(result, run_dir / "curves.png")
    parts += ["", "![curves](curves.png)", ""]
    from distcl.eval.backfill_report import load_curves, summary_markdown

    if curves := load_curves(run_dir):  # `distcl backfill RUN` wrote them
        parts += [
            "## Backfilling (`distcl backfill`)", "",
            "CMC@1 as a growing share of the old model's gallery is re-embedded by the new "
            "model, in each policy's order; AUC is the mean of the curve's points "
            "(docs/backfill.md).", "",
            summary_markdown(curves), "", "![backfill](backfill.png)", "",
        ]  # fmt: skip
    text = "\n".join(parts)
    atomic_write(run_dir / "report.md", text)
    return text


def print_summary(result: dict, log=print) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"ECC tie rule: {result.get('ties', 'strict')} ({_rule(result)})")
    for proto, block in result["protocols"].items():
        metric = block.get("metric", result["metric"])
        M = np.asarray(block["matrices"][metric], dtype=float)
        s = block["summary"]
        T = len(M)
        table = Table(
            title=f"{result['job']}: {metric}, protocol '{proto}' "
            f"(rows: query model, cols: gallery model)"
        )
        table.add_column("")
        for j in range(T):
            table.add_column(f"φ{j + 1}", justify="right")
        for i in range(T):
            row = []
            for j in range(T):
                if j > i:
                    row.append("")
                else:
                    cell = f"{M[i, j]:.3f}"
                    if j < i:
                        cell += " ✓" if s["ecc"][i][j] else " ✗"
                    row.append(cell)
            table.add_row(f"φ{i + 1}", *row)
        console.print(table)
        console.print(
            f"[{proto}] AC={_fmt(s['ac'])} AM={_fmt(s['am'])} BC={_fmt(s['bc'])} FC={_fmt(s['fc'])}"
        )
    stale = result["stale_gallery"]
    keys = [k for k in ("cmc@1", "map") if all(k in r for r in stale)]
    mean = {k: np.mean([r[k] for r in stale]) for k in keys}
    console.print("stale gallery mean: " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
