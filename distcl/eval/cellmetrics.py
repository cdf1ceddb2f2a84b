"""The metrics of one cell of a matrix from what a scan found: CMC / Recall@K / mAP from
top-k lists or from full rankings, class-template identification and verification pairs.
Mixed into :class:`distcl.eval.engine.Engine` (the formulas: ``distcl.eval.metrics``,
docs/metrics.md).
"""

from __future__ import annotations

import numpy as np

from distcl.eval import metrics as mt
from distcl.eval import protocols as pr
from distcl.eval.scan import Target
from distcl.eval.selection import MAP_AT_K, EvalSettings


def _retrieval(
    hits: np.ndarray, ap: float, n: int, ks: tuple[int, ...], s: EvalSettings, map_key: str
) -> dict[str, float]:
    if n == 0:  # no query has a positive in this gallery (a small early one): not measurable
        nan = float("nan")
        out = {f"cmc@{k}": nan for k in s.topk} | {f"recall@{k}": nan for k in s.recall_ks}
        return out | {s.metric: nan, map_key: nan}
    frac = {k: float(h) / n for k, h in zip(ks, hits, strict=True)}
    out = {f"cmc@{k}": frac[k] for k in s.topk} | {f"recall@{k}": frac[k] for k in s.recall_ks}
    if s.metric.startswith(("cmc@", "recall@")):
        out[s.metric] = frac[int(s.metric.split("@")[1])]
    out[map_key] = ap / n
    return out


class CellMetricsMixin:
    """Metrics of a cell (:class:`~distcl.eval.engine.Engine`)."""

    def _topk_metrics(self, t: Target, results: list, recall: list, g_codes: np.ndarray) -> dict:
        """Metrics of each query set from its top-k lists over the gallery rows ``g_codes``
        (G,) (canonical positions in read order; list rows index them)."""
        g_lab = self.cat.labels[g_codes]
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
            out[self.map_name] = ap_k / n_k if n_k else float("nan")
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
                out[key][self.map_name] = ap_k / n if n else float("nan")
        return out

    def _identify(self, queries: tuple[int, ...], j: int, sums: np.ndarray) -> list[tuple]:
        """Probes by each model i against the class templates of gallery model j."""
        classes = np.unique(self.cat.labels)
        present = np.unique(self.cat.labels[self.plan.split.gallery])
        keep = np.isin(classes, present)
        templates = mt.templates_from_sums(sums[keep])  # (C, d)
        probes = np.flatnonzero(self.plan.split.probes)
        puts = []
        for i in queries:
            q = self.spaces.queries(self._query_data(i)["probes"], i, j)  # model j's space
            t = self.spaces.rows(templates, i, j)
            hits, n = mt.template_cmc_counts(q, self.cat.labels[probes], t,
                                             classes[keep], self.s.topk)  # fmt: skip
            m = {f"ident_cmc@{k}": float(h) / n for k, h in zip(self.s.topk, hits, strict=True)}
            puts.append((i, "identification", j, m, None))
        return puts

    def _verify(self, i: int, j: int) -> dict[str, float]:
        a, b, same = self.plan.pairs
        pos = np.searchsorted(self.plan.verif_items, np.stack([a, b]))  # (2, P)
        ea = self.spaces.queries(self._query_data(i)["verif"][pos[0]], i, j)  # side a by model i
        eb = self.spaces.rows(self._query_data(j)["verif"][pos[1]], i, j)  # side b by model j
        scores = np.einsum("pd,pd->p", ea.astype(np.float64), eb.astype(np.float64))
        m = {"verif_acc": mt.verification_accuracy(scores, same, self.s.folds)}
        tar = mt.tar_at_far(scores, same, self.s.fars)
        m.update({pr.far_name(f): v for f, v in tar.items()})
        return m
