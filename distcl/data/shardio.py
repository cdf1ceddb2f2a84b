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

Readers:
- :func:`iter_shard` checks the sample count read against the manifest (a tar damaged
  mid-file can read as a clean, shorter archive), names the shard on any error, and leaves
  a note so that the next build (which checks sizes, not hashes) rewrites that shard.
- :func:`train_batches`: every DDP rank yields exactly the same number of batches (DDP
  would hang otherwise); each epoch shards are shuffled and dealt to the readers (ranks x
  loader workers), streams cycle; decoding runs in ``DataLoader`` workers where asked.
- :func:`item_split`: every sample to exactly one (rank, loader worker), in balanced
  contiguous ranges of items, for embedding; :func:`iter_items` reads them.

Shard locations are local paths or object-store URIs (``data.shards_dir: s3://bucket/x``,
through :mod:`distcl.storage`): WebDataset opens ``s3://``/``gs://`` URLs with a ``gopen``
handler registered here (one streamed GET per shard), the end-of-archive check reads the
last 1024 bytes with one ranged GET, and the quick checks use the listing's sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes

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


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset's opener for object-store URLs: a streamed read through distcl.storage
    (the endpoint and credentials of the AWS variables; see :mod:`distcl.storage`)."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are written by distcl.data.shards, not by gopen")
    return storage.open_input(url)


for _scheme in storage.SCHEMES:
    gopen_schemes[_scheme] = _gopen_storage


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


def verify_shards(shards_dir: str | Path | Uri, deep: bool = False) -> dict:
    """Check every shard of the manifest: by default that it exists with the manifest's
    byte size (quick: sizes from one listing of the folder); ``deep`` also re-hashes
    (sha256), decodes and counts every sample. Raises ShardError naming the first bad
    shard; returns {"shards", "samples"}."""
    shards_dir = storage.location(shards_dir)
    manifest = load_manifest(shards_dir)
    listing = folder_listing(shards_dir)
    n = 0
    for s in manifest["shards"]:
        path = shards_dir / s["name"]
        if deep:
            if not storage.is_file(path):
                raise ShardError(f"{path}: missing shard listed in manifest")
            if sha256_file(path) != s["sha256"]:
                mark_damaged(path, "sha256 differs from manifest")
                raise ShardError(f"{path}: sha256 differs from manifest (truncated or modified)")
            sum(1 for _ in iter_shard(path, expected=s["count"]))
        else:
            problem = _quick_problem(path, s, listing)
            if problem:
                raise ShardError(f"{path}: {problem}")
        n += s["count"]
    return {"shards": len(manifest["shards"]), "samples": n}


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


def _all_shards(src):  # nodesplitter / workersplitter that keep everything (we split)
    yield from src


def iter_shard(
    path: str | Path | Uri, expected: int | None = None, decode: bool = True
) -> Iterator[tuple[str, np.ndarray | bytes, int, dict]]:
    """Samples of one shard as (key, uint8 (C, H, W), label, meta); errors name the shard.

    Read to the end, the number of samples must equal ``expected`` (None: the count the
    manifest beside the shard lists, if any): a tar damaged mid-file can read as a clean,
    shorter archive, and only the count tells. ``decode=False`` yields the encoded image
    bytes (a reader that keeps only some samples decodes only those: :func:`decode_image`).
    """
    path = storage.location(path)
    if expected is None:
        expected = manifest_count(path)
    ds = wds.WebDataset(
        [str(path)], shardshuffle=False, nodesplitter=_all_shards,
        workersplitter=_all_shards, empty_check=False,
    )  # fmt: skip
    n = 0
    try:
        for sample in ds:
            meta = json.loads(sample["json"])
            image = sample["png"] if "png" in sample else sample["jpg"]
            n += 1
            yield sample["__key__"], decode_image(image) if decode else image, int(
                sample["cls"]), meta  # fmt: skip
    except Exception as e:  # tarfile.ReadError, KeyError on a half sample, PIL errors
        mark_damaged(path, f"{type(e).__name__}: {e}")
        raise ShardError(f"{path}: cannot read shard ({type(e).__name__}: {e})") from None
    # A cut between two samples reads as a shorter, well-formed archive; only the missing
    # end-of-archive marker (two zero blocks, written by every complete tar) tells.
    if storage.tail(path, 1024) != bytes(1024):  # objects: one ranged GET
        raise ShardError(f"{path}: cannot read shard (truncated: no end-of-archive marker)")
    if expected is not None and n != expected:
        why = f"short read, {n} samples but the manifest lists {expected}"
        mark_damaged(path, why)
        raise ShardError(
            f"{path}: {why} (damaged mid-file; marked: the next `distcl run` or `distcl "
            "data build` rewrites it)"
        )


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


def iter_items(pieces: Sequence[Piece], decode: bool = True):
    """The samples of ``pieces`` (``item_split``) as ``iter_shard`` yields them, in order;
    only those in a piece's range are decoded and yielded. A piece that ends where its shard
    ends reads it to the end, so the shard's count and end-of-archive are checked (by exactly
    one reader of every shard); a piece that ends before stops reading there."""
    for path, count, start, stop in pieces:
        samples = iter_shard(path, count, decode=False)
        for i, (key, data, label, meta) in enumerate(samples):
            if i >= stop:  # only a piece ending before its shard's end gets here
                samples.close()
                break
            if i >= start:
                yield key, decode_image(data) if decode else data, label, meta


def batches_per_epoch(total: int, world: int, batch_size: int) -> int:
    """The same number of batches for every rank: floor(total / (world * batch)), >= 1."""
    return max(1, total // (world * batch_size))


def _reader_stream(paths: Sequence[Path], reader: int, readers: int, seed: int, epoch: int):
    """Endless stream of one reader's samples (a reader: one loader worker of one rank).

    Each cycle the shards are shuffled with a seed every reader shares, then dealt to the
    ``readers``; with fewer shards than readers, every reader reads all of them and keeps
    every ``readers``-th sample, decoding only those it keeps.
    """
    cycle = 0
    while True:
        rng = np.random.default_rng([seed, epoch, cycle])
        order = [paths[i] for i in rng.permutation(len(paths))]
        n = 0
        if len(order) >= readers:
            for p in order[reader::readers]:
                for s in iter_shard(p):
                    n += 1
                    yield s
        else:  # fewer shards than readers: split by sample, before decoding
            k = 0
            for p in order:
                for key, data, label, meta in iter_shard(p, decode=False):
                    if k % readers == reader:
                        n += 1
                        yield key, decode_image(data), label, meta
                    k += 1
        if n == 0:  # cycling would spin forever
            names = ", ".join(Path(str(p)).name for p in order)
            raise ShardError(f"reader {reader} of {readers}: no samples in the shards ({names})")
        cycle += 1


def _shuffled_batches(stream, n_batches: int, batch_size: int, buffer: int, rng):
    """``n_batches`` batches drawn through a shuffle buffer from ``stream``."""
    buf: list = []
    # Pull exactly the samples these batches use: a buffer filled past them would wrap the
    # stream into its next cycle and mix repeats into the epoch while dropping others.
    to_pull = n_batches * batch_size
    for _ in range(n_batches):
        batch = []
        while len(batch) < batch_size:
            while len(buf) < buffer and to_pull > 0:
                buf.append(next(stream))
                to_pull -= 1
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            batch.append(buf.pop())
        keys = [s[0] for s in batch]
        images = np.stack([s[1] for s in batch])
        labels = np.asarray([s[2] for s in batch], np.int64)
        yield images, labels, keys


def loader_quotas(n_batches: int, workers: int) -> list[int]:
    """Batches per loader worker: ``n_batches`` dealt as evenly as possible."""
    return [n_batches // workers + (w < n_batches % workers) for w in range(workers)]


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's epoch for a ``DataLoader``: each loader worker reads and decodes its own
    shards (or its own samples) into whole batches; the DataLoader takes the workers'
    batches in turn, so the order is fixed by (seed, epoch, rank, number of workers)."""

    def __init__(self, paths, total, rank, world, batch_size, seed, epoch, shuffle_buffer,
                 workers):  # fmt: skip
        self.args = (list(paths), rank, world, batch_size, seed, epoch, shuffle_buffer)
        self.quotas = loader_quotas(batches_per_epoch(total, world, batch_size), workers)

    def __iter__(self):
        paths, rank, world, batch_size, seed, epoch, buffer = self.args
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = _reader_stream(paths, rank * n + w, world * n, seed, epoch)
        rng = np.random.default_rng([seed, epoch, rank, 99, w, n])
        yield from _shuffled_batches(
            stream, self.quotas[w], batch_size, max(batch_size, buffer // n), rng
        )


def train_batches(
    paths: Sequence[Path],
    total: int,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 1000,
    loader_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Exactly ``batches_per_epoch(total, world, batch_size)`` batches for this rank:
    (images uint8 (B, C, H, W), labels int64 (B,), keys).

    ``loader_workers=0`` reads and decodes in this process; N > 0 in N ``DataLoader``
    worker processes (tensors then, pinned if asked), each with a share of the batches."""
    if not paths:
        raise ShardError("train_batches: no shards given")
    n_batches = batches_per_epoch(total, world, batch_size)
    if loader_workers == 0:
        stream = _reader_stream(list(paths), rank, world, seed, epoch)
        rng = np.random.default_rng([seed, epoch, rank, 99])
        yield from _shuffled_batches(stream, n_batches, batch_size, shuffle_buffer, rng)
        return
    workers = min(loader_workers, n_batches)  # a worker with no batch would only start
    ds = TrainStream(paths, total, rank, world, batch_size, seed, epoch, shuffle_buffer, workers)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=2
    )
    yield from loader


def load_arrays(paths: Sequence[Path]) -> tuple[list[str], np.ndarray, np.ndarray, list[dict]]:
    """Every sample of ``paths`` as (keys, images (N, C, H, W) uint8, labels, metas)."""
    keys, images, labels, metas = [], [], [], []
    for p in paths:
        for key, img, lab, meta in iter_shard(p):
            keys.append(key)
            images.append(img)
            labels.append(lab)
            metas.append(meta)
    if not images:
        return [], np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), []
    return keys, np.stack(images), np.asarray(labels, np.int64), metas
