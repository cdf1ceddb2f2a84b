"""Parquet gallery embedding store: one row per (item, model version), see design.md section 3.

Layout (Hive-style, one folder per model version, so readers prune by folder)::

    root/model=<model>/<part>.parquet      # e.g. root/model=3/rank0.parquet

Columns: ``item_id`` string, ``label`` int64, ``task`` int32 (arrival task), ``model`` int32
(the task whose model embedded the row), ``embedding`` fixed_size_list<float32>[d].
File-level (schema) metadata, all values UTF-8 strings: ``distcl.format_version`` ("1"),
``distcl.model``, ``distcl.dim``, ``distcl.metric`` ("ip") and ``distcl.normalized``
("true"/"false"). Files are written atomically (temp file in the same folder, fsync,
``os.replace``), so a crash never leaves a half-written part, and re-writing a (model, part)
replaces it instead of appending duplicate rows. Temp files start with "." so pyarrow,
DuckDB and Polars globbing ``root/**/*.parquet`` ignore them.

The same folder reads directly elsewhere, e.g.
``pyarrow.dataset.dataset(root, format="parquet", partitioning="hive")``.

Test: ``.venv/bin/python -m pytest tests/test_gallery_store.py -q``
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

FORMAT_VERSION = "1"
METRIC = "ip"
# Aim for ~32 MiB of embedding payload per row group: big enough for fast scans, small enough
# that a streaming reader holds a bounded amount of memory.
ROW_GROUP_BYTES = 32 * 1024 * 1024
_NORM_ATOL = 5e-3  # loose enough for embeddings normalised in fp16 / bf16 before the cast
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MODEL_DIR_RE = re.compile(r"^model=(\d+)$")

__all__ = [
    "GalleryArrays",
    "EmbeddingBatch",
    "PartInfo",
    "gallery_schema",
    "write_embeddings",
    "read_embeddings",
    "iter_embedding_batches",
    "stale_gallery",
    "list_parts",
]


@dataclass(frozen=True)
class GalleryArrays:
    """Columns of a gallery read into memory; row i of every array describes one row.

    Fields: ``item_ids`` (N,) object array of str, ``labels`` (N,) int64, ``tasks`` (N,) int32
    (arrival task), ``models`` (N,) int32 (embedding model), ``embeddings`` (N, d) float32
    C-contiguous. An empty result has ``embeddings`` of shape (0, d) when the store knows d
    (it holds at least one part) and (0, 0) otherwise.
    """

    item_ids: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    models: np.ndarray
    embeddings: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("labels", "tasks", "models"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"GalleryArrays.{name} must have shape ({n},)")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise ValueError(f"GalleryArrays.embeddings must have shape ({n}, d)")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        """Embedding dimension d (0 for an empty store)."""
        return int(self.embeddings.shape[1])


class EmbeddingBatch(NamedTuple):
    """One streamed batch: ``item_ids`` (B,) object, ``labels`` (B,) int64, ``embeddings``
    (B, d) float32."""

    item_ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray


class PartInfo(NamedTuple):
    """One Parquet part of the store, from its footer only."""

    model: int
    part: str
    rows: int
    dim: int


def gallery_schema(dim: int, model: int, *, normalized: bool = True) -> pa.Schema:
    """The Arrow schema (with file-level metadata) of a part embedded by ``model``."""
    metadata = {
        "distcl.format_version": FORMAT_VERSION,
        "distcl.model": str(model),
        "distcl.dim": str(dim),
        "distcl.metric": METRIC,
        "distcl.normalized": "true" if normalized else "false",
    }
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("task", pa.int32(), nullable=False),
            pa.field("model", pa.int32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _as_int_array(values: object, name: str, dtype: type, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} must be 1-D with {n} entries (one per embedding), got {arr.shape}"
        )
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    if n and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{name} out of range for {np.dtype(dtype).name}")
    return arr.astype(dtype, copy=False)


def _check_embeddings(embeddings: object, normalized: bool) -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, d), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {emb.dtype}")
    if emb.shape[1] < 1:
        raise ValueError("embeddings must have d >= 1 columns")
    emb = np.ascontiguousarray(emb, dtype=np.float32)  # (N, d)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    if normalized and emb.shape[0]:
        norms = np.linalg.norm(emb, axis=1)  # (N,)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_ATOL)
        if bad.size:
            raise ValueError(
                f"embeddings: row {bad[0]} has L2 norm {norms[bad[0]]:.4f} but normalized=True "
                "(L2-normalise them or pass normalized=False)"
            )
    return emb


def _check_item_ids(item_ids: object, n: int) -> pa.Array:
    if isinstance(item_ids, np.ndarray) and item_ids.dtype.kind == "U":
        ids: object = item_ids  # fast path: already a numpy str array
    else:
        ids = list(item_ids)
        for i, x in enumerate(ids):
            if not isinstance(x, str):
                raise ValueError(f"item_ids must be strings, item_ids[{i}] is {type(x).__name__}")
    if np.ndim(ids) != 1 or len(ids) != n:
        raise ValueError(f"item_ids must be 1-D with {n} entries (one per embedding row)")
    arr = pa.array(ids, type=pa.string())
    if n and len(pc.unique(arr)) != n:
        counts = pc.value_counts(arr)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        raise ValueError(f"item_ids has duplicates within one write, e.g. {dup!r}")
    return arr


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the data itself was fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_embeddings(
    root: str | os.PathLike,
    model: int,
    part: str,
    item_ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    tasks: Sequence[int] | np.ndarray,
    embeddings: np.ndarray,
    *,
    normalized: bool = True,
) -> Path:
    """Write ``root/model=<model>/<part>.parquet`` atomically and return its path.

    ``embeddings`` (N, d) float (stored as float32); ``item_ids`` (N,) str, unique within the
    write; ``labels`` (N,) int; ``tasks`` (N,) int arrival tasks. Re-writing the same
    (model, part) replaces the file, so re-running a finished task adds no duplicate rows.
    ``d`` must match every other part in ``root`` (ValueError naming the other file). With
    ``normalized=True`` every row must have unit L2 norm.
    """
    if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 0:
        raise ValueError(f"model must be a non-negative int, got {model!r}")
    model = int(model)
    if not isinstance(part, str) or not _PART_RE.match(part) or part.endswith(".parquet"):
        raise ValueError(
            f"part must be a plain file stem like 'rank0' (letters, digits, '_', '.', '-'; "
            f"no '.parquet' suffix), got {part!r}"
        )
    emb = _check_embeddings(embeddings, normalized)
    n, d = emb.shape
    ids = _check_item_ids(item_ids, n)
    labels_np = _as_int_array(labels, "labels", np.int64, n)
    tasks_np = _as_int_array(tasks, "tasks", np.int32, n)

    root = Path(root)
    folder = root / f"model={model}"
    final = folder / f"{part}.parquet"
    for info_path, info in _scan(root, missing_ok=True):
        if info_path != final and info.dim != d:
            raise ValueError(
                f"embeddings have dim {d} but the gallery already holds dim {info.dim} in "
                f"{info_path}: one store holds one embedding dimension"
            )

    schema = gallery_schema(d, model, normalized=normalized)
    table = pa.table(
        [
            ids,
            pa.array(labels_np, pa.int64()),
            pa.array(tasks_np, pa.int32()),
            pa.array(np.full(n, model, np.int32), pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d),
        ],
        schema=schema,
    )
    rows_per_group = max(1, ROW_GROUP_BYTES // (4 * d))

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{part}.parquet.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            # pq.ParquetWriter is looked up at call time (tests monkeypatch it to crash mid-write).
            writer = pq.ParquetWriter(
                fh,
                schema,
                compression={
                    "item_id": "snappy",
                    "label": "snappy",
                    "task": "snappy",
                    "model": "snappy",
                    "embedding": "none",  # float embeddings barely compress; skip the CPU cost
                },
                use_dictionary=["label", "task", "model"],
                write_statistics=["item_id", "label", "task", "model"],
            )
            try:
                writer.write_table(table, row_group_size=rows_per_group)
            finally:
                writer.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return final


# ---------------------------------------------------------------------------------------------
# Reading


def _scan(root: Path, *, missing_ok: bool = False) -> list[tuple[Path, PartInfo]]:
    """All parts under ``root`` sorted by (model, part), described from their footers."""
    if not root.is_dir():
        if missing_ok:
            return []
        raise FileNotFoundError(f"gallery store {root} does not exist")
    out = []
    for sub in sorted(root.iterdir()):
        m = _MODEL_DIR_RE.match(sub.name)
        if not m or not sub.is_dir():
            continue
        model = int(m.group(1))
        for f in sorted(sub.iterdir()):
            if not f.name.endswith(".parquet") or f.name.startswith((".", "_")):
                continue
            try:
                meta = pq.read_metadata(f)
                schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"corrupt or unreadable gallery part {f}: {e}") from e
            dim = _part_dim(f, schema, model)
            out.append((f, PartInfo(model, f.name[: -len(".parquet")], meta.num_rows, dim)))
    out.sort(key=lambda x: (x[1].model, x[1].part))
    return out


def _part_dim(path: Path, schema: pa.Schema, model: int) -> int:
    if "embedding" not in schema.names:
        raise ValueError(f"gallery part {path} has no 'embedding' column")
    typ = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(typ) or typ.value_type != pa.float32():
        raise ValueError(
            f"gallery part {path}: 'embedding' must be fixed_size_list<float32>[d], got {typ}"
        )
    md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if md.get("distcl.model") not in (None, str(model)):
        raise ValueError(
            f"gallery part {path} says model {md['distcl.model']} but sits in model={model}/"
        )
    return int(typ.list_size)


def _check_one_dim(parts: list[tuple[Path, PartInfo]]) -> int | None:
    if not parts:
        return None
    first_path, first = parts[0]
    for path, info in parts[1:]:
        if info.dim != first.dim:
            raise ValueError(
                f"mixed-dimension gallery: {path} has dim {info.dim} but {first_path} has "
                f"dim {first.dim}"
            )
    return first.dim


def _int_set(values: int | Iterable[int] | None, name: str) -> list[int] | None:
    if values is None:
        return None
    vals = [values] if isinstance(values, (int, np.integer)) else list(values)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be ints, got {v!r}")
    return [int(v) for v in vals]


def _read_part(path: Path, filt: ds.Expression | None) -> pa.Table:
    try:
        return pq.read_table(path, filters=filt)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt or unreadable gallery part {path}: {e}") from e


def _embeddings_to_numpy(col: pa.ChunkedArray | pa.Array, n: int, d: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    # flatten() honours the slice offset (unlike .values); nulls are impossible by schema.
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.size != n * d:
        raise ValueError(f"embedding column holds {flat.size} values, expected {n} x {d}")
    return np.ascontiguousarray(flat.reshape(n, d), dtype=np.float32)  # (n, d)


def _to_arrays(tables: list[tuple[Path, pa.Table]], dim: int | None) -> GalleryArrays:
    d = dim or 0
    tables = [(p, t) for p, t in tables if t.num_rows]
    if not tables:
        return GalleryArrays(
            np.empty(0, dtype=object),
            np.empty(0, np.int64),
            np.empty(0, np.int32),
            np.empty(0, np.int32),
            np.empty((0, d), np.float32),
        )
    _check_unique_per_model(tables)
    table = pa.concat_tables([t for _, t in tables])
    n = table.num_rows
    return GalleryArrays(
        item_ids=table.column("item_id").to_numpy(),  # (N,) object of str
        labels=table.column("label").to_numpy().astype(np.int64, copy=False),
        tasks=table.column("task").to_numpy().astype(np.int32, copy=False),
        models=table.column("model").to_numpy().astype(np.int32, copy=False),
        embeddings=_embeddings_to_numpy(table.column("embedding"), n, d),
    )


def _check_unique_per_model(tables: list[tuple[Path, pa.Table]]) -> None:
    """An item has at most one row per model; two parts of one model sharing an id (e.g. a
    task re-embedded with a different number of ranks) would double-count it in retrieval."""
    by_model: dict[Path, list[tuple[Path, pa.Table]]] = {}
    for path, t in tables:
        by_model.setdefault(path.parent, []).append((path, t))
    for folder, group in by_model.items():
        chunks = [c for _, t in group for c in t.column("item_id").chunks]
        ids = pa.chunked_array(chunks, type=pa.string())
        if len(pc.unique(ids)) != len(ids):  # hash-based, ~0.2 s per 1M ids
            counts = pc.value_counts(ids)
            dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0]
            files = [str(p) for p, t in group if pc.any(pc.equal(t.column("item_id"), dup)).as_py()]
            raise ValueError(
                f"duplicate item_id {dup.as_py()!r} in {folder} (files: {', '.join(files)}); "
                "remove stale parts before re-embedding with a different part layout"
            )


def read_embeddings(
    root: str | os.PathLike,
    models: int | Iterable[int] | None = None,
    tasks: int | Iterable[int] | None = None,
) -> GalleryArrays:
    """Read rows of the store into memory, optionally only some models and/or arrival tasks.

    Model filtering prunes whole folders; task filtering is pushed into the Parquet reader
    (row-group statistics, then rows). Rows come ordered by (model, part, row). Raises
    FileNotFoundError for a missing ``root`` and ValueError naming the file for a corrupt
    part, a mixed-dimension store or an item id repeated within one model.
    """
    model_set = _int_set(models, "models")
    task_set = _int_set(tasks, "tasks")
    parts = _scan(Path(root))
    dim = _check_one_dim(parts)
    if model_set is not None:
        parts = [(p, i) for p, i in parts if i.model in model_set]
    filt = ds.field("task").isin(task_set) if task_set is not None else None
    return _to_arrays([(p, _read_part(p, filt)) for p, _ in parts], dim)


def stale_gallery(root: str | os.PathLike, upto_task: int) -> GalleryArrays:
    """The deployment gallery after task ``upto_task``: every item that arrived at a task
    <= ``upto_task``, embedded by the model of its arrival task (rows with model == task),
    i.e. nothing re-embedded. Only folders ``model=<m>`` with m <= upto_task are opened."""
    if isinstance(upto_task, bool) or not isinstance(upto_task, (int, np.integer)):
        raise ValueError(f"upto_task must be an int, got {upto_task!r}")
    parts = _scan(Path(root))
    dim = _check_one_dim(parts)
    parts = [(p, i) for p, i in parts if i.model <= upto_task]
    filt = (ds.field("task") == ds.field("model")) & (ds.field("task") <= int(upto_task))
    return _to_arrays([(p, _read_part(p, filt)) for p, _ in parts], dim)


def iter_embedding_batches(
    root: str | os.PathLike,
    batch_rows: int = 65536,
    models: int | Iterable[int] | None = None,
) -> Iterator[EmbeddingBatch]:
    """Stream the store as ``EmbeddingBatch(item_ids, labels, embeddings)`` of at most
    ``batch_rows`` rows (batches never span two files), holding one batch in memory at a time.

    Order matches ``read_embeddings(root, models)``, so a running row offset gives the same
    gallery ids as the in-memory path (see ``distcl.gallery.index.search_blocked``).
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
    model_set = _int_set(models, "models")
    parts = _scan(Path(root))
    _check_one_dim(parts)
    for path, info in parts:
        if model_set is not None and info.model not in model_set:
            continue
        try:
            pf = pq.ParquetFile(path)
            batches = pf.iter_batches(
                batch_size=batch_rows, columns=["item_id", "label", "embedding"]
            )
            for rb in batches:
                n = rb.num_rows
                yield EmbeddingBatch(
                    rb.column("item_id").to_numpy(zero_copy_only=False),
                    rb.column("label").to_numpy().astype(np.int64, copy=False),
                    _embeddings_to_numpy(rb.column("embedding"), n, info.dim),
                )
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"corrupt or unreadable gallery part {path}: {e}") from e


def list_parts(root: str | os.PathLike) -> list[PartInfo]:
    """``PartInfo(model, part, rows, dim)`` for every part, sorted by (model, part); reads
    footers only. Raises FileNotFoundError for a missing ``root``."""
    return [info for _, info in _scan(Path(root))]
