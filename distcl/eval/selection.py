"""Settings and selections of the evaluation engine: what is computed (``EvalSettings``), the
evaluation set in canonical order (``Catalogue``: sorted by id, every selection refers to its
positions) and the item selections of a run (``Plan``: closed-set subset, open-set probes and
gallery, verification pairs), plus the engine's memory hygiene (``release_memory``).
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcl.catalog import needs_of
from distcl.eval import protocols as pr
from distcl.gallery.store import Store, iter_batches

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
    preset: str = "none"  # eval.preset: "iamcl2r" reads the identification AM as its code
    dim_change: str = "pad"  # model.dim_change: how rows of different sizes meet
    transformed: bool = False  # method fct: the "transformed" matrix (old rows through h)
    nonmated_classes: int | None = None  # openset (eval.nonmated_classes)
    fpirs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # openset: TPIR at these FPIRs
    distractors: str | None = None  # openset: a Parquet store of distractor rows per model

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
            use_gpu, nprobe=e.nprobe, preset=e.preset, dim_change=job.model.dim_change,
            transformed=needs_of(job).transform, nonmated_classes=e.nonmated_classes,
            fpirs=tuple(e.fpirs), distractors=e.distractors,
        )  # fmt: skip

    def key(self) -> dict:
        """The settings that change results (row-cache key; the GPU does not)."""
        out = asdict(self)
        for name in ("use_gpu", "block_rows", "shard_rows", "preset"):  # rows stay the same
            out.pop(name)
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
    openset: pr.OpenSet | None = None  # 1:N identification's probes and gallery

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
        openset = None
        if "openset" in s.protocols:
            if not heldout:
                raise ValueError("eval.protocols: 'openset' needs scenario.heldout_classes > 0")
            openset = pr.openset_split(cat.labels, pool, s.probes_per_class, s.nonmated_classes,
                                       s.distractor_classes, s.seed)  # fmt: skip
        return cls(closed, split, pairs, verif, heldout, openset)
