"""WebDataset shards per task and split: building (plan, one Ray task per shard, the
manifest last), and the manifest and checks of :mod:`distcl.data.shardio`, re-exported here
(the readers, with torch: :mod:`distcl.data.readers`).

    distcl data build jobs/quickstart.yaml          # <shards_dir>/task00-train-00000.tar ...
    distcl data verify jobs/quickstart.yaml [--deep]
    distcl bench data                               # throughput: 1, 2, 4 Ray tasks vs one process

One sample: ``__key__`` (``<split>-<index>``), ``png`` or ``jpg`` (``data.image_format``),
``cls``, ``json`` ({task, split, index}); held-out classes: ``heldout-gallery-*.tar``, task -1.

:func:`plan_shards` lists every shard with its source indices. Each shard is then written
by one Ray task (in this process when Ray is not initialised), which opens the source itself
(once per worker process) and reads images by index. A shard's bytes depend only on its plan
(fixed tar mtime, owner and member order), never on which task or node wrote it. Every file
goes to a temp name, is fsynced and renamed into place; the manifest is written last, so a
half-built folder never looks complete. A rebuild with the same inputs rewrites nothing; a
shard found damaged at start (size differs from the manifest, or a reader's note) is named
and only it is rebuilt. Cleanup deletes only files that a previous manifest listed.

The folder may be an object-store URI (``data.shards_dir`` or ``output.root`` = ``s3://...``,
:mod:`distcl.storage`): each task writes its shard to a local temp file, then uploads it as
one object (visible only when complete); the manifest is uploaded last, as locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distcl import storage
from distcl.config import JobConfig
from distcl.data.scenario import Scenario, build_scenario
from distcl.data.shardio import (  # noqa: F401  (re-exported: the public shard API)
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    _damage_mark,
    _quick_problem,
    _tmp_name,
    atomic_write_bytes,
    batches_per_epoch,
    decode_image,
    decode_png,
    encode_image,
    encode_png,
    folder_listing,
    item_split,
    load_manifest,
    manifest_count,
    mark_damaged,
    sha256_file,
    shard_counts,
    shard_paths,
)
from distcl.data.sources import (
    FolderListing,
    Source,
    fashion_mnist_root,
    list_image_folder,
    open_source,
)
from distcl.storage import Loc, Uri

#: Names listed by the manifest a rebuild replaced, kept until that rebuild's cleanup ran.
PREVIOUS = ".manifest-previous.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.tar")
Progress = Callable[[int, int], None]
Log = Callable[[str], None]


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its name, task (-1: held-out classes), split and source items."""

    name: str
    task: int
    split: str  # "train" | "gallery"
    indices: np.ndarray  # (n,) indices into the source's train (train) or test split

    @property
    def source_split(self) -> str:
        return "train" if self.split == "train" else "test"


def _log_stderr(msg: str) -> None:
    print(f"distcl: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ planning
def plan_shards(scenario: Scenario, shard_size: int) -> list[ShardPlan]:
    """Every shard of ``scenario`` in manifest order (pure). A task's empty split still
    gets one empty shard, so every (task, split) is listed."""
    if shard_size < 1:
        raise ValueError(f"data.shard_size: must be >= 1, got {shard_size}")
    groups = [
        (f"task{t.index:02d}-{split}", t.index, split, items)
        for t in scenario.tasks
        for split, items in (("train", t.train_items), ("gallery", t.gallery_items))
    ]
    heldout = np.asarray(getattr(scenario, "heldout_items", ()), np.int64)
    if len(heldout):
        groups.append(("heldout-gallery", -1, "gallery", heldout))
    plans = []
    for prefix, task, split, items in groups:
        items = np.asarray(items, np.int64)
        for k, start in enumerate(range(0, max(len(items), 1), shard_size)):
            plans.append(
                ShardPlan(f"{prefix}-{k:05d}.tar", task, split, items[start : start + shard_size])
            )
    return plans


# ------------------------------------------------------------------------ writing
class _HashingWriter:
    """File wrapper that hashes and counts what the tar stream writes."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


class TarShard:
    """A WebDataset shard as ``webdataset.TarWriter(f, mtime=0)`` writes it, byte for byte
    (tests/test_shards.py compares), without importing WebDataset, which imports torch: the
    driver and the shard-building tasks never load torch. Each sample's members are
    ``<key>.<ext>`` in sorted order, mtime 0 (an int: no pax headers), owner and group
    ``bigdata``, mode 0o444; ``cls`` as ASCII digits, ``json`` as UTF-8 JSON."""

    def __init__(self, fileobj) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|")

    def write(self, key: str, image_ext: str, image: bytes, label: int, meta: dict) -> None:
        members = {image_ext: image, "cls": str(label).encode("ascii"),
                   "json": json.dumps(meta).encode("utf-8")}  # fmt: skip
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(members[ext]))

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()


_source_cache: dict = {}


def _cached_source(data, seed: int, listing: FolderListing | None = None) -> Source:
    """One open source per process (Ray reuses worker processes across shard tasks); an
    image-folder source from the driver's ``listing``, never from a walk of the tree."""
    key = (data, seed, listing.digest if listing is not None else None)
    if key not in _source_cache:
        _source_cache.clear()  # keep one: a source may hold a whole split in memory
        _source_cache[key] = open_source(data, seed, listing)
    return _source_cache[key]


def list_once(data, seed: int) -> FolderListing | None:
    """The image-folder tree's listing, made once (in the driver) for every shard task;
    None for sources that have nothing to list."""
    if data.source != "image-folder":
        return None
    return list_image_folder(data.root, data.test_fraction, seed)


def _local_temp(name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-")
    os.close(fd)
    return Path(tmp)


def write_shard(
    plan: ShardPlan, out_dir: str, data, seed: int, image_format: str = "png", quality: int = 95,
    listing: FolderListing | None = None,
) -> dict:  # fmt: skip
    """Write one planned shard atomically; return its manifest entry. ``listing``: the
    image-folder tree as the driver listed it (:func:`list_once`)."""
    src = _cached_source(data, seed, listing)
    split = plan.source_split
    labels = src.labels(split)
    ext = "png" if image_format == "png" else "jpg"
    path = storage.join(out_dir, plan.name)
    # An object store has no rename: the shard is written to a local temp file, then
    # uploaded whole (one object, visible only once complete).
    remote = isinstance(path, Uri)
    tmp = _local_temp(plan.name) if remote else _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingWriter(f)
            with TarShard(hashing) as writer:  # the same bytes on every rebuild
                for i in plan.indices:
                    i = int(i)
                    writer.write(
                        f"{split}-{i:07d}", ext,
                        encode_image(src.image(split, i), image_format, quality),
                        int(labels[i]), {"task": plan.task, "split": plan.split, "index": i},
                    )  # fmt: skip
            f.flush()
            if not remote:
                os.fsync(f.fileno())
        if remote:
            storage.upload(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    storage.delete(_damage_mark(path))
    return {
        "name": plan.name,
        "task": plan.task,
        "split": plan.split,
        "count": len(plan.indices),
        "sha256": hashing.sha.hexdigest(),
        "bytes": hashing.bytes,
    }


def write_shards_serial(
    plans: Sequence[ShardPlan], out_dir: str, data, seed: int, image_format: str = "png",
    quality: int = 95, progress: Progress | None = None, listing: FolderListing | None = None,
) -> list[dict]:  # fmt: skip
    """The single-process writer (no Ray): the baseline of ``distcl bench data``."""
    entries, done, total = [], 0, sum(len(p.indices) for p in plans)
    for plan in plans:
        entries.append(write_shard(plan, out_dir, data, seed, image_format, quality, listing))
        done += len(plan.indices)
        if progress:
            progress(done, total)
    return entries


def _write_shard_where(*args) -> tuple[dict, str, float]:
    """:func:`write_shard` in a Ray task, with the id of the node that ran it and the CPU
    seconds it took."""
    import ray

    cpu = time.process_time()
    entry = write_shard(*args)
    return entry, ray.get_runtime_context().get_node_id(), time.process_time() - cpu


def write_shards_ray(
    plans: Sequence[ShardPlan], out_dir: str, data, seed: int, image_format: str = "png",
    quality: int = 95, progress: Progress | None = None, parallel: int | None = None,
    placement: dict[str, str] | None = None, task_cpu: dict[str, float] | None = None,
    listing: FolderListing | None = None,
) -> list[dict]:  # fmt: skip
    """One Ray task per shard, at most ``parallel`` in flight (None: as the cluster's CPUs
    allow); entries in plan order. ``placement`` (if given) receives {shard: node id},
    ``task_cpu`` {shard: CPU seconds of its task}."""
    import ray

    # SPREAD: shards are I/O on the source and the output; spread that over the nodes.
    task = ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")(_write_shard_where)
    if parallel is None:
        parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))
    data_ref, listing_ref = ray.put(data), ray.put(listing)  # once, not once per task
    pending: dict = {}
    entries: dict[str, dict] = {}
    done, total, queue = 0, sum(len(p.indices) for p in plans), list(plans)[::-1]
    while queue or pending:
        while queue and len(pending) < parallel:
            plan = queue.pop()
            ref = task.remote(plan, out_dir, data_ref, seed, image_format, quality, listing_ref)
            pending[ref] = plan
        ready, _ = ray.wait(list(pending), num_returns=1)
        plan = pending.pop(ready[0])
        entries[plan.name], node, cpu = ray.get(ready[0])
        if placement is not None:
            placement[plan.name] = node
        if task_cpu is not None:
            task_cpu[plan.name] = cpu
        done += len(plan.indices)
        if progress:
            progress(done, total)
    return [entries[p.name] for p in plans]


def _portable_data(data):
    """``data`` with its root made absolute: Ray workers run in another cwd (or node)."""
    root = data.root
    if data.source == "fashion-mnist":
        root = str(fashion_mnist_root(root).resolve())
    elif root:
        root = str(Path(root).expanduser().resolve())
    if root == data.root:
        return data
    if hasattr(data, "model_copy"):
        return data.model_copy(update={"root": root})
    return dataclasses.replace(data, root=root)


#: Fewer samples than this are written in this process even with Ray up: starting Ray task
#: workers that import the reader costs seconds, writing costs ~0.5 ms a sample.
SERIAL_BELOW = 4096


def _write(
    plans, out: Loc, job: JobConfig, progress, parallel, placement=None, listing=None
) -> list[dict]:
    """Write ``plans`` with Ray tasks when Ray is initialised (unless they are small and no
    ``parallel``/``placement`` was asked for), else in this process; an image-folder tree
    is listed here once (unless ``listing`` is given), not per task."""
    data = _portable_data(job.data)
    if listing is None:
        listing = list_once(data, job.seed)
    fmt = getattr(job.data, "image_format", "png")
    quality = getattr(job.data, "jpeg_quality", 95)
    args = (plans, str(out.resolve()), data, job.seed, fmt, quality, progress)  # path or URI
    try:
        import ray

        use_ray = ray.is_initialized()
    except ImportError:
        use_ray = False
    small = sum(len(p.indices) for p in plans) < SERIAL_BELOW
    use_ray = use_ray and (parallel is not None or placement is not None or not small)
    if use_ray:
        return write_shards_ray(*args, parallel=parallel, placement=placement, listing=listing)
    return write_shards_serial(*args, listing=listing)


def _try_manifest(out: Loc) -> dict | None:
    try:
        return load_manifest(out)
    except ShardError:
        return None


def _plan_matches(manifest: dict, plans: Sequence[ShardPlan]) -> bool:
    listed = [(s["name"], s["task"], s["split"], s["count"]) for s in manifest["shards"]]
    return listed == [(p.name, p.task, p.split, len(p.indices)) for p in plans]


def _write_manifest(out: Loc, fingerprint: str, src_info: dict, entries, scenario) -> None:
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        **src_info,
        "shards": list(entries),
        "scenario": scenario.to_json(),
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest).encode())


def _cleanup(out: Loc, keep: set[str], listed: set[str]) -> None:
    """Delete files a previous manifest listed that the new one does not, and our temp
    files and damage notes of listed names; never anything else."""
    for name in sorted(listed - keep):
        if _SHARD_NAME.fullmatch(name):  # a plain shard file name, never a path
            storage.delete(out / name)
    ours = keep | listed | {MANIFEST, PREVIOUS}
    for entry in (e.name for e in storage.listdir(out)):
        if not entry.startswith("."):
            continue
        base = entry[1:].split(".tmp-")[0] if ".tmp-" in entry else None
        if base and base.endswith(".damaged"):
            base = base[: -len(".damaged")]
        stale_mark = entry.endswith(".damaged") and entry[1 : -len(".damaged")] in listed - keep
        if (base in ours) or stale_mark:
            storage.delete(out / entry)
    storage.delete(out / PREVIOUS)


def build_shards(
    job: JobConfig,
    progress: Progress | None = None,
    log: Log | None = None,
    parallel: int | None = None,
    placement: dict[str, str] | None = None,
) -> tuple[Loc, Scenario, bool]:
    """Build (or reuse) the job's shards; returns (dir, scenario, rewritten?).

    Reuse checks sizes and counts, not hashes. ``log`` (default: stderr) hears which
    damaged shard is rebuilt; ``progress(done, total)`` counts samples written;
    ``parallel`` caps the Ray tasks in flight (None: the cluster's CPUs); ``placement``
    receives {shard name: id of the Ray node that wrote it}.
    """
    log = log or _log_stderr
    out = job.shards_dir
    storage.makedirs(out)
    fingerprint = job.data_fingerprint()
    size = job.data.shard_size
    old = _try_manifest(out)
    same = bool(old) and old.get("fingerprint") == fingerprint and "scenario" in old
    if same:
        scenario = Scenario.from_json(old["scenario"])
        plans = plan_shards(scenario, size)
        if _plan_matches(old, plans):
            damaged, listing = {}, folder_listing(out)  # sizes: one listing, not a stat each
            for entry in old["shards"]:
                problem = _quick_problem(out / entry["name"], entry, listing)
                if problem:
                    damaged[entry["name"]] = problem
            if not damaged and old.get("format") == FORMAT_VERSION:
                _cleanup(out, {p.name for p in plans}, set())  # temp files of a killed build
                return out, scenario, False
            for name, problem in damaged.items():
                log(f"{out / name}: {problem}; rebuilding")
            redo = [p for p in plans if p.name in damaged]
            fresh = {e["name"]: e for e in _write(redo, out, job, progress, parallel, placement)}
            entries = [fresh.get(e["name"], e) for e in old["shards"]]
            if old.get("format") != FORMAT_VERSION:  # upgrade: record sizes
                entries = [{**e, "bytes": storage.size(out / e["name"])} for e in entries]
            src_info = {k: old[k] for k in ("source", "num_classes", "class_names", "image_shape")}
            _write_manifest(out, fingerprint, src_info, entries, scenario)
            _cleanup(out, {e["name"] for e in entries}, set())
            return out, scenario, bool(redo)

    listing = list_once(_portable_data(job.data), job.seed)  # the tree's one walk
    src = open_source(job.data, job.seed, listing)
    heldout = getattr(job.scenario, "heldout_classes", 0)
    kw = {"heldout": heldout} if heldout else {}
    scenario = build_scenario(
        src.train_labels, src.test_labels, job.scenario, job.seed,
        job.data.train_per_class, job.data.test_per_class, **kw,
    )  # fmt: skip
    plans = plan_shards(scenario, size)
    # What earlier builds listed, for the cleanup; kept on disk until it ran, so a build
    # killed half-way still knows which files are ours.
    listed = set(_read_previous(out))
    if old:
        listed |= {s["name"] for s in old.get("shards", [])}
        atomic_write_bytes(out / PREVIOUS, json.dumps(sorted(listed)).encode())
        storage.delete(out / MANIFEST)  # a folder being rewritten must not look complete
    entries = _write(plans, out, job, progress, parallel, placement, listing)
    src_info = {
        "source": src.name,
        "num_classes": src.num_classes,
        "class_names": list(src.class_names),
        "image_shape": list(src.image_shape),
    }
    _write_manifest(out, fingerprint, src_info, entries, scenario)
    _cleanup(out, {p.name for p in plans}, listed)
    return out, scenario, True


def _read_previous(out: Loc) -> list[str]:
    try:
        names = json.loads(storage.read_bytes(out / PREVIOUS))
    except (OSError, json.JSONDecodeError):
        return []
    return [n for n in names if isinstance(n, str)]


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
            from distcl.data.readers import iter_shard  # torch and WebDataset: only here

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
