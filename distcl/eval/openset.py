"""Open-set 1:N identification in the evaluation engine (``eval.protocols: [openset]``;
definitions: ``distcl.eval.metrics.tpir_from_best``, docs/metrics.md). Mixed into
:class:`distcl.eval.engine.Engine`.

The held-out classes are split (``distcl.eval.protocols.openset_split``) into enrolled classes
(mated probes, the rest of their items the gallery), non-mated classes (probes only) and
distractor classes (gallery only); ``eval.distractors`` adds a Parquet store of distractor
rows (one ``model=<t>`` folder per model, as the gallery: MegaFace's million) to every
gallery. A cell is one read of gallery model j (its openset gallery rows, then its distractor
rows) for a group of query models i >= j: per probe the best same-class and the best other
score (``metrics.best_scores``), kept as maxima over the shards, so a shard is any run of
parts and the merge is exact; the finish turns them into TPIR at each FPIR and rank-1. Memory:
the probes of the group and one block of scores (a quarter of the budget); never a gallery.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.dataset as ds

from distcl.eval.scan import Cell, Partial
from distcl.gallery.store import batch_embeddings, iter_batches, sub_store


class OpenSetMixin:
    """``openset`` cells: their shards, scans and finish (:class:`~distcl.eval.engine.Engine`)."""

    def _openset_shards(self, cell: Cell) -> list[tuple[str, ...]]:
        """Runs of parts of at most ``shard_rows`` rows: model j's evaluation parts, then its
        distractor parts (a shard never mixes the two stores)."""
        out = []
        for store in (self.eval_store, self.distractors):
            if store is None:
                continue
            group, size = [], 0
            for path, info in store.parts:
                if info.model != cell.model:
                    continue
                if group and size + info.rows > self.shard_rows:
                    out.append(tuple(group))
                    group, size = [], 0
                group.append(path)
                size += info.rows
            if group:
                out.append(tuple(group))
        return out or [()]

    def _scan_openset(self, cell: Cell, paths: tuple[str, ...]) -> Partial:
        t0 = time.perf_counter()
        j, plan = cell.model, self.plan.openset
        distract = self.distractors is not None and bool(paths) and paths[0] in self._dist_paths
        store = sub_store(self.distractors if distract else self.eval_store, paths)
        probes = np.flatnonzero(plan.probes)
        q_lab = self.cat.labels[probes]
        sets = {}
        for i in cell.queries:
            qmap, gmap, _ = self.spaces.maps(i, j)
            q = self._query_data(i)["openset"]
            sets[i] = (q if qmap is None else qmap(q), gmap)
        best = {i: (np.full(len(probes), -np.inf, np.float32),
                    np.full(len(probes), -np.inf, np.float32)) for i in cell.queries}  # fmt: skip
        per = max(256, self.s.budget // (16 * max(len(probes), 1)))  # rows per score block
        read = []
        cols = ("item_id", "embedding") if distract else ("item_id", "label", "embedding")
        held = None if distract else ds.field("task") == -1  # the held-out classes' rows only
        for rb in iter_batches(store, j, columns=cols, filter=held, batch_rows=self._batch_rows):
            emb = batch_embeddings(rb)
            if distract:
                g_lab = np.full(len(emb), -1, np.int64)
            else:
                codes = self.cat.codes(rb["item_id"], str(self.eval_store.root))
                read.append(codes)
                keep = plan.gallery[codes]
                emb, g_lab = emb[keep], self.cat.labels[codes[keep]]
            for start in range(0, len(emb), per):
                e, lab = emb[start : start + per], g_lab[start : start + per]
                same = None if distract else q_lab[:, None] == lab[None, :]  # (Q, b)
                for i, (q, gmap) in sets.items():
                    sims = q @ (e if gmap is None else gmap(e)).T  # (Q, b)
                    pos, neg = best[i]
                    if same is None:  # distractors: every row a negative
                        np.maximum(neg, sims.max(1, initial=-np.inf), out=neg)
                        continue
                    np.maximum(pos, np.where(same, sims, -np.inf).max(1, initial=-np.inf),
                               out=pos)  # fmt: skip
                    sims[same] = -np.inf
                    np.maximum(neg, sims.max(1, initial=-np.inf), out=neg)
        out = Partial(np.concatenate(read) if read else np.zeros(0, np.int64), [j], None)
        out.metrics["openset"] = best
        out.seconds = time.perf_counter() - t0
        return out

    def _finish_openset(self, cell: Cell, partials: list[Partial]) -> dict:
        from distcl.eval.metrics import tpir_from_best

        plan = self.plan.openset
        count = np.zeros(len(self.cat), np.int64)
        for p in partials:
            count += np.bincount(p.read, minlength=len(count))
        expected = (self.cat.tasks < 0).astype(np.int64)  # each held-out item once
        if (count != expected).any():
            bad = int(np.flatnonzero(count != expected)[0])
            raise ValueError(f"{self.eval_store.root}/model={cell.model}: item "
                             f"{self.cat.ids[bad].as_py()!r} has {count[bad]} rows, expected "
                             f"{expected[bad]}")  # fmt: skip
        mated = plan.mated[np.flatnonzero(plan.probes)]
        puts = []
        for i in cell.queries:
            pos = np.max([p.metrics["openset"][i][0] for p in partials], axis=0)
            neg = np.max([p.metrics["openset"][i][1] for p in partials], axis=0)
            puts.append((i, "openset", cell.model, tpir_from_best(pos, neg, mated, self.s.fpirs),
                         None))  # fmt: skip
        return {"puts": puts, "stale": None}

    def openset_items(self) -> dict:
        plan = self.plan.openset
        out = {"openset_mated_probes": int(plan.mated.sum()),
               "openset_nonmated_probes": int((plan.probes & ~plan.mated).sum()),
               "openset_gallery": int(plan.gallery.sum()),
               "nonmated_classes": list(plan.nonmated_classes)}  # fmt: skip
        if self.distractors is not None:
            out["distractor_rows"] = {m: sum(i.rows for _, i in self.distractors.parts
                                             if i.model == m) for m in self.dims}  # fmt: skip
        return out
