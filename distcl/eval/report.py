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


#: Above this many tasks the report summarises: heatmaps without cell values and with ticks
#: every 5 tasks, a row summary instead of the T x T table, the stale table every 5 tasks.
LARGE_T = 12


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _ticks(T: int) -> list[int]:
    """0-indexed positions labelled on a T-task axis: all, or 1, 5, 10, ... and T."""
    if T <= LARGE_T:
        return list(range(T))
    return sorted({0, *range(4, T, 5), T - 1})


def rows_markdown(M, ecc=None) -> str:
    """The matrix of a long sequence, one line per query model (every 5th and the last):
    its diagonal, the mean, min and newest old entry of its row, and the compatible pairs."""
    M = np.asarray(M, dtype=float)
    T = len(M)
    lines = ["| query model | M[i][i] | row mean (j < i) | row min | M[i][i-1] | compatible |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for i in _ticks(T):
        old = M[i, :i]
        ok = f"{int(np.sum(ecc[i][:i]))}/{i}" if ecc is not None and i else ""
        lines.append(f"| φ{i + 1} | {_fmt(M[i, i])} | {_fmt(old.mean() if i else None)} | "
                     f"{_fmt(old.min() if i else None)} | {_fmt(M[i, i - 1] if i else None)} | "
                     f"{ok} |")  # fmt: skip
    return "\n".join(lines)


def summary_over_tasks(M, ties: str = "strict", am_ignores_zeros: bool = False) -> dict:
    """AC, AM, BC, FC of the matrix of the first t models, t = 1 .. T (curves)."""
    from distcl.eval import compat

    M = np.asarray(M, dtype=float)
    out: dict[str, list] = {k: [] for k in ("ac", "am", "bc", "fc")}
    for t in range(1, len(M) + 1):
        s = compat.summarize(M[:t, :t], ties, am_ignores_zeros=am_ignores_zeros)
        for k in out:
            out[k].append(s[k])
    return out


def plot_summary_curves(curves: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(curves["am"])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    xs = np.arange(1, T + 1)
    for k, style in (("am", "o-"), ("ac", "s-"), ("bc", "^--"), ("fc", "v--")):
        ys = np.array([np.nan if v is None else v for v in curves[k]], dtype=float)
        ax.plot(xs, ys, style, markersize=3 if T > LARGE_T else 5, label=k.upper())
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("tasks so far")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def matrix_markdown(M, ecc=None) -> str:
    M = np.asarray(M, dtype=float)
    T = len(M)
    if T > LARGE_T:
        return rows_markdown(M, ecc)
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
    if T > LARGE_T:  # no values in cells; pairs failing ECC as small red dots
        bad = [(j, i) for i in range(T) for j in range(i) if not ecc[i][j]]
        if bad:
            ax.scatter(*zip(*bad, strict=True), s=max(1.0, 400 / T**1.2), c="red", marker=".")
        return im
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
    size = min(T, LARGE_T)
    fig, ax = plt.subplots(figsize=(1.1 * size + 2, 1.0 * size + 1.5))
    im = draw_matrix(ax, M, ecc)
    ticks = _ticks(T)
    ax.set_xticks(ticks, [f"φ{j + 1}" for j in ticks])
    ax.set_yticks(ticks, [f"φ{i + 1}" for i in ticks])
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
    marker = "." if len(xs) > LARGE_T else "o"
    for key in ("cmc@1", "map", "recall@5"):
        if all(key in r for r in stale):
            axes[0].plot(xs, [r[key] for r in stale], marker=marker, label=key)
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
        T = len(M)
        curves = summary_over_tasks(M, ties, result.get("preset") == "iamcl2r"
                                    and proto == "identification")  # fmt: skip
        plot_summary_curves(curves, run_dir / f"summary_{proto}.png",
                            f"{result['job']}: {metric} ({proto}), the matrix so far")  # fmt: skip
        layout = (f"{T} tasks: one line per 5th query model (the full matrix is in "
                  "metrics.json and the heatmap). " if T > LARGE_T else "")  # fmt: skip
        parts += [
            f"## Compatibility matrix: {_TITLES.get(proto, proto)} (`{proto}`, {metric})", "",
            f"M[i][j]: queries embedded by model i, gallery by model j. ✓/✗: ECC "
            f"({_rule(result)}).{note} {layout}", "",
            matrix_markdown(M, s["ecc"]), "",
            f"AC={_fmt(s['ac'])} AM={_fmt(s['am'])} BC={_fmt(s['bc'])} FC={_fmt(s['fc'])} "
            f"compatible pairs {s['n_compatible']}/{s['n_pairs']}"
            + (" (eval.preset iamcl2r: AM over the non-zero entries, as its code)"
               if result.get("preset") == "iamcl2r" and proto == "identification" else ""),
            "",
            f"![{proto}]({png})", "",
            f"AM, AC, BC and FC of the first t models, t = 1 .. {T}:", "",
            f"![{proto} over tasks](summary_{proto}.png)", "",
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
    for n in _ticks(len(stale)):
        r = stale[n]
        cells = " | ".join(_fmt(r.get(k)) for k in keys)
        parts.append(f"| {r['task'] + 1} | {r['gallery']} | {cells} |")
    means = [
        _fmt(np.nanmean([r[k] for r in stale])) if all(k in r for r in stale) else "" for k in keys
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
    console.print(f"ECC tie rule: {result.get('ties', 'strict')} ({_rule(result)})",
                  markup=False)  # fmt: skip
    for proto, block in result["protocols"].items():
        metric = block.get("metric", result["metric"])
        M = np.asarray(block["matrices"][metric], dtype=float)
        s = block["summary"]
        T = len(M)
        if T > LARGE_T:  # a long sequence: its row summary, not a T x T table
            console.print(f"{result['job']}: {metric}, protocol '{proto}', {T} tasks")
            # markup=False: "[i]" and "[all]" are text here, not rich's style tags
            console.print(rows_markdown(M, s["ecc"]), markup=False)
        else:
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
        console.print(f"[{proto}] AC={_fmt(s['ac'])} AM={_fmt(s['am'])} "
                      f"BC={_fmt(s['bc'])} FC={_fmt(s['fc'])}", markup=False)  # fmt: skip
    stale = result["stale_gallery"]
    keys = [k for k in ("cmc@1", "map") if all(k in r for r in stale)]
    mean = {k: np.nanmean([r[k] for r in stale]) for k in keys}
    console.print("stale gallery mean: " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
