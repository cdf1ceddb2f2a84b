"""Image sources: Fashion-MNIST (IDX files), torchvision ImageFolder trees, synthetic blobs.

Every source gives labels up front and images on demand, as ``uint8 (C, H, W)`` arrays of
one fixed size, so shards can be written without holding an ImageNet-sized tree in RAM:

    src = open_source(job.data, seed=job.seed)
    src.train_labels        # (N,) int64
    src.image("train", 17)  # (C, H, W) uint8

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``) or any folder holding the four IDX(.gz) files.

An image-folder tree is listed once (:func:`list_image_folder`: a walk of the whole tree,
minutes for ImageNet on a network file system); the shard builder hands that
:class:`FolderListing` to its Ray tasks, which open the source from it
(``open_source(cfg, seed, listing)``) instead of walking the tree again in every worker process.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distcl.config import DataConfig

FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "~/.cache/fashion-mnist",
    "data/fashion-mnist",
)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MISSING_FASHION_HELP = (
    "Fashion-MNIST not found. On Debian/Ubuntu: `sudo apt-get update && sudo apt-get install "
    "dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist). Elsewhere: put "
    "the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and set data.root."
)


class DataError(ValueError):
    """Missing or malformed data; the message says where it looked or which file."""


@dataclass
class Source:
    """Labels of both splits plus an image loader; images are uint8 (C, H, W)."""

    name: str
    train_labels: np.ndarray  # (N_train,) int64
    test_labels: np.ndarray  # (N_test,) int64
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    _load: Callable[[str, int], np.ndarray]

    def labels(self, split: str) -> np.ndarray:
        return self.train_labels if split == "train" else self.test_labels

    def image(self, split: str, index: int) -> np.ndarray:
        """The image ``index`` of ``split`` as uint8 (C, H, W)."""
        return self._load(split, int(index))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; errors name the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt deflate data
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} of {np.prod(dims)} bytes)")
    return body.reshape(dims)


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    stem = _IDX_FILES[(split, kind)]
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_mnist_root(root: str | None) -> Path:
    """The folder holding Fashion-MNIST's IDX files, or a DataError saying where it looked."""
    candidates = (
        [Path(root).expanduser()] if root else [Path(p).expanduser() for p in FASHION_MNIST_DIRS]
    )
    for cand in candidates:
        if _find_idx(cand, "train", "images") is not None:
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"{MISSING_FASHION_HELP} Looked in: {looked}")


def load_fashion_mnist(root: str | None = None) -> Source:
    """Fashion-MNIST: 60000 train / 10000 test 28x28 grey images, 10 classes."""
    folder = fashion_mnist_root(root)
    arrays = {}
    for split, kind in _IDX_FILES:
        path = _find_idx(folder, split, kind)
        if path is None:
            raise DataError(f"{folder}: missing {_IDX_FILES[(split, kind)]}[.gz]")
        arrays[(split, kind)] = read_idx(path)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[(split, "images")]), len(arrays[(split, "labels")])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} has {n_img} images but {n_lab} labels")
    images = {s: arrays[(s, "images")] for s in ("train", "test")}

    def load(split: str, index: int) -> np.ndarray:
        return images[split][index][None]  # (1, 28, 28)

    return Source(
        name="fashion-mnist",
        train_labels=arrays[("train", "labels")].astype(np.int64),
        test_labels=arrays[("test", "labels")].astype(np.int64),
        class_names=FASHION_MNIST_CLASSES,
        image_shape=(1, 28, 28),
        _load=load,
    )


_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _scan_tree(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class folders (expected root/<class>/<image>)")
    items = []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() in _IMG_EXT:
                items.append((path, label))
    if not items:
        raise DataError(f"{root}: no images with extensions {_IMG_EXT}")
    return classes, items


@dataclass(frozen=True)
class FolderListing:
    """An image-folder tree, listed once: class names and, per split, image paths relative to
    ``root`` (numpy bytes arrays: cheap to pickle and zero-copy from Ray's object store) with
    their labels. ``digest`` names the listing (sha256 of its content)."""

    root: str
    classes: tuple[str, ...]
    train_paths: np.ndarray  # (N_train,) bytes, relative to root
    train_labels: np.ndarray  # (N_train,) int64
    test_paths: np.ndarray
    test_labels: np.ndarray
    digest: str


def list_image_folder(root: str | None, test_fraction: float, seed: int) -> FolderListing:
    """Walk a torchvision-style ImageFolder tree (``root/train`` + ``root/test``, or one
    tree split per class by ``test_fraction``, seeded) once."""
    if not root:
        raise DataError("data.root: required for source image-folder")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root: {base} is not a folder")
    if (base / "train").is_dir() and (base / "test").is_dir():
        classes, train = _scan_tree(base / "train")
        test_classes, test = _scan_tree(base / "test")
        if test_classes != classes:
            raise DataError(f"{base}: train and test trees have different class folders")
    else:
        classes, items = _scan_tree(base)
        rng = np.random.default_rng(seed)
        labels = np.array([lab for _, lab in items])
        is_test = np.zeros(len(items), bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            n_test = int(round(len(idx) * test_fraction))
            is_test[rng.permutation(idx)[:n_test]] = True
        train = [it for it, t in zip(items, is_test, strict=True) if not t]
        test = [it for it, t in zip(items, is_test, strict=True) if t]

    def rel(items: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
        paths = [os.fsencode(p.relative_to(base)) for p, _ in items]
        return np.array(paths, dtype=bytes), np.array([lab for _, lab in items], np.int64)

    (train_paths, train_labels), (test_paths, test_labels) = rel(train), rel(test)
    base = base.resolve()  # absolute: shard tasks run in another cwd (or on another node)
    h = hashlib.sha256(repr((str(base), classes)).encode())
    for arr in (train_paths, train_labels, test_paths, test_labels):
        h.update(arr.tobytes())
    return FolderListing(str(base), tuple(classes), train_paths, train_labels, test_paths,
                         test_labels, h.hexdigest()[:16])  # fmt: skip


def image_folder_source(listing: FolderListing, image_size: int) -> Source:
    """The source of a listed tree: no walk of the tree, images decoded lazily, converted to
    RGB and resized to ``image_size`` squared."""
    base = Path(listing.root)
    paths = {"train": listing.train_paths, "test": listing.test_paths}

    def load(split: str, index: int) -> np.ndarray:
        from PIL import Image

        path = base / os.fsdecode(paths[split][index])
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
        except OSError as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None

    return Source(
        name="image-folder",
        train_labels=listing.train_labels,
        test_labels=listing.test_labels,
        class_names=listing.classes,
        image_shape=(3, image_size, image_size),
        _load=load,
    )


def load_image_folder(root: str | None, image_size: int, test_fraction: float, seed: int) -> Source:
    """A torchvision-style ImageFolder tree (``root/train`` + ``root/test``, or one tree).

    Images are decoded lazily, converted to RGB and resized to ``image_size`` squared.
    """
    return image_folder_source(list_image_folder(root, test_fraction, seed), image_size)


def make_synthetic(
    classes: int, train_per_class: int, test_per_class: int, size: int, seed: int
) -> Source:
    """Learnable synthetic classes: each class is a fixed random low-frequency pattern plus
    noise, so a small CNN separates them in a few steps (for tests that need control)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(classes, 1, 4, 4))
    protos = np.kron(coarse, np.ones((1, 1, size // 4 + 1, size // 4 + 1)))[..., :size, :size]

    def draw(n: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([seed, split_seed])
        labels = np.repeat(np.arange(classes), n)
        noise = r.normal(0, 0.15, size=(len(labels), 1, size, size))
        imgs = np.clip(protos[labels] + noise, 0, 1)
        return (imgs * 255).round().astype(np.uint8), labels.astype(np.int64)

    images, labels = {}, {}
    images["train"], labels["train"] = draw(train_per_class, 1)
    images["test"], labels["test"] = draw(test_per_class, 2)
    return Source(
        name="synthetic",
        train_labels=labels["train"],
        test_labels=labels["test"],
        class_names=tuple(f"class-{c}" for c in range(classes)),
        image_shape=(1, size, size),
        _load=lambda split, i: images[split][i],
    )


def open_source(cfg: DataConfig, seed: int, listing: FolderListing | None = None) -> Source:
    """The source a job's ``data`` section names (image-folder: from ``listing`` when given,
    without walking the tree)."""
    if cfg.source == "fashion-mnist":
        return load_fashion_mnist(cfg.root)
    if cfg.source == "image-folder":
        if listing is not None:
            return image_folder_source(listing, cfg.image_size)
        return load_image_folder(cfg.root, cfg.image_size, cfg.test_fraction, seed)
    return make_synthetic(
        cfg.synthetic_classes,
        cfg.synthetic_train_per_class,
        cfg.synthetic_test_per_class,
        cfg.synthetic_size,
        seed,
    )
