"""Tests of distcl.data.shards and ``distcl data``: round trip of real shard files against
the source, manifest counts and sha256, idempotent atomic rebuilds, truncated shards,
the exact (embedding) split over ranks x loader workers, and the training split's equal
batch counts per DDP rank.

Run: ``.venv/bin/python -m pytest tests/test_shards.py -q``
"""

from __future__ import annotations

import collections
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml

from distcl.cli import main
from distcl.data.readers import iter_items, iter_shard, load_arrays, train_batches
from distcl.data.scenario import build_scenario
from distcl.data.shards import (
    MANIFEST,
    ShardError,
    batches_per_epoch,
    build_shards,
    decode_image,
    item_split,
    load_manifest,
    shard_counts,
    shard_paths,
    verify_shards,
)
from distcl.data.sources import open_source

# Fewer items where a test only needs a few shards (writing a sample costs ~2 ms).
TINY = {"synthetic_train_per_class": 8, "synthetic_test_per_class": 2}
SMALL = {"synthetic_train_per_class": 16, "synthetic_test_per_class": 4}


def file_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: unchanged means not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def built(make_job, tmp_path_factory):
    """Shards of a 2-task synthetic job: 8 classes x 32 train items -> 128 train items per
    task in 8 shards of 16; 8 x 8 test items -> 32 gallery items per task in 2 shards."""
    job = make_job(tmp_path_factory.mktemp("built"), scenario={"tasks": 2})
    out, scen, rebuilt = build_shards(job)
    return job, out, scen, rebuilt


def test_round_trip_equals_source(built):
    job, out, scen, rebuilt = built
    assert rebuilt is True and out == job.shards_dir
    src = open_source(job.data, job.seed)
    assert scen.digest() == build_scenario(src.train_labels, src.test_labels, job.scenario,
                                           job.seed).digest()  # fmt: skip
    for task in scen.tasks:
        for split, items in (("train", task.train_items), ("gallery", task.gallery_items)):
            keys, images, labels, metas = load_arrays(shard_paths(out, task.index, split))
            src_split = "train" if split == "train" else "test"
            order = np.argsort([m["index"] for m in metas])
            assert [metas[i]["index"] for i in order] == items.tolist()
            assert [keys[i] for i in order] == [f"{src_split}-{i:07d}" for i in items]
            expected = np.stack([src.image(src_split, i) for i in items])  # (n, 1, 16, 16)
            np.testing.assert_array_equal(images[order], expected)
            np.testing.assert_array_equal(labels[order], src.labels(src_split)[items])
            assert all(m["task"] == task.index and m["split"] == split for m in metas)


def test_manifest_counts_and_sha256(built):
    job, out, scen, _ = built
    manifest = load_manifest(out)
    assert manifest["fingerprint"] == job.data_fingerprint()
    assert manifest["num_classes"] == 8 and manifest["image_shape"] == [1, 16, 16]
    assert manifest["source"] == "synthetic"
    names = [s["name"] for s in manifest["shards"]]
    assert names[:9] == [f"task00-train-{k:05d}.tar" for k in range(8)] + [
        "task00-gallery-00000.tar"
    ]
    for s in manifest["shards"]:
        path = out / s["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        with tarfile.open(path) as tar:  # an independent reader: 3 members per sample
            assert len(tar.getnames()) == 3 * s["count"]
        assert s["count"] <= job.data.shard_size
    for task in scen.tasks:
        for split, items in (("train", task.train_items), ("gallery", task.gallery_items)):
            counts = [s["count"] for s in manifest["shards"]
                      if s["task"] == task.index and s["split"] == split]  # fmt: skip
            assert sum(counts) == len(items)
    assert sum(shard_counts(out).values()) == 2 * (128 + 32)
    assert verify_shards(out, deep=True) == {"shards": 20, "samples": 320}
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_rebuild_same_inputs_rewrites_nothing(built):
    job, out, scen, _ = built
    before = file_state(out)
    out2, scen2, rebuilt = build_shards(job)
    assert rebuilt is False and out2 == out and scen2.digest() == scen.digest()
    assert file_state(out) == before


def test_shards_are_byte_identical_across_builds(make_job, tmp_path):
    one = make_job(tmp_path / "one", data=TINY)
    two = make_job(tmp_path / "two", data=TINY)
    assert one.data_fingerprint() == two.data_fingerprint()
    out1, _, _ = build_shards(one)
    out2, _, rebuilt = build_shards(two)
    assert rebuilt is True and out2 != out1
    assert load_manifest(out2)["shards"] == load_manifest(out1)["shards"]  # names + sha256


def test_changed_config_rebuilds(synthetic_job, tmp_path):
    shared = str(tmp_path / "shards")
    job = synthetic_job(data={"shards_dir": shared, **TINY}, scenario={"tasks": 4})
    _, _, rebuilt = build_shards(job)
    assert rebuilt is True
    old_names = set(shard_counts(shared))
    changed = synthetic_job(data={"shards_dir": shared, **TINY}, scenario={"tasks": 2}, seed=1)
    _, scen, rebuilt = build_shards(changed)
    assert rebuilt is True and scen.num_tasks == 2
    assert load_manifest(shared)["fingerprint"] == changed.data_fingerprint()
    verify_shards(shared, deep=True)
    # The previous config's task02/03 shards do not linger beside the new manifest.
    on_disk = {p.name for p in Path(shared).glob("*.tar")}
    assert on_disk == set(shard_counts(shared)) and on_disk != old_names
    # Default shards_dir: a changed config lands in its own folder.
    a, b = synthetic_job(), synthetic_job(seed=1)
    assert a.shards_dir != b.shards_dir and a.shards_dir.parent == b.shards_dir.parent


def test_damaged_shard_is_named_and_only_it_rebuilt(synthetic_job):
    job = synthetic_job(data=SMALL, scenario={"tasks": 2, "max_tasks": 1})
    out, _, _ = build_shards(job)
    manifest = load_manifest(out)
    victim = out / "task00-train-00003.tar"
    victim.write_bytes(victim.read_bytes()[:1000])
    before = {k: v for k, v in file_state(out).items() if k != victim.name}
    said: list[str] = []
    _, _, rebuilt = build_shards(job, log=said.append)
    assert rebuilt is True
    assert said == [f"{victim}: size differs from manifest (1000 bytes, manifest says "
                    f"{victim.stat().st_size}); rebuilding"]  # fmt: skip
    after = file_state(out)
    assert {k: after[k] for k in before if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }  # every other shard untouched
    assert load_manifest(out) == manifest  # same bytes again: the same entries
    verify_shards(out, deep=True)


# ---------------------------------------------------------------- damaged files


@pytest.fixture
def small_shards(synthetic_job):
    job = synthetic_job(data=SMALL, scenario={"tasks": 2, "max_tasks": 1})
    out, _, _ = build_shards(job)
    return out


def test_truncated_shard_named_by_verify_and_iter(small_shards):
    out = small_shards
    victim = out / "task00-train-00001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="task00-train-00001.tar: size differs from manifest"):
        verify_shards(out)  # quick: sizes
    with pytest.raises(ShardError, match="task00-train-00001.tar: sha256 differs"):
        verify_shards(out, deep=True)
    with pytest.raises(ShardError, match="task00-train-00001.tar: cannot read shard"):
        list(iter_shard(victim))


def test_shard_truncated_at_sample_boundary(small_shards):
    # A cut between two samples leaves a well-formed prefix: the reader must still notice.
    victim = small_shards / "task00-train-00002.tar"
    data = victim.read_bytes()
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    third = members[3 * 3 - 1]  # last member of the third sample
    cut = third.offset_data + (third.size + 511) // 512 * 512
    victim.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="task00-train-00002.tar"):
        list(iter_shard(victim))


def test_missing_shard_and_manifest(small_shards, tmp_path):
    out = small_shards
    (out / "task00-gallery-00000.tar").unlink()
    with pytest.raises(ShardError, match="task00-gallery-00000.tar: missing shard"):
        verify_shards(out)
    with pytest.raises(ShardError, match="no manifest .*distcl data build"):
        verify_shards(tmp_path / "empty")
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="corrupt manifest"):
        load_manifest(out)


# ---------------------------------------------------------------- exact split


@pytest.mark.parametrize("split", ["train", "gallery"])
def test_item_split_covers_every_sample_once_in_balanced_ranges(built, split):
    _, out, scen, _ = built
    counts = shard_counts(out)
    shards = [(str(p), counts[p.name]) for p in shard_paths(out, [0, 1], split)]
    everything = [k for k, *_ in iter_items([(p, c, 0, c) for p, c in shards], decode=False)]
    parts = {
        (rank, worker): [k for k, *_ in iter_items(item_split(shards, rank, 2, worker, 2))]
        for rank in range(2)
        for worker in range(2)
    }
    sizes = [len(v) for v in parts.values()]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) > 0  # balanced, every reader busy
    joined = [k for keys in parts.values() for k in keys]
    assert joined == everything  # each sample once, and the readers' ranges in order
    for rank in range(2):  # a rank's loader workers together hold the rank's own range
        assert parts[rank, 0] + parts[rank, 1] == [
            k for k, *_ in iter_items(item_split(shards, rank, 2), decode=False)
        ]


def test_item_split_golden():
    shards = [("a", 4), ("b", 4), ("c", 4), ("d", 0), ("e", 3)]  # 15 items, 2 ranks
    assert item_split(shards, 0, 2) == [("a", 4, 0, 4), ("b", 4, 0, 3)]
    assert item_split(shards, 1, 2) == [("b", 4, 3, 4), ("c", 4, 0, 4), ("e", 3, 0, 3)]
    # 5 equal shards over 2 ranks: 2.5 shards each (by whole shards: 3 and 2)
    five = [(str(i), 400) for i in range(5)]
    assert [sum(b - a for *_, a, b in item_split(five, r, 2)) for r in range(2)] == [1000, 1000]
    # more readers than items: some get nothing, none gets an item twice
    got = [item_split([("a", 3)], r, 2, w, 2) for r in range(2) for w in range(2)]
    assert got == [[], [("a", 3, 0, 1)], [("a", 3, 1, 2)], [("a", 3, 2, 3)]]


def test_iter_items_decodes_only_its_range_and_checks_the_whole_count(built, monkeypatch):
    from distcl.data import readers

    _, out, _, _ = built
    counts = shard_counts(out)
    path = str(shard_paths(out, 0, "train")[0])
    n = counts[Path(path).name]
    calls = []
    monkeypatch.setattr(readers, "decode_image", lambda b: calls.append(1) or decode_image(b))
    got = list(iter_items([(path, n, 1, 3)]))
    assert len(got) == 2 == len(calls) and got[0][1].dtype == np.uint8
    # The piece that ends where the shard ends reads it to the end: the count is checked
    # there (one reader per shard); a piece ending before stops reading at its end.
    with pytest.raises(ShardError, match=Path(path).name):
        list(iter_items([(path, n + 1, n - 1, n + 1)], decode=False))
    assert len(list(iter_items([(path, n + 1, 0, 1)], decode=False))) == 1


# ---------------------------------------------------------------- training split


def test_batches_per_epoch_golden():
    assert batches_per_epoch(128, 2, 16) == 4
    assert batches_per_epoch(100, 2, 16) == 3  # floor: the tail is dropped
    assert batches_per_epoch(10, 4, 16) == 1  # never zero


def rank_keys(paths, total, rank, world, batch, epoch=0, seed=0, loaders=0):
    out = []
    for images, labels, keys in train_batches(paths, total, rank, world, batch, seed, epoch,
                                              loader_workers=loaders):  # fmt: skip
        images, labels = np.asarray(images), np.asarray(labels)  # tensors from a DataLoader
        assert images.shape == (len(keys), 1, 16, 16) and images.dtype == np.uint8
        assert labels.shape == (len(keys),) and labels.dtype == np.int64
        out.append(list(keys))
    return out


@pytest.mark.parametrize(
    ("case", "world", "batch", "loaders"),
    [
        ("equal", 2, 16, 0),  # 8 shards of 16
        ("equal", 3, 8, 0),  # 8 shards dealt 3/3/2: unequal shares per rank
        ("one-shard", 3, 4, 0),  # fewer shards than ranks: sample-level split
        ("unequal", 2, 10, 0),  # shards of 16, 16, 5, 16, 3
        ("equal", 2, 16, 2),  # 4 readers (2 ranks x 2 loader workers), 2 shards each
        ("equal", 3, 8, 2),  # 6 readers, 8 shards: 5 batches per rank split 3 + 2
        ("one-shard", 2, 4, 3),  # 6 readers, 1 shard: split by sample in the loaders
        ("unequal", 2, 10, 2),
    ],
)
def test_train_batches_equal_counts_per_rank(built, case, world, batch, loaders):
    _, out, _, _ = built
    paths = shard_paths(out, 0, "train")
    counts = shard_counts(out)
    if case == "one-shard":
        paths = paths[:1]
    elif case == "unequal":
        # Real shards of unequal sizes: rewrite two shards with only part of their samples.
        paths = paths[:5]
        for p, keep in ((paths[2], 5), (paths[4], 3)):
            cut = p.with_name(f"cut-{keep}-{p.name}")
            with wds.TarWriter(str(cut)) as writer:
                for key, img, lab, meta in list(iter_shard(p))[:keep]:
                    writer.write({"__key__": key, "png": img[0], "cls": lab, "json": meta})
            counts[cut.name] = keep
        paths = [paths[0], paths[1], paths[2].with_name(f"cut-5-{paths[2].name}"),
                 paths[3], paths[4].with_name(f"cut-3-{paths[4].name}")]  # fmt: skip
    total = sum(counts[p.name] for p in paths)
    expected = batches_per_epoch(total, world, batch)
    per_rank = [rank_keys(paths, total, r, world, batch, loaders=loaders) for r in range(world)]
    assert [len(b) for b in per_rank] == [expected] * world
    assert all(len(keys) == batch for batches in per_rank for keys in batches)
    if case == "one-shard":  # ranks split the shard's samples: no sample on two ranks
        sets = [{k for keys in b for k in keys} for b in per_rank]
        assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    # Seeded: the same batches again with the same number of loader workers.
    assert per_rank[0] == rank_keys(paths, total, 0, world, batch, loaders=loaders)


def test_loader_workers_epoch_has_no_repeats_when_shares_suffice(built):
    # 8 equal shards over 2 ranks x 2 loader workers: 2 shards (32 samples, 2 batches) per
    # reader, so the epoch shows every sample once, decoded in the loader processes.
    _, out, _, _ = built
    paths = shard_paths(out, 0, "train")
    keys = [k for r in range(2) for b in rank_keys(paths, 128, r, 2, 16, loaders=2) for k in b]
    assert len(keys) == len(set(keys)) == 128


def test_loader_quotas():
    from distcl.data.shardio import loader_quotas

    assert loader_quotas(5, 2) == [3, 2] and loader_quotas(4, 4) == [1, 1, 1, 1]
    assert sum(loader_quotas(17, 3)) == 17 and loader_quotas(1, 1) == [1]


def test_sample_split_decodes_only_kept_samples(built, monkeypatch):
    """With fewer shards than readers, a reader decodes its own samples only."""
    from distcl.data import readers

    _, out, _, _ = built
    calls = []
    monkeypatch.setattr(readers, "decode_image", lambda b: calls.append(1) or decode_image(b))
    rank_keys(shard_paths(out, 0, "train")[:1], 16, 1, 4, 2)  # 16 samples, 4 ranks: 2 batches
    assert len(calls) == 4  # this rank's 4 samples, not all 16


def test_embed_shards_same_with_loader_workers(built, monkeypatch):
    """The end-of-task embedding pass gives the same rows decoded in loader processes, and
    whatever its forward batch."""
    import torch

    from distcl.train import embedding
    from distcl.train.embedding import embed_shards

    class Mean(torch.nn.Module):  # a fixed "model": the image's mean per row block
        embedding_dim = 4

        def embed(self, x):
            return torch.nn.functional.normalize(x.flatten(1).view(len(x), 4, -1).mean(2) + 1)

    _, out, _, _ = built
    counts = shard_counts(out)
    shards = [(str(p), counts[p.name]) for p in shard_paths(out, [0, 1], "train")]
    a = embed_shards(Mean(), shards, torch.device("cpu"))
    b = embed_shards(Mean(), shards, torch.device("cpu"), loader_workers=2)
    assert len(a["keys"]) == 256 and sorted(a["keys"]) == sorted(b["keys"])
    ia, ib = np.argsort(a["keys"]), np.argsort(b["keys"])
    for f in ("labels", "tasks", "emb"):
        np.testing.assert_array_equal(a[f][ia], b[f][ib])
    # The forward batch depends on the device only (small on CPU); rows and order do not.
    assert embedding.embed_batch(torch.device("cpu")) == 64 and embedding.embed_batch("cuda") == 256
    monkeypatch.setitem(embedding.EMBED_BATCH, "cpu", 7)  # 256 rows: 36 batches and a short one
    c = embed_shards(Mean(), shards, torch.device("cpu"))
    for f in ("keys", "labels", "tasks", "emb"):
        np.testing.assert_array_equal(a[f], c[f])


def test_embedding_on_cpu_uses_a_channels_last_copy_and_leaves_the_model_alone(built):
    """The CPU embedding pass runs a channels-last copy of a conv model (faster convolutions):
    the same embeddings up to float rounding, the trained model's layout untouched."""
    import torch

    from distcl.train import embedding

    class Conv(torch.nn.Module):
        embedding_dim = 6

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(6),
            )  # fmt: skip

        def embed(self, x):
            x = x if x.dim() == 4 else x[:, None]
            return torch.nn.functional.normalize(self.net(x))

    _, out, _, _ = built
    counts = shard_counts(out)
    shards = [(str(p), counts[p.name]) for p in shard_paths(out, [0, 1], "train")]
    model = Conv()
    first = next(embedding.embed_batches(embedding.item_split(shards, 0, 1), 4))[0]
    model.embed(torch.as_tensor(first).float())  # materialise the lazy layer
    model.eval()
    copy = embedding._inference_model(model, torch.device("cpu"))
    assert copy is not model and copy.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.net[0].weight.is_contiguous()  # the trained model keeps its layout
    assert embedding._inference_model(model, "cuda") is model
    got = embedding.embed_shards(model, shards, torch.device("cpu"))
    with torch.no_grad():
        images = np.concatenate([b[0] for b in embedding.embed_batches(
            embedding.item_split(shards, 0, 1), 64)])  # fmt: skip
        want = model.embed(torch.as_tensor(images).float().div_(255.0)).numpy()
    np.testing.assert_allclose(got["emb"], want, atol=1e-5)


def test_shard_labels_equal_the_embedding_pass_without_decoding(built, monkeypatch):
    """Random exemplar selection reads candidates' keys and labels only: the same rows as
    the embedding pass, no image decoded; a shard shorter than its count is named."""
    from distcl.data import readers
    from distcl.train import embedding, endtask

    class Flat:
        embedding_dim = 2

        def embed(self, x):
            return x.flatten(1)[:, :2]

    _, out, _, _ = built
    counts = shard_counts(out)
    shards = [(str(p), counts[p.name]) for p in shard_paths(out, [0, 1], "train")]
    full = embedding.embed_shards(Flat(), shards, "cpu")
    calls = []
    monkeypatch.setattr(readers, "decode_image", lambda b: calls.append(1) or decode_image(b))
    quick = endtask.shard_labels(shards)
    assert calls == [] and quick["emb"].shape == (256, 0)
    np.testing.assert_array_equal(quick["keys"], full["keys"])
    np.testing.assert_array_equal(quick["labels"], full["labels"])
    path, n = shards[0]
    with pytest.raises(Exception, match=Path(path).name):
        endtask.shard_labels([(path, n + 1)])


def test_train_epoch_has_no_repeats_when_shares_suffice(built):
    # 8 equal shards over 2 ranks: each rank's 64 samples fill exactly 4 batches of 16,
    # so an epoch shows every one of them once.
    _, out, _, _ = built
    paths = shard_paths(out, 0, "train")
    seen = []
    for rank in range(2):
        keys = [k for b in rank_keys(paths, 128, rank, 2, 16) for k in b]
        assert len(keys) == len(set(keys)) == 64
        seen += keys
    assert len(set(seen)) == 128


def test_train_batches_differ_across_epochs(built):
    _, out, _, _ = built
    paths = shard_paths(out, 0, "train")
    for rank in range(2):
        e0 = rank_keys(paths, 128, rank, 2, 16, epoch=0)
        e1 = rank_keys(paths, 128, rank, 2, 16, epoch=1)
        assert e0 != e1
        assert e0 == rank_keys(paths, 128, rank, 2, 16, epoch=0)  # seeded: reproducible


def test_train_batches_labels_match_keys(built):
    job, out, _, _ = built
    src = open_source(job.data, job.seed)
    paths = shard_paths(out, 1, "train")
    for _images, labels, keys in train_batches(paths, 128, 0, 2, 16, 0, 0):
        idx = [int(k.split("-")[1]) for k in keys]
        np.testing.assert_array_equal(labels, src.train_labels[idx])


def test_train_batches_errors(tmp_path, built):
    with pytest.raises(ShardError, match="no shards"):
        next(train_batches([], 10, 0, 2, 4, 0, 0))
    empty = tmp_path / "empty.tar"
    with wds.TarWriter(str(empty)):
        pass
    with pytest.raises(ShardError, match="no samples"):
        next(train_batches([empty], 0, 0, 1, 4, 0, 0))
    # One sample, two ranks: rank 1 would wait forever for a sample of its own.
    _, out, _, _ = built
    one = tmp_path / "one.tar"
    with wds.TarWriter(str(one)) as writer:
        key, img, lab, meta = next(iter_shard(shard_paths(out, 0, "train")[0]))
        writer.write({"__key__": key, "png": img[0], "cls": lab, "json": meta})
    next(train_batches([one], 1, 0, 2, 4, 0, 0))  # rank 0 repeats its only sample
    with pytest.raises(ShardError, match="no samples"):
        next(train_batches([one], 1, 1, 2, 4, 0, 0))


# ---------------------------------------------------------------- CLI


def test_cli_data_build_and_verify(tmp_path, synthetic_raw_job, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(synthetic_raw_job(tmp_path, data=TINY, scenario={"tasks": 2})))
    assert main(["data", "build", str(path), "--local"]) == 0
    assert "built; 6 shards, 80 samples" in capsys.readouterr().out
    assert main(["data", "build", str(path), "--local"]) == 0
    assert "up to date (nothing rewritten)" in capsys.readouterr().out
    assert main(["data", "verify", str(path), "--deep"]) == 0
    assert "OK (6 shards, 80 samples)" in capsys.readouterr().out
    assert main(["data", "verify", str(path), "--smoke"]) == 2  # smoke shards not built
    assert "no manifest" in capsys.readouterr().err


def test_cli_bad_job_exit_2(tmp_path, synthetic_raw_job, capsys):
    raw = synthetic_raw_job(tmp_path)
    raw["train"]["epoch"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", "build", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert "distcl: error:" in err and str(path) in err and "train.epoch" in err
    assert main(["data", "build", str(path), "--local", "--set", "train.epoch"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_cli_missing_fashion_mnist_exit_2(tmp_path, capsys):
    nowhere = tmp_path / "no-fashion"
    path = tmp_path / "fm.yaml"
    job = {
        "name": "fm",
        "data": {"source": "fashion-mnist", "root": str(nowhere)},
        "output": {"root": str(tmp_path)},
    }
    path.write_text(json.dumps(job))
    assert main(["data", "build", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and str(nowhere) in err


def test_keys_unique_across_tasks(built):
    _, out, _, _ = built
    keys = load_arrays(shard_paths(out, [0, 1], "train"))[0]
    assert max(collections.Counter(keys).values()) == 1


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_a_shard_has_the_bytes_webdatasets_writer_gives(ext):
    """distcl writes shards without WebDataset (it imports torch); the bytes are the ones
    ``webdataset.TarWriter(f, mtime=0)`` writes for the same samples."""
    import io

    import webdataset as wds

    from distcl.data.shards import TarShard

    rng = np.random.default_rng(0)
    samples = [(f"train-{i:07d}", rng.bytes(100 + 37 * i), int(rng.integers(0, 1000)),
                {"task": 1, "split": "train", "index": i}) for i in range(5)]  # fmt: skip
    ours, theirs = io.BytesIO(), io.BytesIO()
    with TarShard(ours) as writer:
        for key, image, label, meta in samples:
            writer.write(key, ext, image, label, meta)
    with wds.TarWriter(theirs, mtime=0) as writer:
        for key, image, label, meta in samples:
            writer.write({"__key__": key, ext: image, "cls": label, "json": meta})
    assert ours.getvalue() == theirs.getvalue()
