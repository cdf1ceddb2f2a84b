"""WebDataset shards per task and split, a manifest, and readers safe under DDP.

    distcl data build jobs/quickstart.yaml    # writes <shards_dir>/task00-train-00000.tar ...
    distcl data verify jobs/quickstart.yaml   # re-hashes every shard against manifest.json

One sample: ``__key__`` (stable global id ``<split>-<index>``), ``png`` (uint8 image),
``cls`` (int label), ``json`` ({task, split, index}). Splits: ``train`` (the task's training
items) and ``gallery`` (the test items that arrive with the task; see scenario.py).

Every write goes to a temp name and is renamed into place; the manifest is written last,
so a half-built folder never looks complete. A rebuild with the same inputs compares the
manifest's fingerprint and the shards' sha256 and rewrites nothing.

Readers:
- :func:`train_batches`: every DDP rank yields exactly the same number of batches (DDP
  would hang otherwise); each epoch shards are shuffled and dealt to ranks, streams cycle.
- :func:`exact_split`: every sample to exactly one (rank, loader worker), for embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from distcl.config import JobConfig
from distcl.data.scenario import Scenario, build_scenario
from distcl.data.sources import DataError, Source, open_source

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    task: int
    split: str
    count: int
    sha256: str


class ShardError(DataError):
    """A shard is missing, truncated or does not match its manifest."""


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (deterministic)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (C, H, W)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, samples: list[dict]) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0) as writer:  # 0: same bytes on rebuild; int: no pax headers
            for s in samples:
                writer.write(s)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def _samples(src: Source, scenario_split: str, indices: np.ndarray, task: int) -> Iterator[dict]:
    split = "train" if scenario_split == "train" else "test"
    labels = src.labels(split)
    for i in indices:
        yield {
            "__key__": f"{split}-{int(i):07d}",
            "png": encode_png(src.image(split, int(i))),
            "cls": int(labels[i]),
            "json": {"task": task, "split": scenario_split, "index": int(i)},
        }


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (run `distcl data build JOB` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e})") from None


def build_shards(job: JobConfig, progress=None) -> tuple[Path, Scenario, bool]:
    """Build (or reuse) the job's shards; returns (dir, scenario, rewritten?)."""
    out = job.shards_dir
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = job.data_fingerprint()
    try:
        old = load_manifest(out)
    except ShardError:
        old = None
    if old and old.get("fingerprint") == fingerprint:
        try:
            verify_shards(out)
            return out, Scenario.from_json(old["scenario"]), False
        except ShardError:
            pass  # damaged: rebuild below
    src = open_source(job.data, job.seed)
    # A folder being rewritten must not look complete: the old manifest goes first.
    (out / MANIFEST).unlink(missing_ok=True)
    scenario = build_scenario(
        src.train_labels, src.test_labels, job.scenario, job.seed,
        job.data.train_per_class, job.data.test_per_class,
    )  # fmt: skip
    shards: list[ShardInfo] = []
    size = job.data.shard_size
    total = sum(len(t.train_items) + len(t.gallery_items) for t in scenario.tasks)
    done = 0
    for task in scenario.tasks:
        for split, items in (("train", task.train_items), ("gallery", task.gallery_items)):
            for k, start in enumerate(range(0, max(len(items), 1), size)):
                chunk = items[start : start + size]
                name = f"task{task.index:02d}-{split}-{k:05d}.tar"
                digest = _write_shard(out / name, list(_samples(src, split, chunk, task.index)))
                shards.append(ShardInfo(name, task.index, split, len(chunk), digest))
                done += len(chunk)
                if progress:
                    progress(done, total)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": src.name,
        "num_classes": src.num_classes,
        "class_names": list(src.class_names),
        "image_shape": list(src.image_shape),
        "shards": [s.__dict__ for s in shards],
        "scenario": scenario.to_json(),
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest).encode())
    # Shards of a previous config (more tasks, smaller shard_size) would linger otherwise.
    current = {s.name for s in shards}
    for stale in out.glob("task*-*.tar"):
        if stale.name not in current:
            stale.unlink()
    return out, scenario, True


def verify_shards(shards_dir: str | Path, deep: bool = False) -> dict:
    """Check every shard of the manifest exists with its sha256 (``deep``: also decode
    every sample and count them). Raises ShardError naming the first bad shard."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    n = 0
    for s in manifest["shards"]:
        path = shards_dir / s["name"]
        if not path.is_file():
            raise ShardError(f"{path}: missing shard listed in manifest")
        if sha256_file(path) != s["sha256"]:
            raise ShardError(f"{path}: sha256 differs from manifest (truncated or modified)")
        if deep:
            count = sum(1 for _ in iter_shard(path))
            if count != s["count"]:
                raise ShardError(f"{path}: {count} samples, manifest says {s['count']}")
        n += s["count"]
    return {"shards": len(manifest["shards"]), "samples": n}


def shard_paths(shards_dir: str | Path, task: int | Sequence[int], split: str) -> list[Path]:
    """Shards of ``split`` for one task or several, with their manifest counts checked."""
    tasks = {task} if isinstance(task, int) else set(task)
    manifest = load_manifest(shards_dir)
    return [
        Path(shards_dir) / s["name"]
        for s in manifest["shards"]
        if s["task"] in tasks and s["split"] == split and s["count"] > 0
    ]


def shard_counts(shards_dir: str | Path) -> dict[str, int]:
    return {s["name"]: s["count"] for s in load_manifest(shards_dir)["shards"]}


def _all_shards(src):  # nodesplitter / workersplitter that keep everything (we split)
    yield from src


def iter_shard(path: Path) -> Iterator[tuple[str, np.ndarray, int, dict]]:
    """Samples of one shard as (key, uint8 (C, H, W), label, meta); errors name the shard."""
    ds = wds.WebDataset(
        [str(path)], shardshuffle=False, nodesplitter=_all_shards,
        workersplitter=_all_shards, empty_check=False,
    )  # fmt: skip
    try:
        for sample in ds:
            meta = json.loads(sample["json"])
            yield sample["__key__"], decode_png(sample["png"]), int(sample["cls"]), meta
    except Exception as e:  # tarfile.ReadError, KeyError on a half sample, PIL errors
        raise ShardError(f"{path}: cannot read shard ({type(e).__name__}: {e})") from None
    # A cut between two samples reads as a shorter, well-formed archive; only the missing
    # end-of-archive marker (two zero blocks, written by every complete tar) tells.
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1024))
        if f.read() != bytes(1024):
            raise ShardError(f"{path}: cannot read shard (truncated: no end-of-archive marker)")


def exact_split(
    paths: Sequence[Path], rank: int, world: int, worker: int = 0, num_workers: int = 1
) -> list[Path]:
    """Shards of (rank, loader worker) so that every shard goes to exactly one of them."""
    flat = rank * num_workers + worker
    return list(paths[flat :: world * num_workers])


def batches_per_epoch(total: int, world: int, batch_size: int) -> int:
    """The same number of batches for every rank: floor(total / (world * batch)), >= 1."""
    return max(1, total // (world * batch_size))


def _rank_stream(paths: Sequence[Path], rank: int, world: int, seed: int, epoch: int):
    """Endless stream of one rank's samples: shards dealt per epoch, sample-split if too few."""
    cycle = 0
    while True:
        rng = np.random.default_rng([seed, epoch, cycle])
        order = [paths[i] for i in rng.permutation(len(paths))]
        n = 0
        if len(order) >= world:
            for p in order[rank::world]:
                for s in iter_shard(p):
                    n += 1
                    yield s
        else:  # fewer shards than ranks: every rank reads all, keeps every world-th sample
            k = 0
            for p in order:
                for s in iter_shard(p):
                    if k % world == rank:
                        n += 1
                        yield s
                    k += 1
        if n == 0:  # cycling would spin forever
            names = ", ".join(p.name for p in order)
            raise ShardError(f"rank {rank} of {world}: no samples in the shards ({names})")
        cycle += 1


def train_batches(
    paths: Sequence[Path],
    total: int,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int = 1000,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Exactly ``batches_per_epoch(total, world, batch_size)`` batches for this rank:
    (images uint8 (B, C, H, W), labels int64 (B,), keys)."""
    if not paths:
        raise ShardError("train_batches: no shards given")
    n_batches = batches_per_epoch(total, world, batch_size)
    rng = np.random.default_rng([seed, epoch, rank, 99])
    stream = _rank_stream(list(paths), rank, world, seed, epoch)
    buf: list = []
    # Pull exactly the samples this epoch uses: a buffer filled past them would wrap the
    # stream into its next cycle and mix repeats into the epoch while dropping others.
    to_pull = n_batches * batch_size
    for _ in range(n_batches):
        batch = []
        while len(batch) < batch_size:
            while len(buf) < shuffle_buffer and to_pull > 0:
                buf.append(next(stream))
                to_pull -= 1
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            batch.append(buf.pop())
        keys = [s[0] for s in batch]
        images = np.stack([s[1] for s in batch])
        labels = np.asarray([s[2] for s in batch], np.int64)
        yield images, labels, keys


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
