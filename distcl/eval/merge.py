"""Merging a cell's shard scans into entries of the matrices' rows (``MergeMixin.finish``:
the rows-per-item check, the shards' top-k lists merged in read order, ANN recall against the
merged exact lists), and entering them into the rows (``apply_cell``). Mixed into
:class:`distcl.eval.engine.Engine`; ``distcl.eval.distributed`` runs ``finish`` as a Ray task.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from distcl.eval.scan import Cell, Partial


class MergeMixin:
    """A cell's partials merged into row entries (:class:`~distcl.eval.engine.Engine`)."""

    def _merge(self, cell: Cell, partials: list[Partial]) -> dict:
        """The shards' partials of a cell, in shard order, as one pass: the rows-per-item check,
        per target the metrics of each query set (keyed as given), the models read."""
        from distcl.gallery.search import merge_topk

        store, models, _, expected = self._source(cell)
        count = np.zeros(len(self.cat), np.int64)
        for p in partials:
            count += np.bincount(p.read, minlength=len(count))
        if (count != expected).any():
            bad = int(np.flatnonzero(count != expected)[0])
            raise ValueError(f"{store.root}/model={models}: item {self.cat.ids[bad].as_py()!r} "
                             f"has {count[bad]} rows, expected {expected[bad]}")  # fmt: skip
        out: dict[str, Any] = {"models": sorted({m for p in partials for m in p.models})}
        for t in self._targets(cell):
            if t.exact:
                (only,) = partials  # exact targets are never sharded (``shards``)
                out[t.name] = only.metrics[t.name]
                continue
            codes, lists, recall, exact = zip(*(p.lists[t.name] for p in partials), strict=True)
            if len(lists) == 1:
                results, recall = lists[0], recall[0]
            else:  # rows are local to each shard: merged in read order
                sizes = [len(c) for c in codes]
                nq = range(len(lists[0]))
                results = [merge_topk([ls[q] for ls in lists], sizes) for q in nq]
                recall = [None] * len(t.queries)
                if exact[0] is not None:  # ANN: merged lists against merged exact lists
                    recall = [self._merged_recall(results[q][1], [e[q] for e in exact], sizes)
                              for q in nq]  # fmt: skip
            out[t.name] = self._topk_metrics(t, results, recall, np.concatenate(codes))
        return out

    def finish(self, cell: Cell, partials: list[Partial]) -> dict:
        """A cell's results from its shards' partials: ``puts``, the entries of the rows as
        ``(row, protocol, j, metrics, map kind)``, and ``stale``, the stale-gallery entry of
        row s (or None). Small: a few floats per entry."""
        t0 = time.perf_counter()
        s = self.s
        if cell.kind == "openset":
            return self._finish_openset(cell, partials)
        if cell.kind == "stale":
            res = self._merge(cell, partials)
            (target,) = self._targets(cell)
            entry = {"task": cell.model, "gallery": int(target.member.sum()),
                     "queries": len(target.queries[0][2]), "models_in_gallery": res["models"],
                     "seconds": sum(p.seconds for p in partials) + time.perf_counter() - t0,
                     "map_kind": self.map_kind("stale"), **res["stale"]["stale"]}  # fmt: skip
            return {"puts": [], "stale": entry}
        j, puts = cell.model, []
        if partials:
            res = self._merge(cell, partials)
            for name in self._target_names(cell):
                for (proto, i), m in res[name].items():
                    if proto == "open" and self._ident_items:
                        ident = {f"ident_cmc@{k}": m[f"cmc@{k}"] for k in s.topk}
                        puts.append((i, "identification", j, ident, None))
                    if proto != "open" or "open" in s.protocols:
                        puts.append((i, proto, j, m, self.map_kind(name)))
                    if proto == "all" and i == j and self.transformed:  # h^0: the identity
                        puts.append((i, "transformed", j, m, self.map_kind(name)))
        if cell.kind == "transformed":
            return {"puts": puts, "stale": None}
        if self._templates(cell):
            sums = partials[0].sums.copy()
            for p in partials[1:]:
                sums += p.sums
            puts += self._identify(cell.queries, j, sums)
        if "verification" in s.protocols:
            puts += [(i, "verification", j, self._verify(i, j), None) for i in cell.queries]
        return {"puts": puts, "stale": None}

    def _merged_recall(self, ann_rows: np.ndarray, exact: list, sizes: list[int]) -> float | None:
        """k-recall@k of merged ANN lists ``ann_rows`` (Q, k) against the shards' exact lists
        of the same sampled queries (``exact``: per shard (sample positions, (scores, rows)))
        merged the same way."""
        from distcl.gallery.index import recall_at_k_vs_exact
        from distcl.gallery.search import merge_topk

        sample = exact[0][0]
        if len(sample) == 0:
            return None
        _, rows = merge_topk([e[1] for e in exact], sizes)
        k = min(self.k_lists, ann_rows.shape[1], rows.shape[1], sum(sizes))
        return recall_at_k_vs_exact(ann_rows[sample], rows, k)


def _put(row: dict, proto: str, j: int, m: dict, kind: str | None) -> None:
    block = row["protocols"].setdefault(proto, {"values": {}, "map_kind": kind})
    for name, v in m.items():
        block["values"].setdefault(name, []).append(v)
    assert all(len(v) == j + 1 for v in block["values"].values()), (proto, j)


def apply_cell(rows: dict[int, dict], result: dict) -> None:
    """Enter a cell's results (``Engine.finish``) into the rows; cells in ``cells`` order."""
    for i, proto, j, m, kind in result["puts"]:
        _put(rows[i], proto, j, m, kind)
    if result["stale"] is not None:
        rows[result["stale"]["task"]]["stale"] = result["stale"]
