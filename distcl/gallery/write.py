"""Writing the Parquet embedding store: schema, validation, atomic parts (docs/design.md),
and ``scan_parts``: the parts of a store from their footers (pyarrow.dataset discovery).

One call writes one part, ``root/model=<model>/<part>.parquet`` (the end of task t writes one
part per train rank). The layout, the columns and how the parts are read back are described in
``distcl.gallery.store``, which re-exports ``write_embeddings`` and ``gallery_schema``.

The root may be an object-store URI (``s3://bucket/runs/q/gallery``, :mod:`distcl.storage`):
a part is then serialised in memory and uploaded as one object (visible only once complete),
and the parts are discovered and read through the same pyarrow filesystem.

Test: ``.venv/bin/python -m pytest tests/test_gallery_store.py -q``
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from distcl import storage
from distcl.storage import Loc, Uri

FORMAT_VERSION = "1"
METRIC = "ip"
ROW_GROUP_BYTES = 8 * 1024 * 1024  # embedding bytes per row group: small decode transients
COLUMNS = ("item_id", "label", "task", "model", "embedding")
_NORM_ATOL = 5e-3  # loose enough for embeddings normalised in fp16 / bf16 before the cast
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MODEL_DIR_RE = re.compile(r"^model=(\d+)$")
HIVE = ds.partitioning(pa.schema([("model", pa.int32())]), flavor="hive")


class PartInfo(NamedTuple):
    """One Parquet part, from its footer only."""

    model: int
    part: str
    rows: int
    dim: int


def gallery_schema(dim: int, model: int, *, normalized: bool = True) -> pa.Schema:
    """The Arrow schema (with file-level metadata) of a part embedded by ``model``."""
    types = (pa.string(), pa.int64(), pa.int32(), pa.int32(), pa.list_(pa.float32(), dim))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": str(model),
        "dim": str(dim),
        "metric": METRIC,
        "normalized": "true" if normalized else "false",
    }
    fields = [pa.field(n, t, nullable=False) for n, t in zip(COLUMNS, types, strict=True)]
    return pa.schema(fields, metadata={f"distcl.{k}": v for k, v in meta.items()})


def _ints(values: object, name: str, dtype: type, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(
            f"{name} must be 1-D with {n} entries (one per embedding), got {arr.shape}"
        )
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if n and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max):
        raise ValueError(f"{name} out of range for {np.dtype(dtype).name}")
    return arr.astype(dtype, copy=False)


def _check_embeddings(embeddings: object, normalized: bool) -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, d), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating) or emb.shape[1] < 1:
        raise ValueError(f"embeddings must be floating point with d >= 1, got {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)  # (N, d)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    bad = np.flatnonzero(np.abs(np.linalg.norm(emb, axis=1) - 1.0) > _NORM_ATOL)
    if normalized and bad.size:
        raise ValueError(
            f"embeddings: row {bad[0]} has L2 norm {np.linalg.norm(emb[bad[0]]):.4f} but "
            "normalized=True (L2-normalise them or pass normalized=False)"
        )
    return emb


def first_dup(ids: pa.Array | pa.ChunkedArray) -> str | None:
    counts = pc.value_counts(ids)
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return dups[0].as_py() if len(dups) else None


def write_embeddings(
    root: str | os.PathLike | Uri,
    model: int,
    part: str,
    item_ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    tasks: Sequence[int] | np.ndarray,
    embeddings: np.ndarray,
    *,
    normalized: bool = True,
) -> Loc:
    """Write ``root/model=<model>/<part>.parquet`` atomically and return its path.

    ``embeddings`` (N, d) float; ``item_ids`` (N,) str unique within the write; ``labels``
    (N,) int; ``tasks`` (N,) int (arrival task, -1 for held-out classes). ``d`` must match
    every other part of the store. Re-writing a (model, part) replaces the file.
    """
    if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 0:
        raise ValueError(f"model must be a non-negative int, got {model!r}")
    if not isinstance(part, str) or not _PART_RE.match(part) or part.endswith(".parquet"):
        raise ValueError(
            f"part must be a plain file stem like 'part-0' (letters, digits, "
            f"'_', '.', '-'; no '.parquet' suffix), got {part!r}"
        )
    emb = _check_embeddings(embeddings, normalized)
    n, d = emb.shape
    if not (isinstance(item_ids, np.ndarray) and item_ids.dtype.kind == "U"):
        item_ids = list(item_ids)
        for i, x in enumerate(item_ids):
            if not isinstance(x, str):
                raise ValueError(f"item_ids must be strings, item_ids[{i}] is {type(x).__name__}")
    if np.ndim(item_ids) != 1 or len(item_ids) != n:
        raise ValueError(f"item_ids must be 1-D with {n} entries (one per embedding row)")
    ids = pa.array(item_ids, type=pa.string())
    if (dup := first_dup(ids)) is not None:
        raise ValueError(f"item_ids has duplicates within one write, e.g. {dup!r}")
    columns = [
        ids,
        pa.array(_ints(labels, "labels", np.int64, n)),
        pa.array(_ints(tasks, "tasks", np.int32, n)),
        pa.array(np.full(n, model, np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
    ]
    root = storage.location(root)
    folder = root / f"model={int(model)}"
    final = folder / f"{part}.parquet"
    for path, info in scan_parts(root) if storage.is_dir(root) else []:
        if storage.location(path) != final and info.model == model and info.dim != d:
            raise ValueError(
                f"embeddings have dim {d} but model {model}'s rows already have dim "
                f"{info.dim} in {path}: one model's rows have one embedding dimension"
            )
    schema = gallery_schema(d, int(model), normalized=normalized)
    table = pa.table(columns, schema=schema)
    if isinstance(final, Uri):  # one upload of the whole part
        buf = io.BytesIO()
        _write_parquet(buf, table, schema, d)
        storage.write_bytes(final, buf.getvalue())
        return final
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{part}.parquet.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            _write_parquet(fh, table, schema, d)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(folder, os.O_RDONLY)  # make the rename durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def _write_parquet(fh, table: pa.Table, schema: pa.Schema, d: int) -> None:
    # Looked up at call time (tests make it crash); embeddings barely compress.
    writer = pq.ParquetWriter(
        fh,
        schema,
        compression={"embedding": "none"} | {c: "snappy" for c in COLUMNS[:4]},
        use_dictionary=["label", "task", "model"],
    )
    try:
        rows = max(1, ROW_GROUP_BYTES // (4 * d))
        writer.write_table(table, row_group_size=rows)
    finally:
        writer.close()


def store_filesystem(root: str | os.PathLike | Uri):
    """``(pyarrow filesystem, base path on it, naming)`` of a store root: local paths as
    before (LocalFileSystem, the path as given); object stores prefix-stripped, with
    ``naming(fs_path)`` giving back the ``s3://`` URI that errors and ``Store.parts`` show."""
    root = storage.location(root)
    if isinstance(root, Uri):
        fs, base = storage.filesystem(root)
        return fs, base, lambda p: f"{root.scheme}://{p}"
    return None, str(root), lambda p: p


def scan_parts(root: str | os.PathLike | Uri) -> list[tuple[str, PartInfo]]:
    """(path, PartInfo) of every ``model=<m>/*.parquet`` under root, from the footers
    (paths are URIs for a store on an object store)."""
    fs, base, name = store_filesystem(root)
    found = ds.dataset(
        base,
        format="parquet",
        partitioning=HIVE,
        schema=pa.schema([("item_id", pa.string())]),
        filesystem=fs,
    )
    out = []
    for frag in found.get_fragments():
        match = _MODEL_DIR_RE.match(Path(frag.path).parent.name)
        if not frag.path.endswith(".parquet") or not match:
            continue
        try:
            rows, schema = frag.metadata.num_rows, frag.physical_schema
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"corrupt or unreadable gallery part {name(frag.path)}: {e}") from e
        typ = schema.field("embedding").type if "embedding" in schema.names else None
        if typ is None or not pa.types.is_fixed_size_list(typ) or typ.value_type != pa.float32():
            raise ValueError(
                f"gallery part {name(frag.path)}: 'embedding' must be "
                f"fixed_size_list<float32>[d], got {typ}"
            )
        said = (schema.metadata or {}).get(b"distcl.model", match.group(1).encode()).decode()
        if int(said) != int(match.group(1)):
            raise ValueError(
                f"gallery part {name(frag.path)} says model {said} but sits in {match[0]}/"
            )
        info = PartInfo(int(said), Path(frag.path).stem, rows, int(typ.list_size))
        out.append((name(frag.path), info))
    return sorted(out, key=lambda x: (x[1].model, x[1].part))
