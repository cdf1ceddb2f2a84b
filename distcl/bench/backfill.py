"""``distcl bench backfill``: a whole backfilling curve against one engine pass, same run.

    distcl bench backfill                  # 1M-row galleries of 2 models, 10k probes, d=128
    distcl bench backfill --rows 100000 --map

Synthetic Parquet stores of two models (``distcl bench eval``'s: items of held-out classes,
2 probes per class, the rest gallery). Each measurement runs in a fresh subprocess (its peak
RSS is its own):

- **one engine pass** (the baseline): the open-protocol cell of gallery model 1 searched by
  model 2's probes (``Engine.scan`` over the gallery's shards, then ``finish``): CMC/Recall@K
  and mAP@100 from top-100 lists, every Parquet read included;
- **the curve**: the 22-point backfilling curve (K = 20 steps) of the same pair and one
  policy (random; ``--policy``), CMC@1 (``--map``: mAP@100 beside it), streamed
  (``distcl.eval.backfill_scan``): a pass over model 2's rows and one over model 1's.

Goals: the curve at most 3x one pass; its peak RSS below 2x one model's gallery (N x d x 4
bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def engine_pass(run_dir: Path, budget_mb: int, seed: int) -> dict:
    """One pass: gallery model 0 searched by model 1's probes (call in a fresh process)."""
    import distcl.gallery.search  # noqa: F401  (faiss: import time is not evaluation time)
    from distcl.bench.evalcost import _settings, peak_rss_mb
    from distcl.eval.engine import Cell, Engine

    t0 = time.perf_counter()
    engine = Engine(run_dir, _settings(budget_mb, "flat", seed), scenario=None)
    cell = Cell("gallery", 0, (1,))
    result = engine.finish(cell, [engine.scan(cell, p) for p in engine.shards(cell)])
    cmc = next(m for _, proto, _, m, _ in result["puts"] if proto == "open")["cmc@1"]
    return {"pass_s": time.perf_counter() - t0, "pass_peak_rss_mb": peak_rss_mb(),
            "pass_cmc@1": cmc}  # fmt: skip


def curve(run_dir: Path, budget_mb: int, seed: int, policy: str, steps: int, with_map: bool):
    """The backfilling curve of (model 0 -> model 1) on the open gallery (a fresh process)."""
    from distcl.bench.evalcost import _settings, peak_rss_mb
    from distcl.eval import backfill as bf
    from distcl.eval import backfill_scan as bs
    from distcl.eval.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(run_dir, _settings(budget_mb, "flat", seed), scenario=None)
    (target,) = bs.targets(engine, ["open"])
    cuts = bf.step_cuts(int(target.members.sum()), steps)
    buckets = bs.policy_buckets(engine, target, 0, 1, [policy], cuts, seed)
    queries = engine._query_data(1)["probes"]
    acc = bs._passes(engine, target, 0, 1, queries, buckets, cuts,
                     bf.MAP_K if with_map else None)[policy]  # fmt: skip
    res = acc.result()
    out = {"curve_s": time.perf_counter() - t0, "curve_peak_rss_mb": peak_rss_mb(),
           "values": res["values"], "auc": sum(res["values"]) / len(res["values"])}  # fmt: skip
    if with_map:
        out["map@100"] = res["map@100"]
    return out


def _sub(call: str) -> dict:
    code = ("import json; from pathlib import Path; "
            "from distcl.bench.backfill import engine_pass, curve; "
            f"print(json.dumps({call}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_backfill_bench(rows: int = 1_000_000, probes: int = 10_000, dim: int = 128,
                       budget_mb: int = 1024, policy: str = "random", steps: int = 20,
                       with_map: bool = False, seed: int = 0,
                       workdir: str | None = None) -> dict:  # fmt: skip
    from distcl.bench.evalcost import write_store

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        write_store(run_dir / "eval" / "embeddings", 2, rows, probes, dim, seed)
        out = {"rows": rows, "probes": probes, "dim": dim, "budget_mb": budget_mb,
               "policy": policy, "points": steps + 2, "with_map": with_map,
               "write_s": time.perf_counter() - t0}  # fmt: skip
        out |= _sub(f"engine_pass(Path({str(run_dir)!r}), {budget_mb}, {seed})")
        out |= _sub(f"curve(Path({str(run_dir)!r}), {budget_mb}, {seed}, {policy!r}, {steps}, "
                    f"{with_map})")  # fmt: skip
    out["ratio_curve_over_pass"] = out["curve_s"] / out["pass_s"]
    out["gallery_mb"] = rows * dim * 4 / 2**20
    out["curve_peak_over_gallery"] = out["curve_peak_rss_mb"] / out["gallery_mb"]
    out["curve_equals_pass_at_start"] = abs(out["values"][0] - out["pass_cmc@1"]) < 1e-12
    return out


def format_backfill_bench(r: dict) -> str:
    return "\n".join([
        f"distcl bench backfill: galleries of {r['rows']} rows x 2 models, {r['probes']} "
        f"probes, d={r['dim']}, budget {r['budget_mb']} MiB",
        f"  write Parquet:   {r['write_s']:.1f} s",
        f"  one engine pass: {r['pass_s']:.1f} s (peak RSS {r['pass_peak_rss_mb']:.0f} MiB)",
        f"  the curve ({r['points']} points, {r['policy']}"
        f"{', + mAP@100' if r['with_map'] else ''}): {r['curve_s']:.1f} s, peak RSS "
        f"{r['curve_peak_rss_mb']:.0f} MiB = {r['curve_peak_over_gallery']:.2f} x one model's "
        f"gallery ({r['gallery_mb']:.0f} MiB; goal < 2)",
        f"  ratio curve / pass: {r['ratio_curve_over_pass']:.2f} (goal <= 3)",
        f"  curve at 0 = the pass's CMC@1 ({r['pass_cmc@1']:.4f}): "
        f"{r['curve_equals_pass_at_start']}; at 1: {r['values'][-1]:.4f}, AUC {r['auc']:.4f}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench backfill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=1_000_000, help="gallery rows per model")
    p.add_argument("--probes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--budget-mb", type=int, default=1024, help="eval.memory_budget_mb")
    p.add_argument("--policy", default="random", choices=["random", "distance", "class_mean"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--map", action="store_true", help="mAP@100 beside CMC@1")
    p.add_argument("--workdir", default=None, help="where the Parquet stores are written")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_backfill_bench(a.rows, a.probes, a.dim, a.budget_mb, a.policy, a.steps, a.map,
                           workdir=a.workdir)  # fmt: skip
    print(json.dumps(r, indent=1) if a.json else format_backfill_bench(r))
