"""The streaming evaluation engine: rows of every protocol's compatibility matrix from the
Parquet store (design.md sections 4 and 7; definitions in docs/metrics.md).

    engine = Engine(run_dir, settings, scenario)
    rows = engine.rows([3])        # row 3: query model 3 against gallery models 0..3 + stale s=3

Inputs (written by the training engine after each task t, one part per train rank):
``eval/embeddings/model=<t>/`` (the evaluation set: closed-set items, task >= 0, and items of
held-out classes, task == -1) and ``gallery/model=<t>/`` (items arriving at t).

How it scales: the evaluation set's ids, labels and tasks (no embeddings) are read once and
sorted by id (the canonical order every selection refers to). The query side of each model
(closed queries, open probes, verification items; a small part of the store) is read with the
rows filtered in the Parquet scan and cached within ``memory_budget_mb / 2``. Each gallery
model j is then read ONCE in record batches for all query models i >= j asked: its rows are
routed to per-target buffers (closed gallery, open gallery, template sums) holding at most
the other half of the budget; a full buffer is searched (``distcl.gallery.search``) and
dropped, the top-k lists are merged. Exact full rankings (exact mAP, exact ties) only when
``exact_map`` is set and a target's gallery fits the budget and Q x G <= EXACT_MAX_PAIRS;
otherwise mAP is mAP@MAP_AT_K from top-k lists, and the row says which (``map_kind``).

Not done here: Ray tasks or actors per gallery shard on a cluster. One process streams each
gallery (faiss uses every core, and every GPU with faiss-gpu); splitting a gallery model's
parts over Ray tasks and merging their top-k lists with ``faiss.ResultHeap`` is the next step.

Test: ``.venv/bin/python -m pytest tests/test_eval_engine.py -q``
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from distcl import storage
from distcl.eval import metrics as mt
from distcl.eval import protocols as pr
from distcl.gallery.store import Store, batch_embeddings, iter_batches, open_store
from distcl.storage import Uri

MAP_AT_K = 100  # mAP@K from top-k lists when exact mAP is not computed
EXACT_MAX_PAIRS = 250_000_000  # largest Q x G ranked in full for exact mAP (one pair)
MAX_NLIST = 4096  # IVF lists of the ANN indexes (eval.index: ivf / ivfpq)
MAX_BATCH_ROWS = 65536  # Parquet record batch rows (fewer when d is large: budget / 32)


@dataclass(frozen=True)
class EvalSettings:
    """What the engine computes; ``from_job`` reads a job's ``eval`` section."""

    protocols: tuple[str, ...] = ("closed",)
    metric: str = "cmc@1"
    topk: tuple[int, ...] = (1, 5)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    items_per_class: int | None = None
    seed: int = 0
    ties: str = "strict"
    probes_per_class: int = 2
    distractor_classes: int = 0
    verification_pairs: int = 1000
    folds: int = 10
    fars: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    identification: str = "templates"
    index: str = "flat"
    exact_map: bool = True
    memory_budget_mb: int = 1024
    use_gpu: bool = False
    block_rows: int | None = None  # streamed gallery block size; None: from the budget

    @classmethod
    def from_job(cls, job: Any, use_gpu: bool | None = None) -> EvalSettings:
        e = job.eval
        if use_gpu is None:
            from distcl.gallery.index import gpu_available

            use_gpu = gpu_available()
        return cls(
            tuple(e.protocols), e.metric, tuple(e.topk), tuple(e.recall_ks), e.items_per_class,
            job.seed, e.ties, e.probes_per_class, e.distractor_classes, e.verification_pairs,
            e.folds, tuple(e.fars), e.identification, e.index, e.exact_map, e.memory_budget_mb,
            bool(use_gpu),
        )  # fmt: skip

    def key(self) -> dict:
        """The settings that change results (row-cache key; the GPU does not)."""
        out = asdict(self)
        out.pop("use_gpu")
        out.pop("block_rows")
        return out

    @property
    def budget(self) -> int:
        return self.memory_budget_mb << 20


@dataclass
class Catalogue:
    """The evaluation set in canonical order (sorted by id): ids (N,), labels, tasks."""

    ids: pa.Array
    labels: np.ndarray  # (N,) int64
    tasks: np.ndarray  # (N,) int32; -1: held-out class
    _keys: np.ndarray | None = None  # (N,) the ids as bytes, for ``codes``

    @classmethod
    def read(cls, store: Store, model: int) -> Catalogue:
        cols = ("item_id", "label", "task")
        batches = list(iter_batches(store, model, columns=cols))
        if not batches:
            raise ValueError(f"{store.root}/model={model}: no embedded evaluation items")
        table = pa.Table.from_batches(batches)
        table = table.take(pc.sort_indices(table, [("item_id", "ascending")]))
        ids = table["item_id"].combine_chunks()
        if len(pc.unique(ids)) != len(ids):
            raise ValueError(f"{store.root}/model={model}: an item id appears twice")
        return cls(ids, table["label"].to_numpy(), table["task"].to_numpy())

    def __len__(self) -> int:
        return len(self.ids)

    def codes(self, ids: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
        """Canonical positions (B,) int64 of ``ids``; ValueError for an id not in the set.

        A binary search in the sorted ids as bytes (UTF-8 keeps Arrow's sort order): no hash
        table of the whole set is rebuilt per batch.
        """
        if self._keys is None:
            self._keys = _bytes(self.ids)  # (N,) S
        keys = _bytes(ids)  # (B,) S
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        bad = np.flatnonzero(self._keys[pos] != keys)
        if len(bad):
            name = keys[bad[0]].decode()
            raise ValueError(f"{where}: item {name!r} is not in the evaluation set of model 0")
        return pos.astype(np.int64)


def _bytes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return ids.cast(pa.binary()).to_numpy(zero_copy_only=False).astype(bytes)


@dataclass
class Plan:
    """The item selections of a run (canonical positions), fixed by the settings and seed."""

    closed: np.ndarray  # (N,) bool: closed-set items (after items_per_class)
    split: pr.OpenSplit | None  # open / identification probes and gallery
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # verification (a, b, same)
    verif_items: np.ndarray  # (V,) sorted positions used by the pairs
    heldout: bool  # open-set protocols on held-out classes (else on the closed items)

    @classmethod
    def build(cls, cat: Catalogue, s: EvalSettings) -> Plan:
        closed_all = cat.tasks >= 0
        closed = pr.closed_subset(cat.labels, closed_all, s.items_per_class, s.seed)
        heldout = bool((cat.tasks < 0).any())
        pool = ~closed_all if heldout else closed
        split = pairs = None
        if "open" in s.protocols and not heldout:
            raise ValueError("eval.protocols: 'open' needs scenario.heldout_classes > 0")
        if "open" in s.protocols or "identification" in s.protocols:
            split = pr.open_split(
                cat.labels, pool, s.probes_per_class, s.distractor_classes, s.seed
            )
        verif = np.zeros(0, np.int64)
        if "verification" in s.protocols:
            pairs = pr.verification_pairs(cat.labels, pool, s.verification_pairs, s.seed)
            verif = np.unique(np.concatenate(pairs[:2]))
        return cls(closed, split, pairs, verif, heldout)


@dataclass
class Target:
    """One gallery searched in a pass: rows ``member`` of the store, query sets, buffers."""

    name: str
    member: np.ndarray  # (N,) bool over canonical positions: the gallery's items
    exact: bool  # full rankings (gallery held whole) instead of streamed top-k lists
    queries: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None, bool]] = field(
        default_factory=list
    )  # (key, emb (Q, d), codes (Q,), allowed labels or None, exclude self)


def _retrieval(
    hits: np.ndarray, ap: float, n: int, ks: tuple[int, ...], s: EvalSettings, map_key: str
) -> dict[str, float]:
    if n == 0:
        raise ValueError("no query has a positive (same label) in the gallery")
    frac = {k: float(h) / n for k, h in zip(ks, hits, strict=True)}
    out = {f"cmc@{k}": frac[k] for k in s.topk} | {f"recall@{k}": frac[k] for k in s.recall_ks}
    if s.metric.startswith(("cmc@", "recall@")):
        out[s.metric] = frac[int(s.metric.split("@")[1])]
    out[map_key] = ap / n
    return out


def _add_rows(sums: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
    """sums[index[r]] += rows[r] for every r (np.add.at, but one sort instead of a slow loop)."""
    if len(index) == 0:
        return
    order = np.argsort(index, kind="stable")
    keys, starts = np.unique(index[order], return_index=True)
    sums[keys] += np.add.reduceat(rows[order], starts, axis=0)


class Engine:
    """Rows of the matrices of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path | Uri, settings: EvalSettings, scenario: Any) -> None:
        self.run_dir = storage.location(run_dir)  # a local path or an object-store URI
        self.s = settings
        self.scenario = scenario
        self.eval_store = open_store(self.run_dir / "eval" / "embeddings")
        if self.eval_store.dim is None:
            raise ValueError(f"{self.eval_store.root}: no embedded evaluation set")
        self.dim = self.eval_store.dim
        self.cat = Catalogue.read(self.eval_store, 0)
        self.plan = Plan.build(self.cat, settings)
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        ks = {*settings.topk, *settings.recall_ks}
        if settings.metric.startswith(("cmc@", "recall@")):  # e.g. cmc@3 with topk (1, 5)
            ks.add(int(settings.metric.split("@")[1]))
        self.ks = tuple(sorted(ks))
        self.map_name = settings.metric if settings.metric.startswith("map@") else None
        self.k_lists = max(ks | {int(self.map_name[4:])} if self.map_name else ks)
        n_closed = int(self.plan.closed.sum())
        split = self.plan.split
        self.exact = {  # decided once per run, so every row of a matrix has one mAP kind
            "closed": self._feasible(n_closed, n_closed),
            "stale": self._feasible(n_closed, int((self.cat.tasks >= 0).sum())),
            "open": split is not None
            and self._feasible(int(split.probes.sum()), int(split.gallery.sum())),
        }

    # ------------------------------------------------------------------ sizing
    def _feasible(self, n_query: int, n_gallery: int) -> bool:
        fits = n_gallery * self.dim * 4 <= self.s.budget // 2
        return self.s.exact_map and fits and n_query * n_gallery <= EXACT_MAX_PAIRS

    @property
    def _batch_rows(self) -> int:
        return int(max(256, min(MAX_BATCH_ROWS, self.s.budget // 32 // (4 * self.dim))))

    def map_kind(self, target: str) -> str:
        return "exact" if self.exact[target] else f"map@{MAP_AT_K}"

    # ------------------------------------------------------------------ query side
    def _query_data(self, model: int) -> dict[str, np.ndarray]:
        """Model ``model``'s embeddings of the closed items, probes and verification items,
        (n, d) each in canonical order; read with the rows filtered in the scan, cached."""
        if model in self._cache:
            return self._cache[model]
        sets = {"closed": np.flatnonzero(self.plan.closed), "verif": self.plan.verif_items}
        if self.plan.split is not None:
            sets["probes"] = np.flatnonzero(self.plan.split.probes)
        needed = np.unique(np.concatenate(list(sets.values())))
        slot = np.full(len(self.cat), -1, np.int64)
        slot[needed] = np.arange(len(needed))
        emb = np.empty((len(needed), self.dim), np.float32)  # (n_needed, d)
        seen = np.zeros(len(needed), np.int64)
        where = f"{self.eval_store.root}/model={model}"
        filt = ds.field("item_id").isin(self.cat.ids.take(pa.array(needed)))
        for rb in iter_batches(self.eval_store, model, columns=("item_id", "embedding"),
                               filter=filt, batch_rows=self._batch_rows):  # fmt: skip
            pos = slot[self.cat.codes(rb["item_id"], where)]
            emb[pos] = batch_embeddings(rb)
            np.add.at(seen, pos, 1)
        if (seen != 1).any():
            bad = self.cat.ids[int(needed[np.flatnonzero(seen != 1)[0]])].as_py()
            raise ValueError(f"{where}: item {bad!r} embedded {seen[seen != 1][0]} times (not 1)")
        data = {name: emb[slot[idx]] for name, idx in sets.items()}
        budget = self.s.budget // 2
        size = sum(a.nbytes for a in data.values())
        while self._cache and size + sum(
            a.nbytes for d in self._cache.values() for a in d.values()
        ) > budget:  # fmt: skip
            self._cache.pop(next(iter(self._cache)))
        self._cache[model] = data
        return data

    # ------------------------------------------------------------------ gallery passes
    def _run_pass(self, store: Store, models: list[int], filt: ds.Expression | None,
                  targets: list[Target], expected: np.ndarray, sums: np.ndarray | None,
                  templ_member: np.ndarray | None) -> dict:  # fmt: skip
        """Read ``models`` of ``store`` once, feeding every target; returns per target the
        metrics of each query set (keyed as given) and the ANN recall."""
        from distcl.gallery.search import QuerySet, StreamSearch

        where = f"{store.root}/model={models}"
        n_rows = {t.name: int(t.member.sum()) for t in targets}
        # Streamed targets share half the budget in proportion to their size; each buffer
        # leaves room for one sub-block copy (the ``seen`` rows of a block).
        share = (self.s.budget // 2) / max(1, sum(n_rows.values())) / (2 * 4 * self.dim)
        state = {}
        for t in targets:
            n = n_rows[t.name]
            cap = n if t.exact else min(n, self.s.block_rows or max(1024, int(share * n)))
            search = None
            if not t.exact:
                qsets = [QuerySet(q[1], self._k(q[4]), q[3]) for q in t.queries]
                search = StreamSearch(qsets, self.dim, kind=self.s.index, nlist=self._nlist(n),
                                      use_gpu=self.s.use_gpu, seed=self.s.seed)  # fmt: skip
                if self.s.index != "flat":
                    search.train(self._train_sample(store, models, filt, t), n_rows[t.name])
            buf = np.empty((max(cap, 1), self.dim), np.float32)  # (cap, d)
            state[t.name] = {"buf": buf, "codes": [], "fill": 0, "search": search, "done": []}
        count = np.zeros(len(self.cat), np.int64)
        model_set: set[int] = set()
        for rb in iter_batches(store, models, columns=("item_id", "label", "task", "model",
                               "embedding"), filter=filt, batch_rows=self._batch_rows):  # fmt: skip
            codes = self.cat.codes(rb["item_id"], where)
            count += np.bincount(codes, minlength=len(count))
            model_set.update(pc.unique(rb["model"]).to_pylist())
            emb = batch_embeddings(rb)  # (B, d)
            if sums is not None:
                sel = templ_member[codes]
                _add_rows(sums, self._class_index[codes[sel]], mt.normalize_rows(emb[sel]))
            for t in targets:
                sel = np.flatnonzero(t.member[codes])
                st = state[t.name]
                while len(sel):
                    take = sel[: len(st["buf"]) - st["fill"]]
                    st["buf"][st["fill"] : st["fill"] + len(take)] = emb[take]
                    st["codes"].append(codes[take])
                    st["fill"] += len(take)
                    sel = sel[len(take) :]
                    if st["fill"] == len(st["buf"]) and not t.exact:
                        self._flush(st)
        if (count != expected).any():
            bad = int(np.flatnonzero(count != expected)[0])
            raise ValueError(f"{where}: item {self.cat.ids[bad].as_py()!r} has {count[bad]} rows, "
                             f"expected {expected[bad]}")  # fmt: skip
        out = {"models": sorted(model_set)}
        for t in targets:
            st = state[t.name]
            if t.exact:
                codes = np.concatenate(st["codes"]) if st["codes"] else np.zeros(0, np.int64)
                out[t.name] = self._exact_metrics(t, st["buf"][: st["fill"]], codes)
            else:
                self._flush(st)
                out[t.name] = self._topk_metrics(t, st)
        return out

    def _k(self, exclude_self: bool) -> int:
        """Neighbours asked from a streamed search: every k reported, mAP@MAP_AT_K, + self."""
        return max(self.k_lists, MAP_AT_K) + int(exclude_self)

    def _flush(self, st: dict) -> None:
        """Search the buffered rows of a streamed target and empty the buffer."""
        if st["fill"]:
            codes = np.concatenate(st["codes"])  # (fill,)
            st["search"].add(st["buf"][: st["fill"]], self.cat.labels[codes])
            st["done"].append(codes)
            st["codes"], st["fill"] = [], 0

    @staticmethod
    def _nlist(n: int) -> int:
        """IVF lists: ~4 sqrt(N), at most MAX_NLIST (k-means cost on CPU) and N / 39."""
        return max(1, min(MAX_NLIST, int(4 * np.sqrt(n)), n // 39))

    def _train_sample(self, store: Store, models: list[int], filt, t: Target) -> np.ndarray:
        """A seeded sample of the target's rows for IVF (-PQ) training: 50 per list, and
        >= 10240 rows so that 8-bit PQ codebooks have 40 points per centroid."""
        members = np.flatnonzero(t.member)
        rng = np.random.default_rng([self.s.seed, 21])
        n = min(len(members), max(256 * 40, 50 * self._nlist(len(members))))
        pick = np.zeros(len(self.cat), bool)
        pick[rng.choice(members, n, replace=False)] = True
        parts = []
        for rb in iter_batches(store, models, columns=("item_id", "embedding"), filter=filt,
                               batch_rows=self._batch_rows):  # fmt: skip
            sel = pick[self.cat.codes(rb["item_id"], str(store.root))]
            if sel.any():
                parts.append(batch_embeddings(rb)[sel])
        return np.concatenate(parts)

    def _topk_metrics(self, t: Target, st: dict) -> dict:
        g_codes = np.concatenate(st["done"]) if st["done"] else np.zeros(0, np.int64)  # (G,)
        g_lab = self.cat.labels[g_codes]
        results = st["search"].results()
        recall = st["search"].recall(self.k_lists)
        out = {}
        for (key, _, q_codes, allowed, excl), (scores, rows), rec in zip(
            t.queries, results, recall, strict=True
        ):
            valid = rows >= 0
            nn_codes = np.where(valid, g_codes[np.maximum(rows, 0)], -1)  # (Q, k)
            drop = (nn_codes == q_codes[:, None]) | ~valid  # self match or no hit: to the end
            order = np.argsort(drop, axis=1, kind="stable")
            scores, nn_codes = np.where(drop, -np.inf, scores), np.where(drop, -1, nn_codes)
            scores = np.take_along_axis(scores, order, 1)[:, : rows.shape[1] - int(excl)]
            nn_codes = np.take_along_axis(nn_codes, order, 1)[:, : rows.shape[1] - int(excl)]
            q_lab = self.cat.labels[q_codes]
            same = (self.cat.labels[np.maximum(nn_codes, 0)] == q_lab[:, None]) & (nn_codes >= 0)
            n_pos = self._n_pos(q_lab, g_lab, allowed) - (excl & t.member[q_codes])
            res = self._counts_to_metrics(scores, same, n_pos, t)
            if rec is not None:
                res[f"ann_recall@{min(self.k_lists, scores.shape[1])}"] = rec
            out[key] = res
        return out

    @staticmethod
    def _n_pos(q_lab: np.ndarray, g_lab: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """(Q,) gallery rows with each query's label (among ``allowed`` labels)."""
        g = g_lab if allowed is None else g_lab[np.isin(g_lab, allowed)]
        classes, counts = np.unique(g, return_counts=True)
        if len(classes) == 0:
            return np.zeros(len(q_lab), np.int64)
        pos = np.clip(np.searchsorted(classes, q_lab), 0, len(classes) - 1)
        return np.where(classes[pos] == q_lab, counts[pos], 0)

    def _counts_to_metrics(self, scores, same, n_pos, t: Target) -> dict:
        ks = self.ks
        L = scores.shape[1]
        hits, ap, n = mt.topk_counts(scores, same, n_pos, [min(k, L) for k in ks],
                                     map_k=min(MAP_AT_K, L))  # fmt: skip
        out = _retrieval(hits, ap, n, ks, self.s, "map")
        if self.map_name:
            k = int(self.map_name[4:])
            _, ap_k, n_k = mt.topk_counts(scores, same, n_pos, [1], map_k=min(k, L))
            out[self.map_name] = ap_k / max(n_k, 1)
        return out

    def _exact_metrics(self, t: Target, g_emb: np.ndarray, g_codes: np.ndarray) -> dict:
        """Full rankings: CMC with exact ties, exact mAP (sklearn's AP per query)."""
        ks = self.ks
        g_lab = self.cat.labels[g_codes]
        out = {}
        for key, q_emb, q_codes, allowed, excl in t.queries:
            cols = slice(None) if allowed is None else np.isin(g_lab, allowed)
            g, gl, gc = g_emb[cols], g_lab[cols], g_codes[cols]
            hits, ap, n = np.zeros(len(ks), np.int64), 0.0, 0
            ap_k, k_map = 0.0, int(self.map_name[4:]) if self.map_name else 0
            block = max(1, min(4096, (1 << 22) // max(len(gc), 1)))
            for start in range(0, len(q_codes), block):
                qc = q_codes[start : start + block]
                sims = q_emb[start : start + block] @ g.T  # (b, G)
                same = self.cat.labels[qc][:, None] == gl[None, :]  # (b, G)
                if excl:
                    own = qc[:, None] == gc[None, :]
                    sims[own], same[own] = -np.inf, False
                h, a, c = mt.block_counts(sims, same, np.asarray(ks), True)
                hits, ap, n = hits + h, ap + a, n + c
                if k_map:
                    kk = min(k_map, sims.shape[1])
                    top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
                    _, a_k, _ = mt.topk_counts(np.take_along_axis(sims, top, 1),
                                               np.take_along_axis(same, top, 1),
                                               same.sum(1), [1], map_k=kk)  # fmt: skip
                    ap_k += a_k
            out[key] = _retrieval(hits, ap, n, ks, self.s, "map")
            if k_map:
                out[key][self.map_name] = ap_k / max(n, 1)
        return out

    # ------------------------------------------------------------------ rows
    def rows(self, tasks: list[int], log=None, stale: bool = True) -> dict[int, dict]:
        """Rows ``tasks`` of every protocol's matrix and their stale-gallery entries.

        Gallery model j is read once for every asked row i >= j (in groups of query models
        whose embeddings fit half the memory budget).
        """
        s = self.s
        plan = self.plan
        items = {"closed": int(plan.closed.sum()), "heldout": plan.heldout}
        if plan.split is not None:
            items |= {"probes": int(plan.split.probes.sum()),
                      "open_gallery": int(plan.split.gallery.sum()),
                      "distractor_classes": list(plan.split.distractor_classes)}  # fmt: skip
        if plan.pairs is not None:
            items["verification_pairs"] = len(plan.pairs[2])
        rows = {
            t: {"task": t, "items": items, "protocols": {}, "stale": None} for t in sorted(tasks)
        }
        by_gallery: dict[int, list[int]] = {}
        for t in rows:
            for j in range(t + 1):
                by_gallery.setdefault(j, []).append(t)
        per_model = sum(a.nbytes for a in self._query_data(min(rows)).values())
        group = max(1, (s.budget // 2) // max(per_model, 1))
        for j, queries in sorted(by_gallery.items()):
            t0 = time.perf_counter()
            for g in range(0, len(queries), group):
                self._gallery_pass(rows, j, queries[g : g + group], first=g == 0)
            if log:
                log(f"gallery model {j}: rows {queries} in {time.perf_counter() - t0:.1f}s")
        for t in rows if stale else ():
            rows[t]["stale"] = self._stale(t)
        return rows

    def _gallery_pass(self, rows: dict, j: int, queries: list[int], first: bool) -> None:
        """One read of gallery model j for query models ``queries``: every protocol."""
        s, plan = self.s, self.plan
        targets = []
        closed_codes = np.flatnonzero(plan.closed)
        if "closed" in s.protocols:
            seen = np.asarray(self.scenario.tasks[j].seen_classes)  # classes model j had seen
            seen_rows = np.isin(self.cat.labels[closed_codes], seen)
            tc = Target("closed", plan.closed, self.exact["closed"])
            for i in queries:
                q = self._query_data(i)["closed"]
                tc.queries.append((("all", i), q, closed_codes, None, True))
                tc.queries.append((("seen", i), q[seen_rows], closed_codes[seen_rows], seen, True))
            targets.append(tc)
        items = "identification" in s.protocols and s.identification == "items"
        if "open" in s.protocols or items:
            probes = np.flatnonzero(plan.split.probes)
            to = Target("open", plan.split.gallery, self.exact["open"])
            for i in queries:
                to.queries.append((("open", i), self._query_data(i)["probes"], probes, None, False))
            targets.append(to)
        templates = first and "identification" in s.protocols and not items
        classes = np.unique(self.cat.labels)
        sums = np.zeros((len(classes), self.dim), np.float64) if templates else None  # (C, d)
        if targets or templates:
            self._class_index = np.searchsorted(classes, self.cat.labels)  # (N,)
            everything = np.ones(len(self.cat), np.int64)  # each item once per model
            res = self._run_pass(self.eval_store, [j], None, targets, everything, sums,
                                 plan.split.gallery if templates else None)  # fmt: skip
            for t in targets:
                for (proto, i), m in res[t.name].items():
                    if proto == "open" and items:
                        ident = {f"ident_cmc@{k}": m[f"cmc@{k}"] for k in s.topk}
                        self._put(rows[i], "identification", j, ident, None)
                    if proto != "open" or "open" in s.protocols:
                        self._put(rows[i], proto, j, m, self.map_kind(t.name))
        if templates:
            self._identify(rows, queries, j, sums, classes)
        if "verification" in s.protocols:
            for i in queries:
                self._verify(rows[i], i, j)

    def _put(self, row: dict, proto: str, j: int, m: dict, kind: str | None) -> None:
        block = row["protocols"].setdefault(proto, {"values": {}, "map_kind": kind})
        for name, v in m.items():
            block["values"].setdefault(name, []).append(v)
        assert all(len(v) == j + 1 for v in block["values"].values()), (proto, j)

    def _identify(
        self, rows: dict, queries: list[int], j: int, sums: np.ndarray, classes: np.ndarray
    ) -> None:
        """Probes by each model i against the class templates of gallery model j."""
        present = np.unique(self.cat.labels[self.plan.split.gallery])
        keep = np.isin(classes, present)
        templates = mt.templates_from_sums(sums[keep])  # (C, d)
        probes = np.flatnonzero(self.plan.split.probes)
        for i in queries:
            q = self._query_data(i)["probes"]
            hits, n = mt.template_cmc_counts(q, self.cat.labels[probes], templates,
                                             classes[keep], self.s.topk)  # fmt: skip
            m = {f"ident_cmc@{k}": float(h) / n for k, h in zip(self.s.topk, hits, strict=True)}
            self._put(rows[i], "identification", j, m, None)

    def _verify(self, row: dict, i: int, j: int) -> None:
        a, b, same = self.plan.pairs
        pos = np.searchsorted(self.plan.verif_items, np.stack([a, b]))  # (2, P)
        ea = self._query_data(i)["verif"][pos[0]]  # side a by model i
        eb = self._query_data(j)["verif"][pos[1]]  # side b by model j
        scores = np.einsum("pd,pd->p", ea.astype(np.float64), eb.astype(np.float64))
        m = {"verif_acc": mt.verification_accuracy(scores, same, self.s.folds)}
        tar = mt.tar_at_far(scores, same, self.s.fars)
        m.update({pr.far_name(f): v for f, v in tar.items()})
        self._put(row, "verification", j, m, None)

    def _stale(self, s: int) -> dict:
        """After task s: queries (closed items that have arrived, by model s) against the
        gallery as stored (each item embedded by the model of its arrival task)."""
        t0 = time.perf_counter()
        store = open_store(self.run_dir / "gallery")
        arrived = (self.cat.tasks >= 0) & (self.cat.tasks <= s)
        closed_codes = np.flatnonzero(self.plan.closed)
        present = arrived[closed_codes]  # queries: the subset's items that are in the gallery
        target = Target("stale", arrived, self.exact["stale"])
        target.queries.append(("stale", self._query_data(s)["closed"][present],
                               closed_codes[present], None, True))  # fmt: skip
        filt = ds.field("task") == ds.field("model")
        res = self._run_pass(store, list(range(s + 1)), filt, [target], arrived.astype(np.int64),
                             None, None)  # fmt: skip
        return {"task": s, "gallery": int(arrived.sum()), "queries": int(present.sum()),
                "models_in_gallery": res["models"], "seconds": time.perf_counter() - t0,
                "map_kind": self.map_kind("stale"), **res["stale"]["stale"]}  # fmt: skip
