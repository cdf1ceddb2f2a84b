"""Shard I/O: the manifest, image encoding, checks, and readers safe under DDP.

Import these from :mod:`distcl.data.shards` (which builds the shards and re-exports them):

    distcl data verify jobs/quickstart.yaml         # sizes against manifest.json
    distcl data verify jobs/quickstart.yaml --deep  # + sha256, decode and count every sample

One sample: ``__key__`` (stable global id ``<split>-<index>``), ``png`` or ``jpg`` (the
image, ``data.image_format``), ``cls`` (int label), ``json`` ({task, split, index}). Splits:
``train`` (the task's training items) and ``gallery`` (the test items that arrive with the
task; see scenario.py); the held-out classes' test items are ``heldout-gallery-*.tar``
shards of task -1. Building (one Ray task per shard, atomic, the manifest last):
:mod:`distcl.data.shards`.

Readers (:mod:`distcl.data.readers`, with torch and WebDataset) read what this module
describes; this one imports neither, so the driver, tuning trials and the CLI can plan,
build and check shards without them. :func:`item_split` gives every sample of an
embedding pass to exactly one (rank, loader worker), in balanced contiguous ranges.

Shard locations are local paths or object-store URIs (``data.shards_dir: s3://bucket/x``,
through :mod:`distcl.storage`): the end-of-archive check reads the last 1024 bytes with one
ranged GET, and the quick checks use the listing's sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distcl import storage
from distcl.data.sources import DataError
from distcl.storage import Loc, Uri

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-shard ``bytes``, image format, held-out shards


class ShardError(DataError):
    """A shard is missing, truncated or does not match its manifest."""


# ------------------------------------------------------------------------ encoding
def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 (C, H, W) -> PNG or JPEG bytes (deterministic for a given Pillow)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"data.image_format: {fmt!r} is not png or jpeg")
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (deterministic)."""
    return encode_image(image, "png")


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 (C, H, W)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


decode_png = decode_image


def sha256_file(path: str | Path | Uri) -> str:
    h = hashlib.sha256()
    with storage.open_input(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    # pid + random: two writers of one name (a retried task, another node) never collide.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def atomic_write_bytes(path: Path | Uri, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename (an object: one upload): readers
    never see half a file."""
    if isinstance(path, Uri):
        storage.write_bytes(path, data)
        return
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------ manifest
def load_manifest(shards_dir: str | Path | Uri) -> dict:
    path = storage.join(shards_dir, MANIFEST)
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (run `distcl data build JOB` first)") from None
    except IsADirectoryError:
        raise ShardError(f"{path}: no manifest (a folder of that name)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None


def _quick_problem(
    path: Path | Uri, entry: dict, listing: dict[str, storage.Entry] | None = None
) -> str | None:
    """Why ``path`` does not match its manifest entry by existence and size (None: fine).
    ``listing`` (the folder's entries by name, from one listing) spares a request per shard
    on an object store."""
    if listing is not None:
        st = listing.get(path.name)
        mark = listing.get(_damage_mark(path).name)
    else:
        st = storage.stat(path)
        mark = storage.stat(_damage_mark(path))
    if st is None or st.is_dir:
        return "missing shard listed in manifest"
    if mark is not None:
        note = storage.read_text(_damage_mark(path), errors="replace")[:200]
        return f"found damaged by a reader ({note})"
    if "bytes" not in entry:  # a format-1 manifest: only the hash tells
        if sha256_file(path) != entry["sha256"]:
            return "sha256 differs from manifest (truncated or modified)"
        return None
    size = st.size
    if size != entry["bytes"]:
        return f"size differs from manifest ({size} bytes, manifest says {entry['bytes']})"
    return None


# ------------------------------------------------------------------------ checking
def folder_listing(shards_dir: str | Path | Uri) -> dict[str, storage.Entry]:
    """The entries of a shard folder by name: one listing request on an object store."""
    return {e.name: e for e in storage.listdir(shards_dir)}


# ------------------------------------------------------------------------ reading
def shard_paths(
    shards_dir: str | Path | Uri, task: int | Sequence[int], split: str
) -> list[Path | Uri]:
    """Non-empty shards of ``split`` for one task or several (-1: held-out classes)."""
    tasks = {task} if isinstance(task, int) else set(task)
    manifest = load_manifest(shards_dir)
    return [
        storage.join(shards_dir, s["name"])
        for s in manifest["shards"]
        if s["task"] in tasks and s["split"] == split and s["count"] > 0
    ]


def shard_counts(shards_dir: str | Path | Uri) -> dict[str, int]:
    return {s["name"]: s["count"] for s in load_manifest(shards_dir)["shards"]}


_counts_cache: dict[Loc, tuple[tuple[int, int], dict[str, int]]] = {}


def manifest_count(path: str | Path | Uri) -> int | None:
    """The sample count the manifest beside ``path`` lists for it (None: not listed).
    Cached per process while the manifest file is unchanged."""
    path = storage.location(path)
    folder = path.parent
    try:
        st = storage.stat(folder / MANIFEST)
    except OSError:
        return None
    if st is None:
        return None
    stamp = (st.mtime_ns, st.size)
    cached = _counts_cache.get(folder)
    if cached is None or cached[0] != stamp:
        try:
            counts = shard_counts(folder)
        except (ShardError, KeyError, TypeError):
            return None
        _counts_cache[folder] = cached = (stamp, counts)
    return cached[1].get(path.name)


def _damage_mark(path: Path | Uri) -> Path | Uri:
    return path.with_name(f".{path.name}.damaged")


def mark_damaged(path: Path | Uri, why: str) -> None:
    """Leave a note beside a shard a reader found damaged, so that the next build (which
    checks sizes, not hashes) rewrites it. Best effort: a read-only folder is skipped."""
    if manifest_count(path) is None:  # not a listed shard of a manifest folder
        return
    try:
        atomic_write_bytes(_damage_mark(path), why.encode())
    except OSError:
        pass


Piece = tuple[str, int, int, int]  # (shard, its manifest count, first item, end item)


def item_split(
    shards: Sequence[tuple[str, int]], rank: int, world: int, worker: int = 0,
    num_workers: int = 1,
) -> list[Piece]:  # fmt: skip
    """The items of (rank, loader worker) for an embedding pass: with the shards' items
    concatenated in order, reader ``rank * num_workers + worker`` of ``world * num_workers``
    takes one contiguous range, the ranges' sizes differing by at most one. So every item
    goes to exactly one reader, balanced whatever the shard sizes and count (a split by
    whole shards gives 3 of 5 equal shards to one of 2 ranks: 50 % more work), and a
    reader touches at most two shards beyond its own. The readers of one rank together
    hold that rank's range, in order."""
    readers = world * num_workers
    flat = rank * num_workers + worker
    total = sum(int(c) for _, c in shards)
    lo, hi = total * flat // readers, total * (flat + 1) // readers
    out, offset = [], 0
    for path, count in shards:
        start, stop = max(lo - offset, 0), min(hi - offset, int(count))
        if start < stop:
            out.append((path, int(count), start, stop))
        offset += int(count)
    return out


def batches_per_epoch(total: int, world: int, batch_size: int) -> int:
    """The same number of batches for every rank: floor(total / (world * batch)), >= 1."""
    return max(1, total // (world * batch_size))


def loader_quotas(n_batches: int, workers: int) -> list[int]:
    """Batches per loader worker: ``n_batches`` dealt as evenly as possible."""
    return [n_batches // workers + (w < n_batches % workers) for w in range(workers)]
