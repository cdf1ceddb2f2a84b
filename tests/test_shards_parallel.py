"""Parallel shard building on real Ray: one task per shard, the same bytes whatever the
number of tasks, nothing rewritten on a rebuild, only damaged shards rebuilt (and named),
short reads caught, cleanup limited to what a manifest listed, JPEG and held-out shards.

Run: ``.venv/bin/python -m pytest tests/test_shards_parallel.py -q`` (marker ``ray``)
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from distcl.data import shards
from distcl.data.readers import iter_shard, load_arrays
from distcl.data.scenario import build_scenario
from distcl.data.shards import (
    MANIFEST,
    PREVIOUS,
    ShardError,
    build_shards,
    load_manifest,
    plan_shards,
    shard_paths,
    verify_shards,
    write_shards_serial,
)
from distcl.data.sources import open_source

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]  # conftest.py

TINY = {"synthetic_train_per_class": 8, "synthetic_test_per_class": 2}


@pytest.fixture(autouse=True)
def ray_even_when_small(monkeypatch):
    """These builds are small (a job writes them in-process): keep them on Ray tasks."""
    monkeypatch.setattr(shards, "SERIAL_BELOW", 0)


def test_small_builds_stay_in_process_unless_asked(make_job, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SERIAL_BELOW", 4096)
    calls, serial = [], shards.write_shards_serial
    monkeypatch.setattr(shards, "write_shards_ray", lambda *a, **k: calls.append(1) or serial(*a))
    build_shards(make_job(tmp_path / "a", data=TINY, scenario={"tasks": 2}))
    assert calls == []  # 80 samples: no Ray task workers to start
    build_shards(make_job(tmp_path / "b", data=TINY, scenario={"tasks": 2}), parallel=2)
    assert calls == [1]


def file_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


# ---------------------------------------------------------------- planning (pure)
def test_plan_covers_every_item_once_in_order(make_job, tmp_path):
    job = make_job(tmp_path, scenario={"tasks": 3})
    src = open_source(job.data, job.seed)
    scen = build_scenario(src.train_labels, src.test_labels, job.scenario, job.seed, heldout=2)
    plans = plan_shards(scen, 5)
    for task in scen.tasks:
        for split, items in (("train", task.train_items), ("gallery", task.gallery_items)):
            mine = [p for p in plans if p.task == task.index and p.split == split]
            assert [p.name for p in mine] == [
                f"task{task.index:02d}-{split}-{k:05d}.tar" for k in range(len(mine))
            ]
            assert np.concatenate([p.indices for p in mine]).tolist() == items.tolist()
            assert all(len(p.indices) <= 5 for p in mine)
    held = [p for p in plans if p.task == -1]
    assert held and all(
        p.split == "gallery" and p.name.startswith("heldout-gallery-") for p in held
    )
    assert np.concatenate([p.indices for p in held]).tolist() == scen.heldout_items.tolist()
    assert len({p.name for p in plans}) == len(plans)
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(scen, 0)


# ---------------------------------------------------------------- building with Ray
def test_ray_build_same_bytes_as_serial_and_any_parallelism(make_job, tmp_path):
    seen: list[tuple[int, int]] = []
    job = make_job(tmp_path / "a", data=TINY, scenario={"tasks": 2})
    out, scen, rebuilt = build_shards(job, progress=lambda d, t: seen.append((d, t)))
    assert rebuilt
    manifest = load_manifest(out)
    total = sum(s["count"] for s in manifest["shards"])
    assert len(seen) == len(manifest["shards"]) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # One task in flight, then the single-process writer: the same names, sizes, hashes.
    one = make_job(tmp_path / "b", data=TINY, scenario={"tasks": 2})
    out1, _, _ = build_shards(one, parallel=1)
    assert load_manifest(out1)["shards"] == manifest["shards"]
    serial_dir = tmp_path / "serial"
    serial_dir.mkdir()
    entries = write_shards_serial(
        plan_shards(scen, job.data.shard_size), str(serial_dir), job.data, job.seed
    )
    assert entries == manifest["shards"]
    for s in manifest["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
        assert (serial_dir / s["name"]).read_bytes() == (out / s["name"]).read_bytes()
    assert verify_shards(out, deep=True)["samples"] == total
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files


def test_ray_rebuild_rewrites_nothing(make_job, tmp_path):
    job = make_job(tmp_path, data=TINY, scenario={"tasks": 2})
    out, scen, _ = build_shards(job)
    before = file_state(out)
    out2, scen2, rebuilt = build_shards(job, log=lambda m: pytest.fail(m))
    assert not rebuilt and scen2.digest() == scen.digest() and file_state(out) == before


def test_damaged_at_start_named_and_only_it_rebuilt(make_job, tmp_path):
    job = make_job(tmp_path, data=TINY, scenario={"tasks": 2})
    out, _, _ = build_shards(job)
    entries = load_manifest(out)["shards"]
    victim = out / entries[2]["name"]
    gone = out / entries[5]["name"]
    victim.write_bytes(victim.read_bytes() + b"junk")
    gone.unlink()
    before = file_state(out)
    said: list[str] = []
    _, _, rebuilt = build_shards(job, log=said.append)
    assert rebuilt
    assert said == [
        f"{victim}: size differs from manifest ({entries[2]['bytes'] + 4} bytes, manifest says "
        f"{entries[2]['bytes']}); rebuilding",
        f"{gone}: missing shard listed in manifest; rebuilding",
    ]
    after = file_state(out)
    untouched = set(before) - {victim.name, MANIFEST}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    assert load_manifest(out)["shards"] == entries
    verify_shards(out, deep=True)


def _spoil_header(path: Path, sample: int) -> None:
    """Overwrite the tar header of ``sample``'s first member, keeping the file size: tar
    then reads a clean but shorter archive (seen in issue 15)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[3 * sample]
    data = bytearray(path.read_bytes())
    data[member.offset : member.offset + 512] = b"\x7f" * 512
    path.write_bytes(bytes(data))


def test_short_read_fails_naming_the_shard_and_the_next_build_repairs_it(make_job, tmp_path):
    job = make_job(tmp_path, data=TINY, scenario={"tasks": 2})
    out, _, _ = build_shards(job)
    victim = shard_paths(out, 0, "train")[1]
    count = load_manifest(out)["shards"][1]["count"]
    size = victim.stat().st_size
    _spoil_header(victim, 3)
    assert victim.stat().st_size == size  # a size check cannot see it
    with pytest.raises(ShardError, match=rf"{victim.name}: short read, 3 samples but the "
                       rf"manifest lists {count}"):  # fmt: skip
        list(iter_shard(victim))
    with pytest.raises(ShardError, match=victim.name):
        load_arrays(shard_paths(out, 0, "train"))  # every reader goes through iter_shard
    with pytest.raises(ShardError, match="short read"):  # explicit expected count
        list(iter_shard(victim, expected=count))
    said: list[str] = []
    _, _, rebuilt = build_shards(job, log=said.append)  # a re-run repairs it
    assert rebuilt and len(said) == 1
    assert said[0].startswith(f"{victim}: found damaged by a reader (short read")
    assert sum(1 for _ in iter_shard(victim)) == count
    verify_shards(out, deep=True)
    assert not list(out.glob(".*damaged*"))


def test_explicit_expected_count(make_job, tmp_path):
    out, _, _ = build_shards(make_job(tmp_path, data=TINY, scenario={"tasks": 2}))
    path = shard_paths(out, 0, "gallery")[0]
    n = sum(1 for _ in iter_shard(path))
    assert sum(1 for _ in iter_shard(path, expected=n)) == n
    with pytest.raises(ShardError, match=rf"{path.name}: short read, {n} samples .* {n + 1}"):
        list(iter_shard(path, expected=n + 1))


def test_deep_verify_flags_a_flipped_byte_for_the_next_build(make_job, tmp_path):
    job = make_job(tmp_path, data=TINY, scenario={"tasks": 2})
    out, _, _ = build_shards(job)
    victim = shard_paths(out, 1, "train")[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first image: same size, valid tar
    victim.write_bytes(bytes(data))
    verify_shards(out)  # quick: sizes only
    with pytest.raises(ShardError, match=f"{victim.name}: sha256 differs"):
        verify_shards(out, deep=True)
    said: list[str] = []
    build_shards(job, log=said.append)
    assert len(said) == 1 and said[0].startswith(f"{victim}: found damaged")
    verify_shards(out, deep=True)


# ---------------------------------------------------------------- cleanup
def test_cleanup_deletes_only_what_a_manifest_listed(make_job, tmp_path):
    shared = str(tmp_path / "shards")
    four = make_job(tmp_path, data={"shards_dir": shared, **TINY}, scenario={"tasks": 4})
    build_shards(four)
    old = {s["name"] for s in load_manifest(shared)["shards"]}
    strangers = ["notes.txt", "task09-train-00000.tar", ".hidden", "other.tar"]
    for name in strangers:
        (Path(shared) / name).write_text("not ours")
    two = make_job(tmp_path, data={"shards_dir": shared, **TINY}, scenario={"tasks": 2}, seed=1)
    build_shards(two)
    new = {s["name"] for s in load_manifest(shared)["shards"]}
    on_disk = {p.name for p in Path(shared).iterdir()}
    assert on_disk == new | set(strangers) | {MANIFEST}
    assert old - new and not (old - new) & on_disk


def test_killed_rebuild_still_cleans_up_later(make_job, tmp_path, monkeypatch):
    shared = str(tmp_path / "shards")
    four = make_job(tmp_path, data={"shards_dir": shared, **TINY}, scenario={"tasks": 4})
    build_shards(four)
    old = {s["name"] for s in load_manifest(shared)["shards"]}
    two = make_job(tmp_path, data={"shards_dir": shared, **TINY}, scenario={"tasks": 2}, seed=1)

    def killed(*args, **kw):
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(shards, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        build_shards(two)
    assert not (Path(shared) / MANIFEST).exists()  # never looks complete
    assert set(json.loads((Path(shared) / PREVIOUS).read_text())) == old
    monkeypatch.undo()
    build_shards(two)
    new = {s["name"] for s in load_manifest(shared)["shards"]}
    assert {p.name for p in Path(shared).iterdir()} == new | {MANIFEST}


# ---------------------------------------------------------------- formats, held-out
def test_jpeg_shards_decode_close_to_the_source(make_job, tmp_path):
    png = make_job(tmp_path / "p", data=TINY, scenario={"tasks": 2})
    jpg = make_job(tmp_path / "j", data={**TINY, "image_format": "jpeg", "jpeg_quality": 90},
                   scenario={"tasks": 2})  # fmt: skip
    assert png.data_fingerprint() != jpg.data_fingerprint()
    out, scen, _ = build_shards(jpg)
    path = shard_paths(out, 0, "train")[0]
    with tarfile.open(path) as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"jpg", "cls", "json"}
    src = open_source(jpg.data, jpg.seed)
    keys, images, labels, metas = load_arrays([path])
    ref = np.stack([src.image("train", m["index"]) for m in metas]).astype(float)
    assert np.abs(images.astype(float) - ref).mean() < 8  # lossy, but the same pictures
    again = make_job(tmp_path / "j2", data={**TINY, "image_format": "jpeg", "jpeg_quality": 90},
                     scenario={"tasks": 2})  # fmt: skip
    out2, _, _ = build_shards(again, parallel=1)
    assert load_manifest(out2)["shards"] == load_manifest(out)["shards"]  # deterministic


def test_heldout_items_are_task_minus_one_gallery_shards(make_job, tmp_path):
    job = make_job(tmp_path, data=TINY, scenario={"tasks": 2, "heldout_classes": 2})
    out, scen, _ = build_shards(job)
    held = [s for s in load_manifest(out)["shards"] if s["task"] == -1]
    assert [s["name"] for s in held] == ["heldout-gallery-00000.tar"]
    assert held[0]["split"] == "gallery" and held[0]["count"] == len(scen.heldout_items) > 0
    keys, _, labels, metas = load_arrays(shard_paths(out, -1, "gallery"))
    assert sorted(m["index"] for m in metas) == scen.heldout_items.tolist()
    assert {m["task"] for m in metas} == {-1} and {m["split"] for m in metas} == {"gallery"}
    assert set(labels.tolist()) == set(scen.heldout_classes)
    assert not set(scen.heldout_classes) & set(scen.classes)


def test_ray_tasks_use_the_driver_listing_of_an_image_folder(synthetic_job, tmp_path):
    """Shard tasks open an image-folder source from the listing the driver made, never by
    walking the tree again: a file that appears after the listing (and would shift every
    later index of its class) changes no shard they write."""
    from PIL import Image

    from distcl.data.sources import list_image_folder

    tree = tmp_path / "tree"
    for cls, grey in (("cat", 60), ("dog", 160)):
        (tree / cls).mkdir(parents=True)
        for i in range(6):
            arr = np.full((8, 8, 3), grey, np.uint8)
            arr[0, 0] = i
            Image.fromarray(arr).save(tree / cls / f"{i:03d}.png")
    job = synthetic_job(data={"source": "image-folder", "root": str(tree), "image_size": 8,
                              "shard_size": 2}, scenario={"tasks": 2})  # fmt: skip
    listing = list_image_folder(str(tree), job.data.test_fraction, job.seed)
    src = open_source(job.data, job.seed, listing)
    scen = build_scenario(src.train_labels, src.test_labels, job.scenario, job.seed)
    plans = shards.plan_shards(scen, 2)
    ref, out = tmp_path / "ref", tmp_path / "ray"
    ref.mkdir()
    out.mkdir()
    want = write_shards_serial(plans, str(ref), job.data, job.seed, listing=listing)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "cat" / "000a.png")
    got = shards.write_shards_ray(plans, str(out), job.data, job.seed, listing=listing)
    assert got == want
