"""The streaming evaluation engine: rows of every protocol's compatibility matrix from the
Parquet store (docs/design.md; definitions in docs/metrics.md).

Its parts, one module each: ``selection`` (what is computed and on which items: settings,
the canonical catalogue, the item plan), ``engine`` (this module: the query side, the cells
and the targets each cell searches), ``scan`` (one read of a gallery shard), ``merge``
(shards' partial results into row entries) and ``cellmetrics`` (the metrics of one cell).

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

The work comes in cells (``cells``): one read of gallery model j for a group of query models,
or the stale gallery after task s. A cell's gallery is cut into shards (``shards``: runs of
Parquet parts of at most ``shard_rows`` rows); ``scan`` reads one shard and returns top-k lists,
template sums and exact metrics, never embeddings; ``finish`` merges the shards' lists
(``faiss.ResultHeap``, in read order) and returns the rows' metric entries. ``rows`` runs the
cells in this process; ``distcl.eval.distributed`` runs the same scans and finishes as Ray
tasks on the cluster's worker nodes (one task per shard, one per cell), so both give the same
numbers. A target ranked in full (exact mAP) is one shard. With IVF (-PQ) each shard trains
its own index on a seeded sample of its rows (an index per shard, as faiss's IndexShards
holds them); the ANN recall is computed at the merge, from the shards' merged lists against
their merged exact lists of the same sampled queries. One shard gives what an unsharded
search gives.

Test: ``.venv/bin/python -m pytest tests/test_eval_engine.py -q``
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from distcl import storage
from distcl.eval.cellmetrics import CellMetricsMixin
from distcl.eval.merge import MergeMixin, apply_cell
from distcl.eval.openset import OpenSetMixin
from distcl.eval.scan import Cell, Partial, ScanMixin, Target
from distcl.eval.selection import (
    EXACT_MAX_PAIRS,
    MAP_AT_K,
    MAX_BATCH_ROWS,
    Catalogue,
    EvalSettings,
    Plan,
    _lean_malloc,
    release_memory,
)
from distcl.eval.spaces import Spaces
from distcl.eval.transforms import chain, load_transforms
from distcl.gallery.store import (
    Store,
    batch_embeddings,
    is_transformed_part,
    iter_batches,
    open_store,
    sub_store,
)
from distcl.rundir import RunDir
from distcl.storage import Uri

__all__ = ["Catalogue", "Cell", "Engine", "EvalSettings", "Partial", "Plan", "apply_cell",
           "release_memory"]  # fmt: skip


def _resolve_gpu(use_gpu: bool | str) -> bool:
    """``eval.use_gpu`` in this process: "auto" is whether faiss sees a GPU here."""
    from distcl.gallery import index

    if use_gpu is True and not index.gpu_available():  # name the job's field
        raise ValueError("eval.use_gpu is yes, but faiss sees no GPU in this process "
                         "(install faiss-gpu, or set eval.use_gpu: auto or no)")  # fmt: skip
    return index._resolve_gpu(use_gpu)


class Engine(ScanMixin, MergeMixin, CellMetricsMixin, OpenSetMixin):
    """Rows of the matrices of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path | Uri, settings: EvalSettings, scenario: Any) -> None:
        _lean_malloc()
        self.run_dir = storage.location(run_dir)  # a local path or an object-store URI
        self.s = settings
        self.on_gpu = _resolve_gpu(settings.use_gpu)  # here, where this engine searches
        self.scenario = scenario
        self.eval_store = open_store(RunDir(self.run_dir).eval_embeddings)
        if not self.eval_store.parts:
            raise ValueError(f"{self.eval_store.root}: no embedded evaluation set")
        self.dims = self.eval_store.dims  # model -> embedding size (model.upgrades)
        self.dim = max(self.dims.values())  # the largest: what memory budgets plan for
        self.spaces = Spaces(self.dims, settings.dim_change, self._compat())
        # FCT: h_u of every later model (models/<u>/transform.npz) -> the "transformed" matrix
        self.transforms = load_transforms(self.run_dir, [u for u in self.dims if u > 0])
        self.transformed = settings.transformed
        self.cat = Catalogue.read(self.eval_store, 0)
        self.cat.keys  # noqa: B018  (the sorted keys, built once, here)
        release_memory()  # the read's and the sort's transients (~150 MB per 1M items)
        self.plan = Plan.build(self.cat, settings)
        self.distractors = None  # openset: eval.distractors, a store of rows per model
        if settings.distractors and self.plan.openset is not None:
            self.distractors = open_store(settings.distractors)
            for m, d in self.distractors.dims.items():
                if m in self.dims and d != self.dims[m]:
                    raise ValueError(f"eval.distractors: {settings.distractors} holds rows of "
                                     f"size {d} for model {m + 1}, whose rows have size "
                                     f"{self.dims[m]}")  # fmt: skip
            missing = [m + 1 for m in self.dims if m not in self.distractors.dims]
            if missing:
                raise ValueError(f"eval.distractors: {settings.distractors} has no rows of "
                                 f"model(s) {missing} (model=<t>/ folders, 0-indexed)")  # fmt: skip
            self._dist_paths = {p for p, _ in self.distractors.parts}
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._reindexed: tuple[np.ndarray, np.ndarray] | None = None  # distcl backfill --apply
        ks = {*settings.topk, *settings.recall_ks}
        if settings.metric.startswith(("cmc@", "recall@")):  # e.g. cmc@3 with topk (1, 5)
            ks.add(int(settings.metric.split("@")[1]))
        self.ks = tuple(sorted(ks))
        self.map_name = settings.metric if settings.metric.startswith("map@") else None
        self.k_lists = max(ks | {int(self.map_name[4:])} if self.map_name else ks)
        n_closed = int(self.plan.closed.sum())
        split = self.plan.split
        one_size = len(set(self.dims.values())) == 1  # else the stale gallery is searched
        self.exact = {  # decided once per run, so every row of a matrix has one mAP kind
            "closed": self._feasible(n_closed, n_closed),
            "stale": one_size and self._feasible(n_closed, int((self.cat.tasks >= 0).sum())),
            "open": split is not None
            and self._feasible(int(split.probes.sum()), int(split.gallery.sum())),
        }

    def _compat(self) -> dict[int, np.ndarray]:
        """The learned projections of upgraded models (``models/<t>/compat.npy``), where a
        run has them (``model.dim_change: projection``)."""
        import io

        out = {}
        rd = RunDir(self.run_dir)
        for model in self.dims:
            path = rd.model(model) / "compat.npy"
            if storage.is_file(path):
                out[model] = np.load(io.BytesIO(storage.read_bytes(path)))
        return out

    def _feasible(self, n_query: int, n_gallery: int) -> bool:
        fits = n_gallery * self.dim * 4 <= self.s.budget // 2
        return self.s.exact_map and fits and n_query * n_gallery <= EXACT_MAX_PAIRS

    @property
    def _batch_rows(self) -> int:
        return int(max(256, min(MAX_BATCH_ROWS, self.s.budget // 32 // (4 * self.dim))))

    def map_kind(self, target: str) -> str:
        return "exact" if self.exact[target] else f"map@{MAP_AT_K}"

    def release(self) -> None:
        """Drop the cached query sets (an engine kept by a Ray worker keeps the catalogue)."""
        self._cache.clear()

    def _query_data(self, model: int) -> dict[str, np.ndarray]:
        """Model ``model``'s embeddings of the closed items, probes and verification items,
        (n, d) each in canonical order; read with the rows filtered in the scan, cached."""
        if model in self._cache:
            return self._cache[model]
        sets = {"closed": np.flatnonzero(self.plan.closed), "verif": self.plan.verif_items}
        if self.plan.split is not None:
            sets["probes"] = np.flatnonzero(self.plan.split.probes)
        if self.plan.openset is not None:
            sets["openset"] = np.flatnonzero(self.plan.openset.probes)
        needed = np.unique(np.concatenate(list(sets.values())))
        slot = np.full(len(self.cat), -1, np.int64)
        slot[needed] = np.arange(len(needed))
        emb = np.empty((len(needed), self.dims[model]), np.float32)  # (n_needed, d)
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

    def _source(self, cell: Cell) -> tuple[Store, list[int], ds.Expression | None, np.ndarray]:
        """A cell's pass: the store, its models, the row filter and the rows expected per item
        (canonical positions, (N,)): each item once per model (a gallery, or model j's rows
        transformed), or, for the stale gallery after task s, once if it arrived at a task
        <= s (its row as stored then: ``_rows_kept``)."""
        if cell.kind == "stale":
            store = open_store(RunDir(self.run_dir).gallery)
            arrived = (self.cat.tasks >= 0) & (self.cat.tasks <= cell.model)
            filt = (ds.field("task") >= 0) & (ds.field("task") <= cell.model)
            return store, list(range(cell.model + 1)), filt, arrived.astype(np.int64)
        return self.eval_store, [cell.model], None, np.ones(len(self.cat), np.int64)

    def _rows_kept(self, cell: Cell, batch, codes: np.ndarray,
                   transformed: bool = False) -> np.ndarray:  # fmt: skip
        """(B,) bool: the rows of a batch the cell uses. The stale gallery after task s holds
        each arrived item once, as stored at s: the row of the highest rank (``stale_ranks``)
        among its arrival row (model == task) and the rows of later re-indexes with a model
        <= s (``distcl backfill --apply`` writes rows of model t > task). ``transformed``: the
        batch comes from a part of transformed rows (``--apply --transform``; a shard never
        mixes them with embedded rows: ``shards``)."""
        if cell.kind != "stale":
            return np.ones(len(codes), bool)
        rank = 2 * batch["model"].to_numpy().astype(np.int64) + (0 if transformed else 1)
        return rank == self.stale_ranks(cell.model)[codes]

    def stale_ranks(self, s: int) -> np.ndarray:
        """(N,) the rank of each item's row in the stale gallery after task s: 2 * model + 1
        for a row embedded from the image, 2 * model for a row transformed into model's space
        by h (method fct), so a re-embedded row outranks a transformed one of the same model,
        and a later model outranks both. Rows of models > s do not count."""
        if self._reindexed is None:  # (codes, ranks) of every re-indexed row, read once
            store = open_store(RunDir(self.run_dir).gallery)
            codes, ranks = [], []
            for path, _info in store.parts:
                bonus = 0 if is_transformed_part(path) else 1
                for rb in iter_batches(sub_store(store, (path,)), columns=("item_id", "model"),
                                       filter=ds.field("task") != ds.field("model")):  # fmt: skip
                    codes.append(self.cat.codes(rb["item_id"], path))
                    ranks.append(2 * rb["model"].to_numpy().astype(np.int64) + bonus)
            self._reindexed = (np.concatenate(codes or [np.zeros(0, np.int64)]),
                               np.concatenate(ranks or [np.zeros(0, np.int64)]))  # fmt: skip
        out = 2 * self.cat.tasks.astype(np.int64) + 1  # the arrival row: model == task
        codes, ranks = self._reindexed
        keep = ranks // 2 <= s
        np.maximum.at(out, codes[keep], ranks[keep])
        return out

    @property
    def _ident_items(self) -> bool:
        return "identification" in self.s.protocols and self.s.identification == "items"

    def _target_names(self, cell: Cell) -> list[str]:
        if cell.kind == "stale":
            return ["stale"]
        if cell.kind == "transformed":  # the closed set's gallery, its rows transformed
            return ["closed"] if "closed" in self.s.protocols else []
        names = ["closed"] if "closed" in self.s.protocols else []
        return names + (["open"] if "open" in self.s.protocols or self._ident_items else [])

    def _templates(self, cell: Cell) -> bool:
        """Whether the cell's pass sums the class templates (identification by templates)."""
        ident = "identification" in self.s.protocols
        return cell.kind == "gallery" and ident and not self._ident_items

    def _targets(self, cell: Cell, gallery_model: int | None = None) -> list[Target]:
        """The galleries searched in a cell's pass, with their query sets (in the gallery
        model's space: ``distcl.eval.spaces``; the stale gallery's shard of ``gallery_model``'s
        size)."""
        plan = self.plan
        closed_codes = np.flatnonzero(plan.closed)
        names = self._target_names(cell)
        if cell.kind == "stale":
            arrived = self._source(cell)[3].astype(bool)
            present = arrived[closed_codes]  # queries: the subset's items in the gallery
            space = cell.model if gallery_model is None else gallery_model
            qmap, gmap, dim = self.spaces.maps(cell.model, space)
            q = self._query_data(cell.model)["closed"][present]
            t = Target("stale", arrived, self.exact["stale"], dim=dim, gallery_map=gmap)
            t.queries.append(("stale", q if qmap is None else qmap(q), closed_codes[present],
                              None, True))  # fmt: skip
            return [t]
        j = cell.model
        if cell.kind == "transformed":  # model i's queries, model j's rows through h_j+1..h_i
            (i,) = cell.queries
            tc = Target("closed", plan.closed, self.exact["closed"], dim=self.dims[i],
                        gallery_map=chain(self.transforms, j, i))  # fmt: skip
            q = self._query_data(i)["closed"]
            tc.queries.append((("transformed", i), q, closed_codes, None, True))
            return [tc]
        _, gmap, dim = self.spaces.maps(cell.queries[0], j)  # one per cell (``cells``)
        targets = []
        if "closed" in names:
            seen = np.asarray(self.scenario.tasks[cell.model].seen_classes)  # model j's classes
            seen_rows = np.isin(self.cat.labels[closed_codes], seen)
            tc = Target("closed", plan.closed, self.exact["closed"], dim=dim, gallery_map=gmap)
            for i in cell.queries:
                q = self.spaces.queries(self._query_data(i)["closed"], i, j)
                tc.queries.append((("all", i), q, closed_codes, None, True))
                tc.queries.append((("seen", i), q[seen_rows], closed_codes[seen_rows], seen, True))
            targets.append(tc)
        if "open" in names:
            probes = np.flatnonzero(plan.split.probes)
            to = Target("open", plan.split.gallery, self.exact["open"], dim=dim, gallery_map=gmap)
            for i in cell.queries:
                q = self.spaces.queries(self._query_data(i)["probes"], i, j)
                to.queries.append((("open", i), q, probes, None, False))
            targets.append(to)
        return targets

    def cells(self, tasks: list[int], stale: bool = True) -> tuple[dict[int, dict], list[Cell]]:
        """The empty rows ``tasks`` and the cells that fill them, in the order to apply them:
        per gallery model j (ascending), groups of the query models i >= j whose embeddings
        fit half the memory budget; then the stale gallery after each task."""
        plan = self.plan
        items = {"closed": int(plan.closed.sum()), "heldout": plan.heldout}
        if plan.split is not None:
            items |= {"probes": int(plan.split.probes.sum()),
                      "open_gallery": int(plan.split.gallery.sum()),
                      "distractor_classes": list(plan.split.distractor_classes)}  # fmt: skip
        if plan.pairs is not None:
            items["verification_pairs"] = len(plan.pairs[2])
        if plan.openset is not None:
            items |= self.openset_items()
        rows = {
            t: {"task": t, "items": items, "protocols": {}, "stale": None} for t in sorted(tasks)
        }
        by_gallery: dict[int, list[int]] = {}
        for t in rows:
            for j in range(t + 1):
                by_gallery.setdefault(j, []).append(t)
        per_model = sum(a.nbytes for a in self._query_data(min(rows)).values())
        group = max(1, (self.s.budget // 2) // max(per_model, 1))
        cells = []
        for j, queries in sorted(by_gallery.items()):
            by_size: dict[int, list[int]] = {}  # query models meeting model j alike share a cell
            for i in queries:
                by_size.setdefault(self.dims[i], []).append(i)
            cells += [Cell("gallery", j, tuple(same[g : g + group]))
                      for same in by_size.values() for g in range(0, len(same), group)]  # fmt: skip
            if self.transformed and "closed" in self.s.protocols:  # one pass per (i, j): h_i..
                cells += [Cell("transformed", j, (i,)) for i in queries if i > j]
            if self.plan.openset is not None:  # 1:N: one more read of model j (+ distractors)
                cells += [Cell("openset", j, tuple(same[g : g + group]))
                          for same in by_size.values()
                          for g in range(0, len(same), group)]  # fmt: skip
        return rows, cells + ([Cell("stale", t) for t in rows] if stale else [])

    def rows(self, tasks: list[int], log=None, stale: bool = True) -> dict[int, dict]:
        """Rows ``tasks`` of every protocol's matrix and their stale-gallery entries, in this
        process: each cell's shards scanned in turn, then merged (``distcl.eval.distributed``
        runs the same cells as Ray tasks).

        Gallery model j is read once for every asked row i >= j (in groups of query models
        whose embeddings fit half the memory budget).
        """
        rows, cells = self.cells(tasks, stale)
        spent: dict[int, float] = {}
        for n, cell in enumerate(cells):
            t0 = time.perf_counter()
            partials = [self.scan(cell, paths) for paths in self.shards(cell)]
            apply_cell(rows, self.finish(cell, partials))
            if cell.kind != "stale":
                spent[cell.model] = spent.get(cell.model, 0.0) + time.perf_counter() - t0
                last = n + 1 == len(cells) or cells[n + 1].model != cell.model
                if log and (last or cells[n + 1].kind == "stale"):
                    done = [t for t in rows if t >= cell.model]
                    log(f"gallery model {cell.model}: rows {done} in {spent[cell.model]:.1f}s")
        return rows
