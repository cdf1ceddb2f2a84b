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

import ctypes
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
from distcl.gallery.store import Store, batch_embeddings, iter_batches, open_store, sub_store
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
    use_gpu: bool | str = "auto"  # "auto", True or False; resolved where the search runs
    block_rows: int | None = None  # streamed gallery block size; None: from the budget
    shard_rows: int | None = None  # rows per gallery shard (a Ray task each); None: a budget
    nprobe: int = 16  # IVF (-PQ) lists probed per query

    @classmethod
    def from_job(cls, job: Any, use_gpu: bool | str | None = None) -> EvalSettings:
        """``use_gpu`` overrides ``eval.use_gpu`` (yes: True, no: False, auto: "auto")."""
        e = job.eval
        if use_gpu is None:
            use_gpu = {"yes": True, "no": False}.get(e.use_gpu, "auto")
        return cls(
            tuple(e.protocols), e.metric, tuple(e.topk), tuple(e.recall_ks), e.items_per_class,
            job.seed, e.ties, e.probes_per_class, e.distractor_classes, e.verification_pairs,
            e.folds, tuple(e.fars), e.identification, e.index, e.exact_map, e.memory_budget_mb,
            use_gpu, nprobe=e.nprobe,
        )  # fmt: skip

    def key(self) -> dict:
        """The settings that change results (row-cache key; the GPU does not)."""
        out = asdict(self)
        out.pop("use_gpu")
        out.pop("block_rows")
        out.pop("shard_rows")
        if self.index == "flat":  # exact search probes nothing: flat rows keep their cache
            out.pop("nprobe")
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

    @property
    def keys(self) -> np.ndarray:
        """The sorted ids as bytes (N,) (built on first use)."""
        if self._keys is None:
            self._keys = _bytes(self.ids)
        return self._keys

    def codes(self, ids: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
        """Canonical positions (B,) int64 of ``ids``; ValueError for an id not in the set.

        A binary search in the sorted ids as bytes (UTF-8 keeps Arrow's sort order): no hash
        table of the whole set is rebuilt per batch.
        """
        keys = _bytes(ids)  # (B,) S
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        bad = np.flatnonzero(self.keys[pos] != keys)
        if len(bad):
            name = keys[bad[0]].decode()
            raise ValueError(f"{where}: item {name!r} is not in the evaluation set of model 0")
        return pos.astype(np.int64)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _lean_malloc() -> None:
    """glibc only: blocks of 1 MiB and more always come from (and go back to) the OS. By
    default glibc raises that threshold to the size of each large block freed (up to 32 MiB),
    after which freed batches and buffers stay in the process: measured on a 1M-row gallery
    at a 256 MB budget, the scan's peak RSS went from 722 to 656 MB and the RSS between
    passes from 533 to 294 MB."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def release_memory() -> None:
    """Give freed memory back to the OS: Arrow's pool (compute kernels allocate there) and
    glibc's heap."""
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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


@dataclass(frozen=True)
class Cell:
    """A unit of row work, small and picklable (what a Ray task is given): one read of
    gallery model ``model`` for the query models ``queries`` (``kind="gallery"``), or the
    stale gallery after task ``model`` (``kind="stale"``)."""

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


def _resolve_gpu(use_gpu: bool | str) -> bool:
    """``eval.use_gpu`` in this process: "auto" is whether faiss sees a GPU here."""
    from distcl.gallery import index

    if use_gpu is True and not index.gpu_available():  # name the job's field
        raise ValueError("eval.use_gpu is yes, but faiss sees no GPU in this process "
                         "(install faiss-gpu, or set eval.use_gpu: auto or no)")  # fmt: skip
    return index._resolve_gpu(use_gpu)


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
        _lean_malloc()
        self.run_dir = storage.location(run_dir)  # a local path or an object-store URI
        self.s = settings
        self.on_gpu = _resolve_gpu(settings.use_gpu)  # here, where this engine searches
        self.scenario = scenario
        self.eval_store = open_store(self.run_dir / "eval" / "embeddings")
        if self.eval_store.dim is None:
            raise ValueError(f"{self.eval_store.root}: no embedded evaluation set")
        self.dim = self.eval_store.dim
        self.cat = Catalogue.read(self.eval_store, 0)
        self.cat.keys  # noqa: B018  (the sorted keys, built once, here)
        release_memory()  # the read's and the sort's transients (~150 MB per 1M items)
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

    def release(self) -> None:
        """Drop the cached query sets (an engine kept by a Ray worker keeps the catalogue)."""
        self._cache.clear()

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
    def _source(self, cell: Cell) -> tuple[Store, list[int], ds.Expression | None, np.ndarray]:
        """A cell's pass: the store, its models, the row filter and the rows expected per item
        (canonical positions, (N,)): each item once per model, or, for the stale gallery after
        task s, once if it arrived at a task <= s (rows with task == model)."""
        if cell.kind == "stale":
            store = open_store(self.run_dir / "gallery")
            arrived = (self.cat.tasks >= 0) & (self.cat.tasks <= cell.model)
            filt = ds.field("task") == ds.field("model")
            return store, list(range(cell.model + 1)), filt, arrived.astype(np.int64)
        return self.eval_store, [cell.model], None, np.ones(len(self.cat), np.int64)

    @property
    def _ident_items(self) -> bool:
        return "identification" in self.s.protocols and self.s.identification == "items"

    def _target_names(self, cell: Cell) -> list[str]:
        if cell.kind == "stale":
            return ["stale"]
        names = ["closed"] if "closed" in self.s.protocols else []
        return names + (["open"] if "open" in self.s.protocols or self._ident_items else [])

    def _templates(self, cell: Cell) -> bool:
        """Whether the cell's pass sums the class templates (identification by templates)."""
        ident = "identification" in self.s.protocols
        return cell.kind == "gallery" and ident and not self._ident_items

    def _targets(self, cell: Cell) -> list[Target]:
        """The galleries searched in a cell's pass, with their query sets."""
        plan = self.plan
        closed_codes = np.flatnonzero(plan.closed)
        names = self._target_names(cell)
        if cell.kind == "stale":
            arrived = self._source(cell)[3].astype(bool)
            present = arrived[closed_codes]  # queries: the subset's items in the gallery
            t = Target("stale", arrived, self.exact["stale"])
            t.queries.append(("stale", self._query_data(cell.model)["closed"][present],
                              closed_codes[present], None, True))  # fmt: skip
            return [t]
        targets = []
        if "closed" in names:
            seen = np.asarray(self.scenario.tasks[cell.model].seen_classes)  # model j's classes
            seen_rows = np.isin(self.cat.labels[closed_codes], seen)
            tc = Target("closed", plan.closed, self.exact["closed"])
            for i in cell.queries:
                q = self._query_data(i)["closed"]
                tc.queries.append((("all", i), q, closed_codes, None, True))
                tc.queries.append((("seen", i), q[seen_rows], closed_codes[seen_rows], seen, True))
            targets.append(tc)
        if "open" in names:
            probes = np.flatnonzero(plan.split.probes)
            to = Target("open", plan.split.gallery, self.exact["open"])
            for i in cell.queries:
                to.queries.append((("open", i), self._query_data(i)["probes"], probes, None, False))
            targets.append(to)
        return targets

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
        names = self._target_names(cell)
        if not names and not self._templates(cell):
            return []
        store, models, _, _ = self._source(cell)
        whole = any(self.exact[n] for n in names)
        groups: list[list[str]] = []
        size = 0
        for path, info in store.parts:
            if info.model not in models:
                continue
            if groups and (whole or size + info.rows <= self.shard_rows):
                groups[-1].append(path)
                size += info.rows
            else:
                groups.append([path])
                size = info.rows
        return [tuple(g) for g in groups] or [()]

    def scan(self, cell: Cell, paths: tuple[str, ...]) -> Partial:
        """Read one gallery shard of a cell once, feeding every target: per streamed target its
        top-k lists (rows local to the shard), per exact target its metrics, the template
        sums and the ids read. Memory: the query sets, the buffers (half the budget)."""
        from distcl.gallery.search import QuerySet, StreamSearch

        t0 = time.perf_counter()
        full, models, filt, _ = self._source(cell)
        store = sub_store(full, paths)
        where = f"{full.root}/model={models}"
        targets = self._targets(cell)
        sums = templ_member = None
        if self._templates(cell):
            classes = np.unique(self.cat.labels)
            self._class_index = np.searchsorted(classes, self.cat.labels)  # (N,)
            sums = np.zeros((len(classes), self.dim), np.float64)  # (C, d)
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
                    sample, n_here = self._train_sample(store, models, filt, t)
                search = StreamSearch(qsets, self.dim, kind=self.s.index,
                                      nlist=self._nlist(n_here), nprobe=self.s.nprobe,
                                      use_gpu=self.on_gpu, seed=self.s.seed)  # fmt: skip
                if sample is not None and len(sample):  # else no row of t: nothing to add
                    search.train(sample, n_here)
            buf = np.empty((max(cap, 1), self.dim), np.float32)  # (cap, d)
            state[t.name] = {"buf": buf, "codes": [], "fill": 0, "search": search, "done": []}
        read: list[np.ndarray] = []
        model_set: set[int] = set()
        for rb in iter_batches(store, models, columns=("item_id", "label", "task", "model",
                               "embedding"), filter=filt, batch_rows=self._batch_rows):  # fmt: skip
            codes = self.cat.codes(rb["item_id"], where)
            read.append(codes)
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
        if self._templates(cell):
            sums = partials[0].sums.copy()
            for p in partials[1:]:
                sums += p.sums
            puts += self._identify(cell.queries, j, sums)
        if "verification" in s.protocols:
            puts += [(i, "verification", j, self._verify(i, j), None) for i in cell.queries]
        return {"puts": puts, "stale": None}

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

    def _train_sample(self, store: Store, models: list[int], filt,
                      t: Target) -> tuple[np.ndarray, int]:  # fmt: skip
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
        for rb in iter_batches(store, models, columns=("item_id", "embedding"), filter=filt,
                               batch_rows=self._batch_rows):  # fmt: skip
            codes = self.cat.codes(rb["item_id"], str(store.root))
            sel = np.flatnonzero(t.member[codes])
            if not len(sel):
                continue
            n_rows += len(sel)
            kept_codes.append(codes[sel])
            kept_emb.append(batch_embeddings(rb)[sel])
            n_kept += len(sel)
            if n_kept > bound + max(bound // 4, 1):  # keep the ``bound`` smallest keys
                c, e = np.concatenate(kept_codes), np.concatenate(kept_emb)
                best = np.argpartition(keys[c], bound)[:bound]
                kept_codes, kept_emb, n_kept = [c[best]], [e[best]], bound
        if not n_rows:
            return np.zeros((0, self.dim), np.float32), 0
        c, e = np.concatenate(kept_codes), np.concatenate(kept_emb)
        best = np.argsort(keys[c], kind="stable")[: self._sample_size(n_rows)]
        return e[best[np.argsort(c[best], kind="stable")]], n_rows  # in catalogue order

    def _sample_size(self, n: int) -> int:
        """IVF (-PQ) training rows for a gallery of ``n`` rows (see ``_train_sample``)."""
        return min(n, max(256 * 40, 50 * self._nlist(n)))

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
        rows = {
            t: {"task": t, "items": items, "protocols": {}, "stale": None} for t in sorted(tasks)
        }
        by_gallery: dict[int, list[int]] = {}
        for t in rows:
            for j in range(t + 1):
                by_gallery.setdefault(j, []).append(t)
        per_model = sum(a.nbytes for a in self._query_data(min(rows)).values())
        group = max(1, (self.s.budget // 2) // max(per_model, 1))
        cells = [Cell("gallery", j, tuple(queries[g : g + group]))
                 for j, queries in sorted(by_gallery.items())
                 for g in range(0, len(queries), group)]  # fmt: skip
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
            if cell.kind == "gallery":
                spent[cell.model] = spent.get(cell.model, 0.0) + time.perf_counter() - t0
                last = n + 1 == len(cells) or cells[n + 1].model != cell.model
                if log and (last or cells[n + 1].kind != "gallery"):
                    done = [t for t in rows if t >= cell.model]
                    log(f"gallery model {cell.model}: rows {done} in {spent[cell.model]:.1f}s")
        return rows

    def _identify(self, queries: tuple[int, ...], j: int, sums: np.ndarray) -> list[tuple]:
        """Probes by each model i against the class templates of gallery model j."""
        classes = np.unique(self.cat.labels)
        present = np.unique(self.cat.labels[self.plan.split.gallery])
        keep = np.isin(classes, present)
        templates = mt.templates_from_sums(sums[keep])  # (C, d)
        probes = np.flatnonzero(self.plan.split.probes)
        puts = []
        for i in queries:
            q = self._query_data(i)["probes"]
            hits, n = mt.template_cmc_counts(q, self.cat.labels[probes], templates,
                                             classes[keep], self.s.topk)  # fmt: skip
            m = {f"ident_cmc@{k}": float(h) / n for k, h in zip(self.s.topk, hits, strict=True)}
            puts.append((i, "identification", j, m, None))
        return puts

    def _verify(self, i: int, j: int) -> dict[str, float]:
        a, b, same = self.plan.pairs
        pos = np.searchsorted(self.plan.verif_items, np.stack([a, b]))  # (2, P)
        ea = self._query_data(i)["verif"][pos[0]]  # side a by model i
        eb = self._query_data(j)["verif"][pos[1]]  # side b by model j
        scores = np.einsum("pd,pd->p", ea.astype(np.float64), eb.astype(np.float64))
        m = {"verif_acc": mt.verification_accuracy(scores, same, self.s.folds)}
        tar = mt.tar_at_far(scores, same, self.s.fars)
        m.update({pr.far_name(f): v for f, v in tar.items()})
        return m


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
