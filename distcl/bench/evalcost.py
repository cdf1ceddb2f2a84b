"""``distcl bench eval``: the streamed evaluation engine against raw faiss, same run, same pairs.

    distcl bench eval                          # T=5, 1M-row gallery, 10k probes, d=128
    distcl bench eval --rows 100000            # smaller
    distcl bench eval --ivfpq-rows 10000000    # + one IVF-PQ gallery: time, memory, recall@10
    distcl bench eval --ivfpq-rows 1000000 --nprobe 16,64,256   # its recall against nprobe
    distcl bench eval --ray-tasks 2            # + the engine as Ray tasks, same run

Synthetic embeddings (seeded class centres + per-model drift + noise, L2-normalised) are
written as Parquet like a run's ``eval/embeddings/model=<t>/part-<rank>.parquet`` (items of
held-out classes, 2 probes per class, the rest gallery). Measured:

- the whole open-protocol matrix (T(T+1)/2 pairs, CMC/Recall@K and mAP@100 from top-100
  lists) by ``distcl.eval.engine`` in a fresh subprocess: wall time, including every Parquet
  read, and its peak RSS (VmHWM) against one model's gallery size (N x d x 4 bytes);
- raw faiss on the same pairs, embeddings already in memory: ``IndexFlatIP`` per gallery,
  ``search(probes, 100)``; the ratio raw / engine is the goal (>= 0.8);
- ``--ray-tasks N``: the same matrix by the engine as Ray tasks (``distcl.eval.distributed``)
  on an embedded Ray of N CPUs, a gallery shard per Parquet part: wall time, the driver's
  peak RSS (it holds no embeddings), and whether the numbers equal the in-process engine's;
- ``--ivfpq-rows N``: one model, a gallery of N rows through ``eval.index = ivfpq`` (streamed
  add), time and peak RSS, and recall@10 against exact search on a sample of probes, once
  per ``--nprobe`` value (``eval.nprobe``: lists probed per query) on the same Parquet store.

With faiss-gpu and a GPU the engine and the baseline both use the GPU(s).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 100  # neighbours per probe (the engine's MAP_AT_K)
PARTS = 4  # Parquet parts per model (as if written by 4 ranks)


def _embed(rng_seed: int, centres: np.ndarray, labels: np.ndarray, model: int) -> np.ndarray:
    """Model ``model``'s embeddings (n, d) of items with ``labels``: deterministic."""
    rng = np.random.default_rng([rng_seed, model])
    drift = rng.normal(scale=0.1 * model, size=centres.shape).astype(np.float32)  # (C, d)
    x = centres[labels] + drift[labels]  # (n, d)
    x += rng.standard_normal(x.shape, dtype=np.float32) * 2.5  # same-class cos ~0.15
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _layout(rows: int, probes: int, dim: int, seed: int):
    classes = max(2, probes // 2)
    per_class = max(3, -(-(rows + probes) // classes))
    labels = np.repeat(np.arange(classes), per_class)[: max(rows + probes, 3 * classes)]
    centres = np.random.default_rng([seed, 99]).standard_normal((classes, dim), dtype=np.float32)
    return labels, centres


def write_store(root: Path, tasks: int, rows: int, probes: int, dim: int, seed: int) -> None:
    from distcl.gallery.store import write_embeddings

    labels, centres = _layout(rows, probes, dim, seed)
    ids = np.array([f"h{i:09d}" for i in range(len(labels))])
    for t in range(tasks):
        for r, part in enumerate(np.array_split(np.arange(len(labels)), PARTS)):
            emb = _embed(seed * 1000 + r, centres, labels[part], t)
            write_embeddings(root, t, f"part-{r}", ids[part], labels[part],
                             np.full(len(part), -1), emb)  # fmt: skip


def _settings(budget_mb: int, index: str, seed: int, nprobe: int = 16):
    from distcl.eval.engine import EvalSettings
    from distcl.gallery.index import gpu_available

    return EvalSettings(
        protocols=("open",), exact_map=False, index=index, seed=seed, memory_budget_mb=budget_mb,
        probes_per_class=2, use_gpu=gpu_available(),  # the raw-faiss baseline's device
        nprobe=nprobe,
    )  # fmt: skip


def peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (reset by exec, unlike ``ru_maxrss``, which a
    child inherits from the parent that forked it); ``ru_maxrss`` where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine_run(run_dir: Path, tasks: int, budget_mb: int, index: str, seed: int,
               nprobe: int = 16) -> dict:  # fmt: skip
    """The open matrix by the engine (call in a fresh process for a clean peak RSS)."""
    import distcl.gallery.search  # noqa: F401  (faiss: import time is not evaluation time)
    from distcl.eval.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(run_dir, _settings(budget_mb, index, seed, nprobe), scenario=None)
    rows = engine.rows(list(range(tasks)), stale=False)
    wall = time.perf_counter() - t0
    M = [rows[i]["protocols"]["open"]["values"] for i in range(tasks)]
    return {
        "engine_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "cmc@1_diag": [M[i]["cmc@1"][i] for i in range(tasks)],
        "cmc@1_last_row": M[-1]["cmc@1"],
        "ann_recall": [
            r for m in M for k, v in m.items() if k.startswith("ann_recall") for r in v
        ],  # fmt: skip
        "probes": rows[0]["items"]["probes"],
        "gallery": rows[0]["items"]["open_gallery"],
    }


def ray_engine_run(run_dir: Path, tasks: int, budget_mb: int, seed: int, cpus: int,
                   shard_rows: int) -> dict:  # fmt: skip
    """The open matrix by the engine as Ray tasks (``distcl.eval.distributed``) on an embedded
    local Ray of ``cpus`` CPUs, one gallery shard per ``shard_rows`` rows; the driver's peak
    RSS shows what it holds (call in a fresh process)."""
    import dataclasses

    from distcl.eval.distributed import ray_rows
    from distcl.localray import init_ray

    init_ray(num_cpus=cpus)
    settings = dataclasses.replace(_settings(budget_mb, "flat", seed), shard_rows=shard_rows)
    t0 = time.perf_counter()
    rows = ray_rows(run_dir, settings, None, list(range(tasks)), stale=False)
    wall = time.perf_counter() - t0
    M = [rows[i]["protocols"]["open"]["values"] for i in range(tasks)]
    return {"ray_engine_s": wall, "ray_driver_peak_rss_mb": peak_rss_mb(), "ray_tasks": cpus,
            "ray_cmc@1_last_row": M[-1]["cmc@1"]}  # fmt: skip


def _subprocess_engine(run_dir: Path, tasks: int, budget_mb: int, index: str, seed: int,
                       ray: tuple[int, int] | None = None, nprobe: int = 16) -> dict:  # fmt: skip
    path = repr(str(run_dir))
    if ray:
        call = f"ray_engine_run(Path({path}), {tasks}, {budget_mb}, {seed}, {ray[0]}, {ray[1]})"
    else:
        call = f"engine_run(Path({path}), {tasks}, {budget_mb}, {index!r}, {seed}, {nprobe})"
    code = (
        "import json, sys; from pathlib import Path; "
        "from distcl.bench.evalcost import engine_run, ray_engine_run;"
        f"print(json.dumps({call}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_faiss(tasks: int, rows: int, probes: int, dim: int, seed: int) -> dict:
    """Raw faiss flat search of the same pairs, embeddings in memory (not timed: making them)."""
    import faiss

    from distcl.eval.protocols import open_split
    from distcl.gallery.index import gpu_available

    labels, centres = _layout(rows, probes, dim, seed)
    split = open_split(labels, np.ones(len(labels), bool), 2, 0, seed)
    parts = np.array_split(np.arange(len(labels)), PARTS)
    search_s = 0.0
    for j in range(tasks):
        emb = np.concatenate([_embed(seed * 1000 + r, centres, labels[p], j)
                              for r, p in enumerate(parts)])  # fmt: skip
        index = faiss.IndexFlatIP(dim)
        if gpu_available():
            index = faiss.index_cpu_to_all_gpus(index)
        t0 = time.perf_counter()
        index.add(emb[split.gallery])
        search_s += time.perf_counter() - t0
        for i in range(j, tasks):
            q = emb[split.probes] if i == j else np.concatenate(
                [_embed(seed * 1000 + r, centres, labels[p], i) for r, p in enumerate(parts)]
            )[split.probes]  # fmt: skip
            t0 = time.perf_counter()
            index.search(np.ascontiguousarray(q), K)
            search_s += time.perf_counter() - t0
        del index, emb
    return {"raw_faiss_s": search_s}


# ------------------------------------------------------------- open-set 1:N with distractors
def write_distractors(root: Path, tasks: int, rows: int, dim: int, seed: int) -> None:
    """``rows`` distractor rows per model (identities of their own: centres no probe has),
    written as ``eval.distractors`` reads them (``model=<t>/part-<r>.parquet``)."""
    from distcl.gallery.store import write_embeddings

    per_part = np.array_split(np.arange(rows), PARTS)
    for t in range(tasks):
        for r, part in enumerate(per_part):
            rng = np.random.default_rng([seed, 77, r])
            centres = rng.standard_normal((max(1, len(part) // 4), dim), dtype=np.float32)
            lab = np.arange(len(part)) % len(centres)
            emb = _embed(seed * 1000 + 500 + r, centres, lab, t)
            write_embeddings(root, t, f"part-{r}", np.array([f"d{i:09d}" for i in part]),
                             np.full(len(part), -1), np.full(len(part), -1), emb)  # fmt: skip


def _openset_settings(budget_mb: int, seed: int, distractors: str):
    import dataclasses

    return dataclasses.replace(_settings(budget_mb, "flat", seed), protocols=("openset",),
                               distractors=distractors)  # fmt: skip


def openset_engine_run(run_dir: Path, tasks: int, budget_mb: int, seed: int,
                       distractors: str) -> dict:  # fmt: skip
    """The openset matrix (TPIR@FPIR, rank-1) by the engine (call in a fresh process)."""
    from distcl.eval.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(run_dir, _openset_settings(budget_mb, seed, distractors), scenario=None)
    rows = engine.rows(list(range(tasks)), stale=False)
    wall = time.perf_counter() - t0
    M = [rows[i]["protocols"]["openset"]["values"] for i in range(tasks)]
    items = rows[0]["items"]
    return {"engine_s": wall, "peak_rss_mb": peak_rss_mb(), "last_row": M[-1],
            "mated": items["openset_mated_probes"],
            "nonmated": items["openset_nonmated_probes"],
            "enrolled_gallery": items["openset_gallery"]}  # fmt: skip


def openset_raw_faiss(tasks: int, rows: int, probes: int, dim: int, seed: int,
                      distractors: int) -> dict:  # fmt: skip
    """Raw faiss on the same pairs: per gallery model an IndexFlatIP of its enrolled rows and
    its distractors, every later model's probes searched for their top 1 (TPIR from it);
    embeddings made in memory first (not timed)."""
    import faiss

    from distcl.eval.metrics import fpir_name
    from distcl.eval.protocols import openset_split
    from distcl.gallery.index import gpu_available

    labels, centres = _layout(rows, probes, dim, seed)
    split = openset_split(labels, np.ones(len(labels), bool), 2, None, 0, seed)
    parts = np.array_split(np.arange(len(labels)), PARTS)
    d_parts = np.array_split(np.arange(distractors), PARTS)

    def model(t):
        return np.concatenate([_embed(seed * 1000 + r, centres, labels[p], t)
                               for r, p in enumerate(parts)])  # fmt: skip

    def dist(t):
        out = []
        for r, part in enumerate(d_parts):
            rng = np.random.default_rng([seed, 77, r])
            c = rng.standard_normal((max(1, len(part) // 4), dim), dtype=np.float32)
            out.append(_embed(seed * 1000 + 500 + r, c, np.arange(len(part)) % len(c), t))
        return np.concatenate(out)

    search_s, last = 0.0, {}
    mated = split.mated[split.probes]
    q_lab = labels[split.probes]
    for j in range(tasks):
        g = np.concatenate([model(j)[split.gallery], dist(j)])
        g_lab = np.concatenate([labels[split.gallery], np.full(distractors, -1)])
        index = faiss.IndexFlatIP(dim)
        if gpu_available():
            index = faiss.index_cpu_to_all_gpus(index)
        t0 = time.perf_counter()
        index.add(g)
        search_s += time.perf_counter() - t0
        for i in range(j, tasks):
            q = np.ascontiguousarray(model(i)[split.probes])
            t0 = time.perf_counter()
            scores, ids = index.search(q, 1)
            search_s += time.perf_counter() - t0
            if i == tasks - 1:  # TPIR@1e-2 from faiss's top 1, for the record
                top, hit = scores[:, 0], g_lab[ids[:, 0]] == q_lab
                nm = np.sort(top[~mated])[::-1]
                k = int(np.floor(1e-2 * len(nm)))
                t = nm[k] if 0 < k < len(nm) else (-np.inf if k else np.nan)
                last[j] = float((hit[mated] & (top[mated] > t)).mean()) if k else float("nan")
        del index, g
    return {"raw_faiss_s": search_s, "raw_last_row_" + fpir_name(1e-2): last}


def run_openset_bench(distractors: int = 1_000_000, probes: int = 10_000, tasks: int = 5,
                      dim: int = 128, budget_mb: int = 1024, seed: int = 0,
                      workdir: str | None = None) -> dict:  # fmt: skip
    """``--distractors N``: the openset matrix against raw faiss on the same pairs; the
    enrolled gallery is as large as the probes (identification against N distractors)."""
    rows = probes  # enrolled identities' gallery rows, beside the probes
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        write_store(run_dir / "eval" / "embeddings", tasks, rows, probes, dim, seed)
        write_distractors(run_dir / "distractors", tasks, distractors, dim, seed)
        out = {"tasks": tasks, "distractors": distractors, "probes_written": probes, "dim": dim,
               "budget_mb": budget_mb, "pairs": tasks * (tasks + 1) // 2,
               "write_s": time.perf_counter() - t0}  # fmt: skip
        call = (f"openset_engine_run(Path({str(run_dir)!r}), {tasks}, {budget_mb}, {seed}, "
                f"{str(run_dir / 'distractors')!r})")  # fmt: skip
        code = ("import json; from pathlib import Path; "
                "from distcl.bench.evalcost import openset_engine_run; "
                f"print(json.dumps({call}))")  # fmt: skip
        res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True)  # fmt: skip
        out |= json.loads(res.stdout.strip().splitlines()[-1])
    out |= openset_raw_faiss(tasks, rows, probes, dim, seed, distractors)
    out["ratio_raw_over_engine"] = out["raw_faiss_s"] / out["engine_s"]
    out["gallery_mb"] = distractors * dim * 4 / 2**20
    out["peak_over_gallery"] = out["peak_rss_mb"] / out["gallery_mb"]
    return out


def format_openset_bench(r: dict) -> str:
    row = r["last_row"]
    cells = ", ".join(f"{k} {v[0]:.3f}" for k, v in row.items())
    return "\n".join([
        f"distcl bench eval --distractors: T={r['tasks']} ({r['pairs']} pairs), "
        f"{r['mated']} mated + {r['nonmated']} non-mated probes, {r['enrolled_gallery']} "
        f"enrolled rows + {r['distractors']} distractors per model, d={r['dim']}, budget "
        f"{r['budget_mb']} MiB",
        f"  write Parquet:          {r['write_s']:.1f} s",
        f"  engine (openset matrix): {r['engine_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
        f"= {r['peak_over_gallery']:.2f} x one model's distractors ({r['gallery_mb']:.0f} MiB; "
        "goal < 2)",
        f"  raw faiss flat (top 1): {r['raw_faiss_s']:.1f} s",
        f"  ratio raw / engine:     {r['ratio_raw_over_engine']:.2f} (goal >= 0.8)",
        f"  last model's probes against model 1's gallery: {cells}",
    ])  # fmt: skip


def run_eval_bench(rows: int = 1_000_000, probes: int = 10_000, tasks: int = 5, dim: int = 128,
                   budget_mb: int = 1024, ivfpq_rows: int = 0, seed: int = 0,
                   workdir: str | None = None, ray_tasks: int = 0,
                   nprobes: tuple[int, ...] = (16,)) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        write_store(run_dir / "eval" / "embeddings", tasks, rows, probes, dim, seed)
        out = {"tasks": tasks, "rows": rows, "probes": probes, "dim": dim, "budget_mb": budget_mb,
               "pairs": tasks * (tasks + 1) // 2, "write_s": time.perf_counter() - t0}  # fmt: skip
        out |= _subprocess_engine(run_dir, tasks, budget_mb, "flat", seed)
        out |= raw_faiss(tasks, rows, probes, dim, seed)
        out["ratio_raw_over_engine"] = out["raw_faiss_s"] / out["engine_s"]
        out["gallery_mb"] = out["gallery"] * dim * 4 / 2**20
        out["peak_over_gallery"] = out["peak_rss_mb"] / out["gallery_mb"]
        if ray_tasks:  # one shard per Parquet part, so the parts of a model spread over tasks
            shard = -(-(len(_layout(rows, probes, dim, seed)[0])) // PARTS)
            out |= _subprocess_engine(run_dir, tasks, budget_mb, "flat", seed, (ray_tasks, shard))
            out["ray_equals_in_process"] = out["ray_cmc@1_last_row"] == out["cmc@1_last_row"]
    if ivfpq_rows:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            write_store(Path(tmp) / "eval" / "embeddings", 1, ivfpq_rows, probes, dim, seed)
            out["ivfpq"] = []
            for nprobe in nprobes:
                r = _subprocess_engine(Path(tmp), 1, budget_mb, "ivfpq", seed, nprobe=nprobe)
                out["ivfpq"].append({
                    "rows": ivfpq_rows, "nprobe": nprobe, "engine_s": r["engine_s"],
                    "peak_rss_mb": r["peak_rss_mb"], "recall@10": r["ann_recall"][0],
                    "gallery_mb_float32": r["gallery"] * dim * 4 / 2**20,
                })  # fmt: skip
    return out


def format_eval_bench(r: dict) -> str:
    lines = [
        f"distcl bench eval: T={r['tasks']} ({r['pairs']} pairs), gallery {r['gallery']} rows, "
        f"{r['probes']} probes, d={r['dim']}, budget {r['budget_mb']} MiB",
        f"  write Parquet:        {r['write_s']:.1f} s",
        f"  engine (whole matrix): {r['engine_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
        f"= {r['peak_over_gallery']:.2f} x one model's gallery ({r['gallery_mb']:.0f} MiB)",
        f"  raw faiss flat:        {r['raw_faiss_s']:.1f} s",
        f"  ratio raw / engine:    {r['ratio_raw_over_engine']:.2f} (goal >= 0.8)",
    ]
    if "ray_engine_s" in r:
        lines.append(f"  engine as Ray tasks ({r['ray_tasks']} CPUs, a shard per part): "
                     f"{r['ray_engine_s']:.1f} s, driver peak RSS "
                     f"{r['ray_driver_peak_rss_mb']:.0f} MiB, same numbers as in-process: "
                     f"{r['ray_equals_in_process']}")  # fmt: skip
    for v in r.get("ivfpq", []):
        lines.append(f"  IVF-PQ {v['rows']} rows, nprobe {v['nprobe']}: {v['engine_s']:.1f} s, "
                     f"peak RSS {v['peak_rss_mb']:.0f} MiB (float32 gallery "
                     f"{v['gallery_mb_float32']:.0f} MiB), recall@10 vs exact "
                     f"{v['recall@10']:.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="distcl bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=1_000_000, help="gallery rows per model")
    p.add_argument("--probes", type=int, default=10_000)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--budget-mb", type=int, default=1024, help="eval.memory_budget_mb")
    p.add_argument("--ivfpq-rows", type=int, default=0, help="also an IVF-PQ gallery (0: off)")
    p.add_argument(
        "--nprobe",
        default="16",
        metavar="N[,N...]",
        help="eval.nprobe of the IVF-PQ runs, one run each (default 16)",
    )
    p.add_argument("--workdir", default=None, help="where the Parquet store is written")
    p.add_argument("--ray-tasks", type=int, default=0, metavar="N",
                   help="also the engine as Ray tasks, local Ray of N CPUs (0: off)")  # fmt: skip
    p.add_argument(
        "--distractors",
        type=int,
        default=0,
        metavar="N",
        help="instead: open-set 1:N (TPIR@FPIR) against N distractor rows per model",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.distractors:
        r = run_openset_bench(a.distractors, a.probes, a.tasks, a.dim, a.budget_mb,
                              workdir=a.workdir)  # fmt: skip
        print(json.dumps(r, indent=1) if a.json else format_openset_bench(r))
        return
    try:
        nprobes = tuple(int(v) for v in a.nprobe.split(","))
    except ValueError:
        p.error(f"--nprobe: comma-separated positive ints, got {a.nprobe!r}")
    if not nprobes or min(nprobes) < 1:
        p.error(f"--nprobe: comma-separated positive ints, got {a.nprobe!r}")
    r = run_eval_bench(a.rows, a.probes, a.tasks, a.dim, a.budget_mb, a.ivfpq_rows, 0, a.workdir,
                       a.ray_tasks, nprobes)  # fmt: skip
    print(json.dumps(r, indent=1) if a.json else format_eval_bench(r))


if __name__ == "__main__":
    main()
