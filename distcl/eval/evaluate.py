"""Evaluate a run directory: the compatibility matrix and the stale-gallery protocol.

    distcl eval runs/quickstart      # recompute from stored embeddings, rewrite the report

Inputs (written by the driver after each task t, never recomputed here):
- ``eval/embeddings/model=<t>/eval.parquet``: the evaluation set embedded once by model t
  (T embedding passes for a T x T matrix);
- ``gallery/model=<t>/task<t>.parquet``: the items that arrived at task t, embedded by
  model t (the stale gallery as deployed).

Outputs: ``metrics.json``, ``report.md``, ``compat_<protocol>.png``, ``stale_gallery.png``.

Exact metrics (full ranking, mAP included) are computed blockwise by ``distcl.eval.metrics``.
A stale gallery larger than ``EXACT_LIMIT`` rows goes through the faiss index instead
(top-k search: CMC/Recall@K exact from the top-k list, mAP reported as mAP@k).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from distcl.data.scenario import Scenario
from distcl.eval import compat
from distcl.eval.metrics import retrieval_summary

EXACT_LIMIT = 200_000


def _load_eval_embeddings(run_dir: Path, T: int, items_per_class: int | None, seed: int):
    """(ids, labels, [emb_t for t < T]) aligned by item id across models."""
    from distcl.gallery.store import read_embeddings

    root = run_dir / "eval" / "embeddings"
    embs, ids, labels = [], None, None
    for t in range(T):
        g = read_embeddings(root, models=[t])
        order = np.argsort(g.item_ids.astype(str), kind="stable")
        if ids is None:
            ids, labels = g.item_ids[order].astype(str), g.labels[order]
        elif not np.array_equal(ids, g.item_ids[order].astype(str)):
            raise ValueError(f"{root}: model {t} embedded a different evaluation set")
        embs.append(g.embeddings[order])
    if items_per_class is not None:  # seeded per-class subset, the same for every model
        rng = np.random.default_rng([seed, 5])
        keep = np.sort(np.concatenate([
            rng.permutation(np.flatnonzero(labels == c))[:items_per_class]
            for c in np.unique(labels)
        ]))  # fmt: skip
        ids, labels, embs = ids[keep], labels[keep], [e[keep] for e in embs]
    return ids, labels, embs


def topk_summary(
    query_emb, query_ids, query_lab, index, gallery_ids, gallery_lab, ks=(1, 5, 10)
) -> dict:
    """CMC/Recall@K and mAP@k from a faiss top-k search (self matches dropped by id)."""
    kmax = max(ks)
    _, nn = index.search(query_emb, kmax + 1)  # (Q, k+1): one spare for the self match
    hits = np.zeros((len(query_ids), kmax), bool)
    for r in range(len(query_ids)):
        row = [j for j in nn[r] if j >= 0 and gallery_ids[j] != query_ids[r]][:kmax]
        hits[r, : len(row)] = gallery_lab[row] == query_lab[r]
    first = np.where(hits.any(1), hits.argmax(1) + 1, kmax + 1)
    prec = np.cumsum(hits, 1) / np.arange(1, kmax + 1)
    ap = (prec * hits).sum(1) / np.maximum(hits.sum(1), 1)
    out = {f"cmc@{k}": float((first <= k).mean()) for k in ks}
    out.update({f"recall@{k}": out[f"cmc@{k}"] for k in ks})
    out[f"map@{kmax}"] = float(ap.mean())
    return out


def stale_gallery_eval(run_dir: Path, scenario: Scenario, job_eval, embs, ids) -> list[dict]:
    """After each task s: queries (the items in the gallery, embedded by model s) against
    the gallery as stored (each item embedded by the model of its arrival task)."""
    from distcl.gallery.index import build_index
    from distcl.gallery.store import stale_gallery

    pos = {k: i for i, k in enumerate(ids)}
    rows = []
    for s in range(scenario.num_tasks):
        g = stale_gallery(run_dir / "gallery", upto_task=s)
        order = np.argsort(g.item_ids.astype(str), kind="stable")
        g_ids, g_lab, g_emb = g.item_ids[order].astype(str), g.labels[order], g.embeddings[order]
        q_emb = embs[s][[pos[k] for k in g_ids]]  # same items, embedded by model s
        t0 = time.perf_counter()
        if len(g_ids) <= EXACT_LIMIT:
            res = retrieval_summary(
                q_emb,
                g_lab,
                g_emb,
                g_lab,
                exclude_self=True,
                topk=tuple(job_eval.topk),
                recall_ks=tuple(job_eval.recall_ks),
            )
            res.pop("n_queries", None)
        else:
            index = build_index(g_emb, kind=job_eval.index)
            res = topk_summary(
                q_emb,
                g_ids,
                g_lab,
                index,
                g_ids,
                g_lab,
                ks=tuple(sorted(set(job_eval.topk) | set(job_eval.recall_ks))),
            )
        rows.append(
            {
                "task": s,
                "gallery": len(g_ids),
                "models_in_gallery": sorted(set(g.models.tolist())),
                "seconds": time.perf_counter() - t0,
                **res,
            }
        )
    return rows


def evaluate_run(run_dir: str | Path, log=print) -> dict:
    """Compute every metric of a finished (or partly finished) run and write the report."""
    import yaml

    from distcl.config import parse_job
    from distcl.eval.report import print_summary, write_report

    run_dir = Path(run_dir)
    job = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()), str(run_dir / "job.yaml"))
    scenario = Scenario.from_json(json.loads((run_dir / "scenario.json").read_text()))
    T = 0
    while (run_dir / "models" / str(T) / "post.json").is_file():
        T += 1
    if T == 0:
        raise ValueError(f"{run_dir}: no finished task to evaluate")
    t0 = time.perf_counter()
    ids, labels, embs = _load_eval_embeddings(run_dir, T, job.eval.items_per_class, job.seed)
    metric = job.eval.metric
    names = sorted({metric, "map", *(f"cmc@{k}" for k in job.eval.topk)})
    seen_masks = [np.isin(labels, scenario.tasks[t].seen_classes) for t in range(T)]
    protocols = {
        "all": compat.compatibility_matrices(embs, labels, names, exclude_self=True),
        "seen": compat.compatibility_matrices(
            embs, labels, names, exclude_self=True, seen_masks=seen_masks
        ),
    }
    result = {
        "job": job.name, "method": job.method.name, "tasks": T, "metric": metric,
        "eval_items": len(ids), "embedding_passes": T,
        "protocols": {
            p: {"matrices": {k: m.tolist() for k, m in ms.items()},
                "summary": _summary(ms[metric])}
            for p, ms in protocols.items()
        },
    }  # fmt: skip
    result["stale_gallery"] = stale_gallery_eval(run_dir, scenario, job.eval, embs, ids)
    result["eval_s"] = time.perf_counter() - t0
    result["history"] = _histories(run_dir, T)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=_json_default))
    write_report(run_dir, result)
    print_summary(result, log=log)
    return result


def _summary(M: np.ndarray) -> dict:
    s = compat.summarize(M)
    s["ecc"] = np.asarray(s["ecc"]).tolist()
    return s


def _histories(run_dir: Path, T: int) -> list[dict]:
    out = []
    for t in range(T):
        path = run_dir / "models" / str(t) / "history.json"
        if path.is_file():
            out.extend(json.loads(path.read_text()))
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
