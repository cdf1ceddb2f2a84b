"""Tests of distcl.data.sources: IDX reading (golden and corrupt files), Fashion-MNIST
(real files when installed, else skipped; a tiny hand-written copy always), ImageFolder
trees and the synthetic source.

Run: ``.venv/bin/python -m pytest tests/test_sources.py -q``
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from distcl.config import DataConfig
from distcl.data.sources import (
    FASHION_MNIST_CLASSES,
    DataError,
    load_fashion_mnist,
    load_image_folder,
    make_synthetic,
    open_source,
    read_idx,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """Independent IDX encoder: magic 0x00000803-style header, big-endian dims, bytes."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion(folder: Path, n_train: int = 6, n_test: int = 3, gz: bool = True) -> dict:
    """A tiny Fashion-MNIST lookalike: the four IDX files with known content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) + 3) % 10,
    }
    for name, arr in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return arrays


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_golden(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    # Hand-written bytes: a 1-d IDX of three labels.
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x00\x09")
                     if gz else b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x00\x09")  # fmt: skip
    np.testing.assert_array_equal(read_idx(path), [7, 0, 9])


def corrupt_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = idx_bytes(np.ones((4, 5), np.uint8))
    # Compressible bytes, so the stream is real deflate data whose damage zlib reports.
    broken_deflate = bytearray(gzip.compress(b"distcl idx " * 400 + bytes(range(256)) * 8))
    broken_deflate[40] ^= 0xFF  # zlib.error: invalid literal/length code
    cases = {
        "magic": (b"\x08\x03\x00\x00" + good[4:], "not an unsigned-byte IDX"),
        "float-idx": (b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd", "not an unsigned-byte IDX"),
        "empty": (b"", "not an unsigned-byte IDX"),
        "short-header": (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        "truncated-body": (good[:-3], "truncated IDX file"),
        "long-body": (good + b"\x00", "truncated IDX file"),
    }
    out = {}
    for name, (data, words) in cases.items():
        path = tmp_path / f"{name}-idx1-ubyte"
        path.write_bytes(data)
        out[name] = (path, words)
    for name, data in {
        "gz-truncated": gzip.compress(good)[:-12],
        "gz-deflate": bytes(broken_deflate),
        "gz-garbage": b"\x1f\x8bnot gzip at all",
    }.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        out[name] = (path, "cannot read IDX file")
    return out


@pytest.mark.parametrize(
    "case",
    ["magic", "float-idx", "empty", "short-header", "truncated-body", "long-body",
     "gz-truncated", "gz-deflate", "gz-garbage"],
)  # fmt: skip
def test_corrupt_idx_names_file(tmp_path, case):
    path, words = corrupt_cases(tmp_path)[case]
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_missing_idx_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "absent-idx1-ubyte")


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "torchvision"])
def test_fashion_layouts(tmp_path, layout):
    folder = tmp_path / "fm"
    target = folder / "FashionMNIST" / "raw" if layout == "torchvision" else folder
    arrays = write_fashion(target, gz=layout != "flat-raw")
    src = load_fashion_mnist(str(folder))
    assert src.name == "fashion-mnist" and src.class_names == FASHION_MNIST_CLASSES
    assert src.num_classes == 10 and src.image_shape == (1, 28, 28)
    np.testing.assert_array_equal(src.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(src.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert src.train_labels.dtype == np.int64
    img = src.image("test", 2)
    assert img.shape == (1, 28, 28) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[0], arrays["t10k-images-idx3-ubyte"][2])
    np.testing.assert_array_equal(src.image("train", 5)[0], arrays["train-images-idx3-ubyte"][5])


def test_fashion_missing_says_where_and_how(tmp_path):
    where = tmp_path / "nothing-here"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(str(where))
    message = str(info.value)
    assert str(where) in message
    assert "apt-get install dataset-fashion-mnist" in message
    # The same through the job's data section.
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        open_source(DataConfig(source="fashion-mnist", root=str(where)), seed=0)


def test_fashion_missing_one_file(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_fashion_mnist(str(tmp_path))


def test_fashion_count_mismatch(tmp_path):
    write_fashion(tmp_path)
    labels = idx_bytes(np.zeros(5, np.uint8))  # 6 images, 5 labels
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(DataError, match="train has 6 images but 5 labels"):
        load_fashion_mnist(str(tmp_path))


@pytest.fixture(scope="module")
def real_fashion():
    if not REAL_FASHION.is_dir():
        pytest.skip(
            f"{REAL_FASHION} absent (sudo apt-get install dataset-fashion-mnist to run this)"
        )
    return open_source(DataConfig(source="fashion-mnist"), seed=0)  # root None: default dirs


def test_real_fashion_mnist(real_fashion):
    src = real_fashion
    assert len(src.train_labels) == 60000 and len(src.test_labels) == 10000
    assert src.num_classes == 10
    np.testing.assert_array_equal(np.bincount(src.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(src.test_labels), [1000] * 10)
    img = src.image("train", 0)
    assert img.shape == (1, 28, 28) and img.dtype == np.uint8 and img.max() > 0
    # First training label of Fashion-MNIST is 9 (ankle boot), first test label 9 too.
    assert src.train_labels[0] == 9 and src.test_labels[0] == 9


# ---------------------------------------------------------------- ImageFolder


def write_tree(root: Path, per_class: dict[str, int], size: int = 10) -> None:
    from PIL import Image

    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            value = 40 * (list(per_class).index(cls) + 1)
            arr = np.full((size, size + 2, 3), value, np.uint8)
            arr[0, 0] = i  # distinguishable images
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    (root / "ignored.txt").write_text("not an image")


def test_image_folder_one_tree_split(tmp_path):
    write_tree(tmp_path / "tree", {"cat": 10, "dog": 5})
    src = load_image_folder(str(tmp_path / "tree"), image_size=8, test_fraction=0.2, seed=0)
    assert src.class_names == ("cat", "dog") and src.image_shape == (3, 8, 8)
    assert np.bincount(src.test_labels).tolist() == [2, 1]  # round(0.2 * n) per class
    assert np.bincount(src.train_labels).tolist() == [8, 4]
    img = src.image("train", 0)
    assert img.shape == (3, 8, 8) and img.dtype == np.uint8
    assert abs(int(img[:, 4, 4].mean()) - 40) <= 1  # cat's grey level survives the resize
    again = load_image_folder(str(tmp_path / "tree"), 8, 0.2, seed=0)
    np.testing.assert_array_equal(again.test_labels, src.test_labels)


def test_image_folder_train_test_trees(tmp_path):
    write_tree(tmp_path / "ds" / "train", {"a": 3, "b": 2})
    write_tree(tmp_path / "ds" / "test", {"a": 1, "b": 1})
    src = open_source(DataConfig(source="image-folder", root=str(tmp_path / "ds"),
                                 image_size=6), seed=0)  # fmt: skip
    assert src.train_labels.tolist() == [0, 0, 0, 1, 1]
    assert src.test_labels.tolist() == [0, 1]
    assert src.image("test", 1).shape == (3, 6, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root: required"):
        load_image_folder(None, 8, 0.2, 0)
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(str(tmp_path / "absent"), 8, 0.2, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(str(tmp_path / "flat"), 8, 0.2, 0)
    write_tree(tmp_path / "ds" / "train", {"a": 1, "b": 1})
    write_tree(tmp_path / "ds" / "test", {"a": 1, "c": 1})
    with pytest.raises(DataError, match="different class folders"):
        load_image_folder(str(tmp_path / "ds"), 8, 0.2, 0)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_image_folder(str(tmp_path / "noimg"), 8, 0.2, 0)


def test_image_folder_undecodable_image_names_file(tmp_path):
    write_tree(tmp_path / "tree", {"a": 2})
    bad = tmp_path / "tree" / "a" / "000.png"
    bad.write_bytes(b"not a png")
    src = load_image_folder(str(tmp_path / "tree"), 8, 0.0, 0)
    with pytest.raises(DataError, match="000.png: cannot decode image"):
        src.image("train", 0)


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_determinism_and_learnability():
    src = make_synthetic(classes=5, train_per_class=20, test_per_class=6, size=12, seed=3)
    assert src.num_classes == 5 and src.image_shape == (1, 12, 12)
    assert np.bincount(src.train_labels).tolist() == [20] * 5
    assert np.bincount(src.test_labels).tolist() == [6] * 5
    train = np.stack([src.image("train", i) for i in range(100)]).astype(float)  # (100, 1, 12, 12)
    test = np.stack([src.image("test", i) for i in range(30)]).astype(float)  # (30, 1, 12, 12)
    assert train.shape == (100, 1, 12, 12)
    same = make_synthetic(5, 20, 6, 12, seed=3)
    other = make_synthetic(5, 20, 6, 12, seed=4)
    np.testing.assert_array_equal(same.image("train", 7), src.image("train", 7))
    assert not np.array_equal(other.image("train", 7), src.image("train", 7))
    # Learnable: nearest class mean of the training images classifies the test images.
    means = np.stack([train[src.train_labels == c].mean(0) for c in range(5)])  # (5, 1, 12, 12)
    dists = ((test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))  # (30, 5)
    assert (dists.argmin(1) == src.test_labels).mean() >= 0.9


def test_image_folder_tree_is_walked_once_per_build(tmp_path, synthetic_job, monkeypatch):
    """The driver lists the tree once and hands the listing to every shard writer (Ray tasks
    or this process): no writer walks it again, and a file added after the listing is not
    seen by any of them."""
    from distcl.data import shards as sh
    from distcl.data import sources as so

    write_tree(tmp_path / "tree", {"cat": 6, "dog": 6})
    walks = []
    real = so._scan_tree
    monkeypatch.setattr(so, "_scan_tree", lambda root: walks.append(root) or real(root))
    job = synthetic_job(data={"source": "image-folder", "root": str(tmp_path / "tree"),
                              "image_size": 8, "shard_size": 2},
                        scenario={"tasks": 2})  # fmt: skip
    out, scenario, _ = sh.build_shards(job)
    assert len(walks) == 1  # one walk for 6 shards (it was one per writer process before)
    listing = so.list_image_folder(str(tmp_path / "tree"), job.data.test_fraction, job.seed)
    from PIL import Image

    # cat/000a.png appears after the listing: it would shift every later index of cat
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tree" / "cat" / "000a.png")
    plan = sh.plan_shards(scenario, 2)[0]
    (tmp_path / "again").mkdir()
    entry = sh.write_shard(plan, str(tmp_path / "again"), job.data, job.seed, listing=listing)
    assert entry["sha256"] == sh.load_manifest(out)["shards"][0]["sha256"]
