"""`distcl bench search`: gallery search throughput, measured against baselines in ONE run.

On one seeded synthetic gallery (``n_gallery`` x ``dim``, L2-normalised, clustered like real
embeddings: points around ``n_clusters`` random unit centres) and one query set drawn from the
same distribution, it times:

- distcl's exact path: ``build_index(..., kind="flat").search``;
- raw faiss: ``faiss.IndexFlatIP`` add + search (what distcl wraps; the ratio is its overhead);
- numpy brute force (``brute_force_search``: matmul + argpartition per query block), on
  ``numpy_queries`` of the queries only because it is slow (the result says how many);
- the IVF option (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` probed): queries/s and its
  k-recall@k against the exact result.

All on CPU with the same thread count. The three exact engines run interleaved over chunks of
``chunk_queries`` queries (alternating which goes first), so load from other processes on a
shared machine hits them alike; the 1-minute load average before and after is recorded
(faiss's OpenMP threads suffer most from oversubscription: at load ~20 on 2 cores its flat
search fell from ~50-80 to ~7-20 queries/s while numpy kept ~40). Ratios are of queries/s
(search only; build times are reported separately).

Defaults (1M x 128 gallery, 500 queries, numpy on 250 of them, k=10, IVF nlist=1024 /
nprobe=16) take ~45 s on 2 idle cores and stayed under 3 minutes at load ~20; exact search
at 1M costs ~1/50 s per query per engine here, hence so few queries (each still scans the
whole gallery). Memory ~2.4 GB: gallery 512 MB, two flat indexes 512 MB each, numpy's
(64, 1M) similarity blocks 256 MB.

Run: ``python -m distcl.bench.search [--n-gallery N] [--queries Q] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import faiss
import numpy as np

from distcl.gallery.index import brute_force_search, build_index, recall_at_k_vs_exact

__all__ = ["synthetic_embeddings", "run_search_bench", "format_search_bench"]


def synthetic_embeddings(
    n: int,
    dim: int,
    *,
    n_clusters: int = 1000,
    spread: float = 1.5,
    seed: int = 0,
    centers_seed: int = 12345,
    block_rows: int = 131072,
) -> np.ndarray:
    """(n, dim) float32 unit rows: a random centre (of ``n_clusters``, fixed by
    ``centers_seed``) plus Gaussian noise of norm ~``spread``, normalised. Built in blocks so
    peak memory stays ~ the output. spread=1.5 keeps IVF's recall below 1 (at 0.5-1.0 the
    clusters separate so well that IVF 1024/16 is exact and the trade-off is invisible)."""
    centers = np.random.default_rng(centers_seed).standard_normal((n_clusters, dim))
    centers = (centers / np.linalg.norm(centers, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)  # (B, dim)
        x *= spread / np.sqrt(dim)
        x += centers[rng.integers(0, n_clusters, stop - start)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_search_bench(
    n_gallery: int = 1_000_000,
    dim: int = 128,
    n_queries: int = 500,
    k: int = 10,
    seed: int = 0,
    ivf: bool = True,
    progress: Callable[[str], None] | None = None,
    *,
    numpy_queries: int = 250,
    nlist: int = 1024,
    nprobe: int = 16,
    threads: int | None = None,
    chunk_queries: int = 250,
) -> dict:
    """Measure distcl flat search vs raw faiss vs numpy (and IVF) on one synthetic gallery.

    Returns a dict with the config, per-engine timings and queries/s, the ratios
    ``distcl_vs_raw_faiss``, ``distcl_vs_numpy``, ``ivf_speedup_vs_flat`` (queries/s ratios)
    and ``ivf_recall`` (k-recall@k of IVF vs exact; None when ``ivf=False``), and sanity
    checks (distcl's top-k agrees with raw faiss and numpy). ``nlist`` defaults to 1024
    rather than build_index's 4 sqrt(N) so k-means training fits a 2-core budget.
    """
    for name, v in (
        ("n_gallery", n_gallery),
        ("dim", dim),
        ("n_queries", n_queries),
        ("k", k),
        ("numpy_queries", numpy_queries),
        ("chunk_queries", chunk_queries),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if k > n_gallery:
        raise ValueError(f"k={k} exceeds n_gallery={n_gallery}")
    say = progress or (lambda msg: None)
    n_threads = threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(n_threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    say(f"generating {n_gallery} x {dim} gallery and {n_queries} queries (seed {seed})")
    gallery = synthetic_embeddings(n_gallery, dim, seed=seed)  # (G, dim)
    queries = synthetic_embeddings(n_queries, dim, seed=seed + 1)  # (Q, dim)

    # warm up OpenMP threads and BLAS so the first timed call does not pay for them
    warm = faiss.IndexFlatIP(dim)
    warm.add(gallery[:1000])
    warm.search(queries[:64], k)

    say("building: distcl build_index(flat) and raw faiss IndexFlatIP.add")
    index, build_s = _timed(lambda: build_index(gallery, "flat", use_gpu=False, threads=threads))
    raw = faiss.IndexFlatIP(dim)
    _, raw_build_s = _timed(lambda: raw.add(gallery))

    # The engines run interleaved over query chunks (alternating who goes first), so load from
    # other processes on a shared machine hits all of them alike; each still sees every query.
    n_chunks = -(-n_queries // chunk_queries)
    nq_np = min(numpy_queries, n_queries)
    np_per_chunk = -(-nq_np // n_chunks)
    t_distcl = t_raw = t_np = 0.0
    d_ids, r_ids, n_ids, np_rows = [], [], [], []
    nq_np_done = 0
    for c in range(n_chunks):
        qc = queries[c * chunk_queries : (c + 1) * chunk_queries]  # (C, dim)
        say(f"flat search chunk {c + 1}/{n_chunks}: distcl, raw faiss, numpy")
        runs = [
            ("distcl", lambda qc=qc: index.search(qc, k)),
            ("raw", lambda qc=qc: raw.search(qc, k)),
        ]
        for name, fn in runs if c % 2 == 0 else runs[::-1]:
            (_, ids), dt = _timed(fn)
            if name == "distcl":
                t_distcl += dt
                d_ids.append(ids)
            else:
                t_raw += dt
                r_ids.append(ids)
        qn = qc[: min(np_per_chunk, nq_np - nq_np_done)]
        if len(qn):
            (_, ids), dt = _timed(lambda qn=qn: brute_force_search(qn, gallery, k))
            t_np += dt
            n_ids.append(ids)
            np_rows.append(np.arange(c * chunk_queries, c * chunk_queries + len(qn)))
            nq_np_done += len(qn)
    d_ids = np.concatenate(d_ids)  # (Q, k)
    r_ids = np.concatenate(r_ids)
    n_ids = np.concatenate(n_ids)  # (nq_np, k), rows of the chunks' first queries
    np_rows = np.concatenate(np_rows)  # which queries numpy answered
    index = raw = None  # free ~1 GB before the IVF build
    distcl = {"build_s": build_s, "search_s": t_distcl, "qps": n_queries / t_distcl}
    raw_faiss = {"build_s": raw_build_s, "search_s": t_raw, "qps": n_queries / t_raw}
    numpy_res = {"queries": nq_np_done, "search_s": t_np, "qps": nq_np_done / t_np}

    ivf_res = None
    if ivf:
        say(f"IVF: train (nlist={nlist}) + add + search (nprobe={nprobe})")
        ivf_index, ivf_build_s = _timed(
            lambda: build_index(
                gallery,
                "ivf",
                nlist=min(nlist, n_gallery),
                nprobe=nprobe,
                use_gpu=False,
                threads=threads,
                seed=seed,
            )
        )
        (_, v_ids), ivf_search_s = _timed(lambda: ivf_index.search(queries, k))
        ivf_res = {
            "nlist": int(ivf_index.index.nlist),
            "nprobe": int(ivf_index.index.nprobe),
            "build_s": ivf_build_s,
            "search_s": ivf_search_s,
            "qps": n_queries / ivf_search_s,
            "recall_at_k": recall_at_k_vs_exact(v_ids, d_ids, k),
        }

    return {
        "config": {
            "n_gallery": n_gallery,
            "dim": dim,
            "n_queries": n_queries,
            "k": k,
            "seed": seed,
            "threads": n_threads,
            "device": "cpu",
            "faiss_version": faiss.__version__,
            "chunk_queries": chunk_queries,
            # other processes competing for the cores make every timing noisier
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0] if load_before is not None else None,
        },
        "distcl_flat": distcl,
        "raw_faiss_flat": raw_faiss,
        "numpy": numpy_res,
        "ivf": ivf_res,
        "distcl_vs_raw_faiss": distcl["qps"] / raw_faiss["qps"],
        "distcl_vs_numpy": distcl["qps"] / numpy_res["qps"],
        "ivf_speedup_vs_flat": ivf_res["qps"] / distcl["qps"] if ivf_res else None,
        "ivf_recall": ivf_res["recall_at_k"] if ivf_res else None,
        # sanity: exact engines agree (1.0 up to float ties)
        "check_distcl_vs_raw_recall": recall_at_k_vs_exact(d_ids, r_ids, k),
        "check_numpy_vs_distcl_recall": recall_at_k_vs_exact(n_ids, d_ids[np_rows], k),
        "total_s": time.perf_counter() - t_start,
    }


def format_search_bench(result: dict) -> str:
    """A plain-text table of ``run_search_bench``'s result."""
    c = result["config"]
    lines = [
        f"search bench: gallery {c['n_gallery']:,} x {c['dim']}, {c['n_queries']:,} queries, "
        f"k={c['k']}, {c['device']} x {c['threads']} threads, faiss {c['faiss_version']}",
        f"{'engine':<28}{'build s':>10}{'search s':>10}{'queries/s':>12}{'recall@k':>10}",
    ]

    def row(name: str, r: dict, recall: str = "exact") -> None:
        build = f"{r['build_s']:.2f}" if "build_s" in r else "-"
        lines.append(f"{name:<28}{build:>10}{r['search_s']:>10.2f}{r['qps']:>12,.0f}{recall:>10}")

    row("distcl flat (exact)", result["distcl_flat"])
    row("raw faiss IndexFlatIP", result["raw_faiss_flat"])
    row(f"numpy brute force ({result['numpy']['queries']} q)", result["numpy"])
    if result["ivf"]:
        v = result["ivf"]
        row(f"distcl ivf {v['nlist']}/{v['nprobe']}", v, f"{v['recall_at_k']:.3f}")
    lines.append(
        f"ratios: distcl/raw faiss {result['distcl_vs_raw_faiss']:.2f}x, "
        f"distcl/numpy {result['distcl_vs_numpy']:.1f}x"
        + (
            f", ivf/flat {result['ivf_speedup_vs_flat']:.1f}x at recall@{c['k']} "
            f"{result['ivf_recall']:.3f}"
            if result["ivf"]
            else ""
        )
    )
    lines.append(
        f"checks: distcl vs raw faiss recall {result['check_distcl_vs_raw_recall']:.4f}, "
        f"numpy vs distcl {result['check_numpy_vs_distcl_recall']:.4f}; "
        f"total {result['total_s']:.1f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Manual entry point: ``python -m distcl.bench.search``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ivf", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    a = p.parse_args(argv)
    res = run_search_bench(
        a.n_gallery,
        a.dim,
        a.queries,
        a.k,
        a.seed,
        ivf=not a.no_ivf,
        progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
    )
    print(json.dumps(res, indent=2) if a.json else format_search_bench(res))


if __name__ == "__main__":
    main()
