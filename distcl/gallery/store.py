"""Parquet embedding store: one row per (item, model version), docs/design.md.

What it is for: the end of each task writes the evaluation set and the gallery arrivals,
embedded by that task's model, as Parquet parts (one per train rank); the evaluation engine
(``distcl.eval.engine``) streams them back by row groups, never holding the whole store.

Layout (Hive partitioning, one folder per model version)::

    root/model=<model>/<part>.parquet      # e.g. root/model=3/part-0.parquet (rank 0)

Columns: ``item_id`` string, ``label`` int64, ``task`` int32 (arrival task; -1 for items
of held-out classes), ``model`` int32, ``embedding`` fixed_size_list<float32>[d]. Schema
metadata: ``distcl.format_version``, ``distcl.model``, ``distcl.dim``, ``distcl.metric``
("ip"), ``distcl.normalized``. Writes are atomic (temp name starting with ".", fsync,
``os.replace``): readers never see half a part, re-writing a part replaces it. Reading goes
through ``pyarrow.dataset`` with Hive partitioning, as any other reader would::

    pyarrow.dataset.dataset(root, format="parquet", partitioning="hive")

Test: ``.venv/bin/python -m pytest tests/test_gallery_store.py -q``
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from distcl import storage
from distcl.gallery.write import (
    COLUMNS,
    HIVE,
    PartInfo,
    first_dup,
    gallery_schema,
    scan_parts,
    store_filesystem,
    write_embeddings,
)
from distcl.storage import Loc, Uri

__all__ = [
    "GalleryArrays", "EmbeddingBatch", "PartInfo", "Store", "gallery_schema", "write_embeddings",
    "open_store", "sub_store", "iter_batches", "batch_embeddings", "read_embeddings",
    "stale_gallery", "iter_embedding_batches", "list_parts",
]  # fmt: skip

_SCAN = ds.ParquetFragmentScanOptions(pre_buffer=False)
Models = int | Iterable[int] | None


@dataclass(frozen=True)
class GalleryArrays:
    """Rows read into memory: ``item_ids`` (N,) object str, ``labels`` (N,) int64, ``tasks``
    (N,) int32, ``models`` (N,) int32, ``embeddings`` (N, d) float32 ((0, 0) if no part)."""

    item_ids: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    models: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


class EmbeddingBatch(NamedTuple):
    """A streamed batch: ``item_ids`` (B,) object, ``labels`` (B,), ``embeddings`` (B, d)."""

    item_ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray


@dataclass(frozen=True)
class Store:
    """An opened store: validated parts (sorted by model, then part) and their datasets, one
    per embedding size (``model.upgrades`` may change it between models; every part of one
    model has one size)."""

    root: Loc  # a local Path or an object-store Uri
    parts: tuple[tuple[str, PartInfo], ...]
    datasets: tuple[ds.Dataset, ...]  # one per size, in the order of their first model

    @property
    def dims(self) -> dict[int, int]:
        """model -> its embedding size."""
        return {info.model: info.dim for _, info in self.parts}

    @property
    def dim(self) -> int | None:
        """The store's one embedding size (None: empty, or several sizes: ``dims``)."""
        sizes = set(self.dims.values())
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def dataset(self) -> ds.Dataset | None:
        """The dataset of a store of one size (None when empty)."""
        if len(self.datasets) > 1:
            raise ValueError(f"{self.root}: embeddings of sizes {sorted(set(self.dims.values()))}"
                             " (model.upgrades): read them by model")  # fmt: skip
        return self.datasets[0] if self.datasets else None


def open_store(root: str | os.PathLike | Uri) -> Store:
    """Validate every part's footer and open the datasets. FileNotFoundError for a missing
    ``root``; ValueError naming the file(s) for a corrupt part, or for parts of one model
    with different embedding sizes. ``root`` may be an object-store URI (read through
    ``distcl.storage``'s filesystem)."""
    root = storage.location(root)
    if not storage.is_dir(root):
        raise FileNotFoundError(f"gallery store {root} does not exist")
    parts = scan_parts(root)
    if not parts:
        return Store(root, (), ())
    first_of: dict[int, tuple[str, PartInfo]] = {}
    for path, info in parts:
        seen = first_of.setdefault(info.model, (path, info))
        if info.dim != seen[1].dim:
            raise ValueError(
                f"mixed-dimension gallery: {path} has dim {info.dim} but {seen[0]} of the "
                f"same model {info.model} has dim {seen[1].dim}"
            )
    fs, base, _ = store_filesystem(root)
    sizes = list(dict.fromkeys(info.dim for _, info in parts))
    datasets = tuple(
        ds.dataset(
            _fs_paths(fs, [p for p in parts if p[1].dim == d]),
            schema=gallery_schema(d, 0),
            format="parquet",
            partitioning=HIVE,
            partition_base_dir=base,
            filesystem=fs,
        )
        for d in sizes
    )
    return Store(root, tuple(parts), datasets)


def _fs_paths(fs, parts) -> list[str]:
    """The parts' names as their file system names them (an object store: ``bucket/key``)."""
    return [p if fs is None else storage.location(p).path for p, _ in parts]


#: Parts of rows transformed by h (``distcl backfill --apply --transform``), not embedded.
TRANSFORMED_PREFIX = "transform-"


def is_transformed_part(path: str | os.PathLike) -> bool:
    """Whether a gallery part holds rows transformed into its model's space (method fct)."""
    return str(path).replace("\\", "/").rsplit("/", 1)[-1].startswith(TRANSFORMED_PREFIX)


def sub_store(store: Store, paths: Iterable[str]) -> Store:
    """The parts ``paths`` of an opened store (a gallery shard), in the store's order, on the
    store's file system; ValueError naming a path that is not a part of it (any more)."""
    want = set(paths)
    parts = tuple(p for p in store.parts if p[0] in want)
    if missing := sorted(want - {p for p, _ in parts}):
        raise ValueError(f"{missing[0]} is not a part of the gallery store {store.root}")
    if not parts or not store.datasets:
        return Store(store.root, (), ())
    # The datasets name their files as their file system does: a local path, or "bucket/key"
    # (no scheme) on an object store; the parts keep their full URIs.
    fs, _, _ = store_filesystem(store.root)
    names = set(_fs_paths(fs, parts))
    shards = []
    found = 0
    for data in store.datasets:
        frags = [f for f in data.get_fragments() if f.path in names]
        found += len(frags)
        if frags:
            shards.append(ds.FileSystemDataset(frags, data.schema, data.format, data.filesystem))
    if found != len(parts):  # a silent empty shard would read as "no rows"
        raise ValueError(f"{len(parts)} parts of {store.root} matched {found} files")
    return Store(store.root, parts, tuple(shards))


def _model_filter(models: Models) -> ds.Expression | None:
    if models is None:
        return None
    vals = [models] if isinstance(models, (int, np.integer)) else list(models)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
        raise ValueError(f"models must be ints, got {models!r}")
    return ds.field("model").isin([int(v) for v in vals])


def iter_batches(
    store: Store | str | os.PathLike,
    models: Models = None,
    *,
    columns: Sequence[str] = ("item_id", "label", "task", "embedding"),
    filter: ds.Expression | None = None,
    batch_rows: int = 65536,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches (<= ``batch_rows`` rows, never spanning row groups) in (model,
    part, row) order; ``models`` prunes folders, ``filter`` is pushed into the Parquet scan
    (row groups whose statistics exclude it are not read)."""
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
    st = store if isinstance(store, Store) else open_store(store)
    by_model = _model_filter(models)
    if by_model is not None:
        filter = by_model if filter is None else by_model & filter
    if not st.datasets:
        return
    # Bounded memory: one row group at a time, decoded in this thread, no pre-buffering, and
    # malloc (returns freed batches to the OS; mimalloc keeps them). Arrow's threaded dataset
    # scan reads ahead while the consumer searches, whatever its readahead settings: with
    # a consumer as slow as a search it held a whole model's gallery (513 MB of 488 MB,
    # measured); read like this it holds one row group (<= ROW_GROUP_BYTES of embeddings).
    pool = pa.system_memory_pool()
    try:
        fragments = [(f, data.schema) for data in st.datasets
                     for f in data.get_fragments(filter=filter)]  # fmt: skip
        for fragment, schema in fragments:
            for group in fragment.split_by_row_group(filter):  # statistics prune groups
                for rb in group.to_batches(
                    schema=schema, columns=list(columns), filter=filter,
                    batch_size=batch_rows, use_threads=False, fragment_scan_options=_SCAN,
                    memory_pool=pool,
                ):  # fmt: skip
                    if rb.num_rows:
                        yield rb
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt or unreadable gallery part under {st.root}: {e}") from e


def batch_embeddings(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The ``embedding`` column of a batch as a (B, d) float32 array."""
    col = batch.column("embedding")
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slice offsets
    return np.ascontiguousarray(flat.reshape(len(arr), arr.type.list_size), dtype=np.float32)


def _read(root: str | os.PathLike, models: Models, filt: ds.Expression | None) -> GalleryArrays:
    st = open_store(root)
    wanted = None if models is None else set(
        [int(models)] if isinstance(models, (int, np.integer)) else map(int, models))  # fmt: skip
    sizes = {d for m, d in st.dims.items() if wanted is None or m in wanted}
    if len(sizes) > 1:
        raise ValueError(f"{st.root}: the models asked embed in sizes {sorted(sizes)} "
                         "(model.upgrades): read them one size at a time")  # fmt: skip
    dim = sizes.pop() if sizes else 0
    table = pa.Table.from_batches(
        list(iter_batches(st, models, columns=COLUMNS, filter=filt)),
        schema=gallery_schema(dim, 0),
    )
    for m in pc.unique(table.column("model")).to_pylist():  # an item once per model
        if (dup := first_dup(table.filter(pc.equal(table["model"], m))["item_id"])) is not None:
            where = (ds.field("model") == m) & (ds.field("item_id") == dup)
            data = next(d for d in st.datasets if d.schema.field("embedding").type.list_size
                        == st.dims[m])  # fmt: skip
            files = data.to_table(columns=["__filename"], filter=where)[0].to_pylist()
            raise ValueError(
                f"duplicate item_id {dup!r} in {st.root}/model={m} (files: "
                f"{', '.join(files)}); remove stale parts before re-embedding"
            )
    return GalleryArrays(
        item_ids=table["item_id"].to_numpy(),  # (N,) object of str
        labels=table["label"].to_numpy(),
        tasks=table["task"].to_numpy(),
        models=table["model"].to_numpy(),
        embeddings=batch_embeddings(table) if len(table) else np.empty((0, st.dim or 0), "f4"),
    )


def read_embeddings(root: str | os.PathLike, models: Models = None, tasks: Models = None):
    """Read rows into memory (small stores and tests; the engine streams), optionally only
    some models (folders pruned) and arrival tasks (pushed into the scan). Rows come in
    (model, part, row) order; ValueError for an item id repeated within one model."""
    tasks = [tasks] if isinstance(tasks, (int, np.integer)) else tasks
    return _read(root, models, None if tasks is None else ds.field("task").isin(list(tasks)))


def stale_gallery(root: str | os.PathLike, upto_task: int) -> GalleryArrays:
    """The deployment gallery after task ``upto_task``: every item that arrived at a task <=
    ``upto_task``, embedded by the model of its arrival task (rows with model == task)."""
    if isinstance(upto_task, bool) or not isinstance(upto_task, (int, np.integer)):
        raise ValueError(f"upto_task must be an int, got {upto_task!r}")
    filt = (ds.field("task") == ds.field("model")) & (ds.field("model") <= int(upto_task))
    return _read(root, None, filt)


def iter_embedding_batches(
    root: str | os.PathLike, batch_rows: int = 65536, models: Models = None
) -> Iterator[EmbeddingBatch]:
    """Stream ``EmbeddingBatch(item_ids, labels, embeddings)`` in ``read_embeddings`` order."""
    cols = ("item_id", "label", "embedding")
    for rb in iter_batches(root, models, columns=cols, batch_rows=batch_rows):
        ids = rb.column("item_id").to_numpy(zero_copy_only=False)
        yield EmbeddingBatch(ids, rb.column("label").to_numpy(), batch_embeddings(rb))


def list_parts(root: str | os.PathLike) -> list[PartInfo]:
    """``PartInfo(model, part, rows, dim)`` of every part, sorted by (model, part)."""
    return [info for _, info in open_store(root).parts]
