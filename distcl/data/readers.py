"""Shard readers: WebDataset streams of samples for training and embedding passes.

The manifest, encoding and checks they rely on are in :mod:`distcl.data.shardio` (no torch,
no WebDataset: the driver, tuning trials and the CLI use only those); these readers run on
the Train workers (and in tools that read shards), so torch and WebDataset load here.

- :func:`iter_shard` checks the sample count read against the manifest (a tar damaged
  mid-file can read as a clean, shorter archive), names the shard on any error, and leaves
  a note so that the next build (which checks sizes, not hashes) rewrites that shard.
- :func:`train_batches`: every DDP rank yields exactly the same number of batches (DDP
  would hang otherwise); each epoch shards are shuffled and dealt to the readers (ranks x
  loader workers), streams cycle; decoding runs in ``DataLoader`` workers where asked.
- :func:`iter_items` reads the items :func:`~distcl.data.shardio.item_split` gives one
  reader of an embedding pass.

Object-store shards (``s3://``, ``gs://``): WebDataset opens them with a ``gopen`` handler
registered here (one streamed GET per shard).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes

from distcl import storage
from distcl.data.shardio import (
    Piece,
    ShardError,
    batches_per_epoch,
    decode_image,
    loader_quotas,
    manifest_count,
    mark_damaged,
)
from distcl.storage import Uri


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset's opener for object-store URLs: a streamed read through distcl.storage
    (the endpoint and credentials of the AWS variables; see :mod:`distcl.storage`)."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are written by distcl.data.shards, not by gopen")
    return storage.open_input(url)


for _scheme in storage.SCHEMES:
    gopen_schemes[_scheme] = _gopen_storage


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
