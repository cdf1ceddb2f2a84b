"""``distcl bench eval``: what the T x T evaluation costs, in embedding passes and seconds.

On a finished run directory, measured in one run: the seconds of one embedding pass of
the evaluation set (a real pass with model 0), and the seconds of computing both
compatibility matrices (``all`` and ``seen``) from the stored embeddings. distcl embeds
the set once per model (T passes); the per-pair protocol (each of the T(T+1)/2 pairs
embeds queries and gallery again) needs T(T+1) passes: its cost is the measured pass time
times that count.

    distcl bench eval [--run-dir runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run_eval_bench(run_dir: str | Path = "runs/quickstart") -> dict:
    import yaml

    from distcl.config import parse_job
    from distcl.data.scenario import Scenario
    from distcl.data.shards import shard_paths
    from distcl.eval import compat
    from distcl.eval.evaluate import _load_eval_embeddings
    from distcl.train.driver import embed_paths, init_ray

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "job.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run directory (run `distcl run JOB` first)")
    job = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()), str(run_dir))
    scenario = Scenario.from_json(json.loads((run_dir / "scenario.json").read_text()))
    T = sum(
        (run_dir / "models" / str(t) / "post.json").is_file() for t in range(scenario.num_tasks)
    )
    init_ray()
    manifest_dir = (
        job.shards_dir
        if job.shards_dir.is_absolute()
        else (run_dir.parent / "shards" / job.data_fingerprint())
    )
    paths = shard_paths(manifest_dir, range(scenario.num_tasks), "gallery")
    from distcl.data.shards import load_manifest

    manifest = load_manifest(manifest_dir)
    embed_paths(
        job, run_dir / "models" / "0", paths, manifest["num_classes"], manifest["image_shape"][0]
    )  # warm-up: worker processes import torch
    t0 = time.perf_counter()
    out = embed_paths(
        job, run_dir / "models" / "0", paths, manifest["num_classes"], manifest["image_shape"][0]
    )
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, labels, embs = _load_eval_embeddings(run_dir, T, job.eval.items_per_class, job.seed)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seen = [np.isin(labels, scenario.tasks[t].seen_classes) for t in range(T)]
    compat.compatibility_matrices(embs, labels, ("cmc@1", "map"))
    compat.compatibility_matrices(embs, labels, ("cmc@1", "map"), seen_masks=seen)
    metric_s = time.perf_counter() - t0
    ours = T * pass_s + load_s + metric_s
    naive = T * (T + 1) * pass_s + metric_s
    return {
        "tasks": T, "eval_items": int(len(out["keys"])), "pass_s": pass_s,
        "passes_distcl": T, "passes_per_pair": T * (T + 1),
        "metrics_s": metric_s, "load_s": load_s,
        "distcl_total_s": ours, "per_pair_total_s": naive, "speedup": naive / ours,
    }  # fmt: skip


def format_eval_bench(r: dict) -> str:
    return "\n".join([
        f"distcl bench eval: T={r['tasks']}, {r['eval_items']} evaluation items",
        f"  one embedding pass:         {r['pass_s']:.2f} s",
        f"  matrices (all + seen):      {r['metrics_s']:.2f} s (+{r['load_s']:.2f} s Parquet)",
        f"  distcl:   {r['passes_distcl']:3d} passes, {r['distcl_total_s']:.1f} s",
        f"  per pair: {r['passes_per_pair']:3d} passes, {r['per_pair_total_s']:.1f} s",
        f"  ratio per-pair / distcl: {r['speedup']:.2f}x",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench eval", description=__doc__)
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_eval_bench(a.run_dir)
    print(json.dumps(r, indent=1) if a.json else format_eval_bench(r))
