"""The gallery scan of the evaluation engine: a cell's gallery cut into shards (runs of
Parquet parts), and one read of a shard feeding every target of the cell (``ScanMixin.scan``):
streamed top-k lists (``distcl.gallery.search``), exact full rankings where the budget allows,
class-template sums, and the ids read; never embeddings out. Mixed into
:class:`distcl.eval.engine.Engine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcl.eval import metrics as mt
from distcl.eval.selection import MAP_AT_K, MAX_BATCH_ROWS, MAX_NLIST
from distcl.gallery.store import (
    Store,
    batch_embeddings,
    is_transformed_part,
    iter_batches,
    sub_store,
)


@dataclass
class Target:
    """One gallery searched in a pass: rows ``member`` of the store, query sets, buffers."""

    name: str
    member: np.ndarray  # (N,) bool over canonical positions: the gallery's items
    exact: bool  # full rankings (gallery held whole) instead of streamed top-k lists
    queries: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None, bool]] = field(
        default_factory=list
    )  # (key, emb (Q, d), codes (Q,), allowed labels or None, exclude self)
    dim: int = 0  # the size the gallery's rows are searched in
    gallery_map: Any = None  # what rows go through before the search (sizes: eval.spaces)


@dataclass(frozen=True)
class Cell:
    """A unit of row work, small and picklable (what a Ray task is given): one read of
    gallery model ``model`` for the query models ``queries`` (``kind="gallery"``), one read
    of it with its rows transformed into the space of the one query model (``"transformed"``,
    method fct), or the stale gallery after task ``model`` (``kind="stale"``)."""

    kind: str
    model: int
    queries: tuple[int, ...] = ()


@dataclass
class Partial:
    """One gallery shard's scan of a cell (``Engine.scan``): no gallery embeddings, only the
    canonical positions of the rows read, top-k lists, template sums and exact metrics."""

    read: np.ndarray  # (R,) int64 canonical positions of every row read (rows-per-item check)
    models: list[int]
    sums: np.ndarray | None  # (C, d) float64 template sums, or None
    # streamed target -> (codes (G_s,) of its rows in read order, per query set (scores (Q, k),
    # rows (Q, k) local to the shard, -1 = none), per query set ANN recall or None, and for
    # ANN per query set (sampled query positions, exact (scores, rows) of those) or None)
    lists: dict[str, tuple[np.ndarray, list, list, list | None]] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)  # exact target -> {key: metrics}
    seconds: float = 0.0


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _add_rows(sums: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
    """sums[index[r]] += rows[r] for every r (np.add.at, but one sort instead of a slow loop)."""
    if len(index) == 0:
        return
    order = np.argsort(index, kind="stable")
    keys, starts = np.unique(index[order], return_index=True)
    sums[keys] += np.add.reduceat(rows[order], starts, axis=0)


class ScanMixin:
    """Shards of a cell and the scan of one shard (:class:`~distcl.eval.engine.Engine`)."""

    @property
    def shard_rows(self) -> int:
        """Rows per gallery shard: ``shard_rows`` or, by default, one budget of embeddings."""
        return self.s.shard_rows or max(MAX_BATCH_ROWS, self.s.budget // (4 * self.dim))

    def shards(self, cell: Cell) -> list[tuple[str, ...]]:
        """The gallery shards of a cell: runs of consecutive Parquet parts (in read order) of at
        most ``shard_rows`` rows by their footers (a larger part is a shard of its own); none
        when the cell reads no gallery. One shard when a target keeps its gallery whole
        (exact rankings: merging full rankings is not done); IVF (-PQ) shards train an index
        each.

        Shards depend on the store and the settings only, never on where they run: the
        in-process engine and the Ray tasks search the same blocks and merge the same lists.
        """
        if cell.kind == "openset":
            return self._openset_shards(cell)
        names = self._target_names(cell)
        if not names and not self._templates(cell):
            return []
        store, models, _, _ = self._source(cell)
        whole = any(self.exact[n] for n in names)
        groups: list[list[str]] = []
        size, dim = 0, None
        for path, info in store.parts:
            if info.model not in models:
                continue
            same = info.dim == dim  # a shard holds rows of one size (model.upgrades)
            if groups and same and (whole or size + info.rows <= self.shard_rows):
                groups[-1].append(path)
                size += info.rows
            else:
                groups.append([path])
                size, dim = info.rows, info.dim
        return [tuple(g) for g in groups] or [()]

    def scan(self, cell: Cell, paths: tuple[str, ...]) -> Partial:
        """Read one gallery shard of a cell once, feeding every target: per streamed target its
        top-k lists (rows local to the shard), per exact target its metrics, the template
        sums and the ids read. Memory: the query sets, the buffers (half the budget)."""
        from distcl.gallery.search import QuerySet, StreamSearch

        if cell.kind == "openset":
            return self._scan_openset(cell, paths)
        t0 = time.perf_counter()
        full, models, filt, _ = self._source(cell)
        store = sub_store(full, paths)
        where = f"{full.root}/model={models}"
        # The stale gallery mixes models: a shard holds rows of one size (``shards``), searched
        # in its first model's space.
        first = store.parts[0][1].model if store.parts else cell.model
        targets = self._targets(cell, gallery_model=first if cell.kind == "stale" else None)
        sums = templ_member = None
        if self._templates(cell):
            classes = np.unique(self.cat.labels)
            self._class_index = np.searchsorted(classes, self.cat.labels)  # (N,)
            sums = np.zeros((len(classes), self.dims[models[0]]), np.float64)  # (C, d_j)
            templ_member = self.plan.split.gallery
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
                sample, n_here = None, n
                if self.s.index != "flat":  # this shard's index, on this shard's rows
                    sample, n_here = self._train_sample(store, models, filt, t, cell)
                search = StreamSearch(qsets, t.dim, kind=self.s.index,
                                      nlist=self._nlist(n_here), nprobe=self.s.nprobe,
                                      use_gpu=self.on_gpu, seed=self.s.seed)  # fmt: skip
                if sample is not None and len(sample):  # else no row of t: nothing to add
                    search.train(sample, n_here)
            buf = np.empty((max(cap, 1), t.dim), np.float32)  # (cap, d)
            state[t.name] = {"buf": buf, "codes": [], "fill": 0, "search": search, "done": []}
        read: list[np.ndarray] = []
        model_set: set[int] = set()
        cols = ("item_id", "label", "task", "model", "embedding")
        for rb, transformed in self._part_batches(store, models, cols, filt):
            codes = self.cat.codes(rb["item_id"], where)
            kept = self._rows_kept(cell, rb, codes, transformed)
            if not kept.all():  # rows a later re-index replaced (the stale gallery)
                rb, codes = rb.filter(pa.array(kept)), codes[kept]
            read.append(codes)
            model_set.update(pc.unique(rb["model"]).to_pylist())
            emb = batch_embeddings(rb)  # (B, d)
            if sums is not None:
                sel = templ_member[codes]
                _add_rows(sums, self._class_index[codes[sel]], mt.normalize_rows(emb[sel]))
            for t in targets:
                sel = np.flatnonzero(t.member[codes])
                st = state[t.name]
                rows = emb if t.gallery_map is None else t.gallery_map(emb)
                while len(sel):
                    take = sel[: len(st["buf"]) - st["fill"]]
                    st["buf"][st["fill"] : st["fill"] + len(take)] = rows[take]
                    st["codes"].append(codes[take])
                    st["fill"] += len(take)
                    sel = sel[len(take) :]
                    if st["fill"] == len(st["buf"]) and not t.exact:
                        self._flush(st)
        out = Partial(_cat(read), sorted(model_set), sums)
        for t in targets:
            st = state[t.name]
            if t.exact:
                out.metrics[t.name] = self._exact_metrics(t, st["buf"][: st["fill"]],
                                                          _cat(st["codes"]))  # fmt: skip
            else:
                self._flush(st)
                found = st["search"]
                exact = None if self.s.index == "flat" else found.exact_sample()
                out.lists[t.name] = (_cat(st["done"]), found.results(),
                                     found.recall(self.k_lists), exact)  # fmt: skip
        out.seconds = time.perf_counter() - t0
        return out

    def _part_batches(self, store: Store, models, columns, filt):
        """(record batch, whether its part holds rows transformed by h) of a shard's parts, in
        the store's order (``Engine.stale_ranks`` ranks the two kinds of rows apart)."""
        for path, _info in store.parts:
            part = sub_store(store, (path,))
            for rb in iter_batches(part, models, columns=columns, filter=filt,
                                   batch_rows=self._batch_rows):  # fmt: skip
                yield rb, is_transformed_part(path)

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

    def _train_sample(self, store: Store, models: list[int], filt,
                      t: Target, cell: Cell) -> tuple[np.ndarray, int]:  # fmt: skip
        """(a seeded sample of the target's rows in ``store`` (a gallery shard) for IVF (-PQ)
        training: 50 per list, and >= 10240 rows so that 8-bit PQ codebooks have 40 points
        per centroid; the number of the target's rows there), in one pass over the shard.

        Each evaluation item has a seeded uniform key; the sample is the rows of the ``n``
        smallest keys in catalogue order (a uniform sample without replacement, the same
        whatever the batch size). The pass keeps the smallest keys seen so far (at most 1.25
        times the largest ``n`` the shard's footers allow, plus a batch), so it never holds
        the shard."""
        keys = np.random.default_rng([self.s.seed, 21]).random(len(self.cat))  # (N,)
        bound = self._sample_size(sum(info.rows for _, info in store.parts
                                      if info.model in models))  # fmt: skip
        kept_codes, kept_emb, n_kept, n_rows = [], [], 0, 0
        cols = ("item_id", "model", "embedding")
        for rb, transformed in self._part_batches(store, models, cols, filt):
            codes = self.cat.codes(rb["item_id"], str(store.root))
            kept = self._rows_kept(cell, rb, codes, transformed)
            sel = np.flatnonzero(t.member[codes] & kept)
            if not len(sel):
                continue
            n_rows += len(sel)
            kept_codes.append(codes[sel])
            rows = batch_embeddings(rb)[sel]
            kept_emb.append(rows if t.gallery_map is None else t.gallery_map(rows))
            n_kept += len(sel)
            if n_kept > bound + max(bound // 4, 1):  # keep the ``bound`` smallest keys
                c, e = np.concatenate(kept_codes), np.concatenate(kept_emb)
                best = np.argpartition(keys[c], bound)[:bound]
                kept_codes, kept_emb, n_kept = [c[best]], [e[best]], bound
        if not n_rows:
            return np.zeros((0, t.dim), np.float32), 0
        c, e = np.concatenate(kept_codes), np.concatenate(kept_emb)
        best = np.argsort(keys[c], kind="stable")[: self._sample_size(n_rows)]
        return e[best[np.argsort(c[best], kind="stable")]], n_rows  # in catalogue order

    def _sample_size(self, n: int) -> int:
        """IVF (-PQ) training rows for a gallery of ``n`` rows (see ``_train_sample``)."""
        return min(n, max(256 * 40, 50 * self._nlist(n)))
