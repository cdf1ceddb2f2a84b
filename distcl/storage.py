"""Where distcl reads and writes: local paths and object-store URIs behind one small layer.

    loc = location("s3://bucket/runs") / "quickstart" / "metrics.json"   # or a local path
    write_json(loc, {"ac": 0.5})         # local: temp + fsync + rename; object store: one PUT
    read_json(loc); exists(loc); listdir(loc.parent); delete(loc)
    fs, path = filesystem(loc)           # for pyarrow.parquet / pyarrow.dataset / Ray Train

A location is a :class:`pathlib.Path` (local, unchanged behaviour) or a :class:`Uri`
(``s3://bucket/key``, ``gs://bucket/key``); ``file:///x`` is the local path ``/x``. S3 takes
its endpoint and credentials from the standard AWS variables (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``), so every process of a Ray
cluster that has those variables reaches the same bucket (tests point them at a moto server
on 127.0.0.1).

Why writes are atomic on both: a local write goes to a temp name beside the target, is
fsynced and renamed (then the folder is fsynced); an object is written by one upload of
complete bytes, and S3/GCS make an object visible only when its upload completes, so a
reader sees the old object or the new one, never half. Object stores have no rename and no
directories: a "folder" is a key prefix that exists while an object lies under it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

SCHEMES = ("s3", "gs", "gcs")
TEMP_PREFIX = ".tmp-"
CHUNK = 8 << 20  # upload/download block


class StorageError(OSError):
    """An object-store operation failed (the message names the URI)."""


class Uri:
    """``scheme://bucket/key`` with the path algebra of PurePosixPath (``/``, ``name``,
    ``parent``, ``suffix``, ``with_name``). No ``__fspath__`` on purpose: a local file API
    handed a URI fails loudly instead of writing a local folder named ``s3:``."""

    __slots__ = ("scheme", "path")

    def __init__(self, uri: str | Uri):
        if isinstance(uri, Uri):
            self.scheme, self.path = uri.scheme, uri.path
            return
        scheme, sep, rest = str(uri).partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(f"{uri!r}: not an object-store URI ({', '.join(SCHEMES)})")
        parts = [p for p in rest.split("/") if p and p != "."]
        if not parts:
            raise ValueError(f"{uri!r}: no bucket in the URI")
        if ".." in parts:
            raise ValueError(f"{uri!r}: '..' in an object-store URI")
        self.scheme, self.path = scheme, "/".join(parts)  # path: bucket/key, as pyarrow.fs

    def __truediv__(self, part: str | os.PathLike) -> Uri:
        return Uri(f"{self.scheme}://{self.path}/{os.fspath(part)}")

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1] if "/" in self.path else ""

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name[1:] else self.name

    @property
    def suffix(self) -> str:
        return "." + self.name.rsplit(".", 1)[1] if "." in self.name[1:] else ""

    @property
    def parent(self) -> Uri:
        return Uri(f"{self.scheme}://{self.path.rsplit('/', 1)[0]}") if "/" in self.path else self

    def with_name(self, name: str) -> Uri:
        return self.parent / name

    def resolve(self) -> Uri:  # Path's API: a URI is already absolute
        return self

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Uri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Uri) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


Loc = Path | Uri


def is_uri(loc: Any) -> bool:
    """True for an object-store location (a :class:`Uri` or a ``s3://``/``gs://`` string)."""
    if isinstance(loc, Uri):
        return True
    return isinstance(loc, str) and loc.partition("://")[0] in SCHEMES and "://" in loc


def location(loc: str | os.PathLike | Uri) -> Loc:
    """A local path (``Path``, ``file://`` URIs included) or a :class:`Uri`; ValueError
    naming the scheme for URIs this layer cannot reach."""
    if isinstance(loc, (Uri, Path)):
        return loc
    loc = os.fspath(loc)
    if "://" not in loc:
        return Path(loc)
    if loc.startswith("file://"):
        return Path(url2pathname(urlparse(loc).path))
    return Uri(loc)


def join(loc: str | os.PathLike | Uri, *parts: str) -> Loc:
    out = location(loc)
    for p in parts:
        out = out / p
    return out


# ------------------------------------------------------------------------ file systems
@functools.lru_cache(maxsize=8)
def _object_fs(scheme: str, env: tuple):
    import pyarrow.fs as pafs

    if scheme == "s3":
        vars_ = dict(env)
        kw: dict[str, Any] = {"allow_delayed_open": True}  # small objects: one PutObject
        endpoint = vars_.get("AWS_ENDPOINT_URL_S3") or vars_.get("AWS_ENDPOINT_URL")
        if endpoint:
            url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kw["endpoint_override"] = url.netloc + url.path.rstrip("/")
            kw["scheme"] = url.scheme
        region = vars_.get("AWS_REGION") or vars_.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return pafs.S3FileSystem(**kw)
    try:
        return pafs.GcsFileSystem()
    except (AttributeError, ImportError) as e:  # a pyarrow built without GCS
        raise StorageError(f"{scheme}://: this pyarrow has no GCS support ({e})") from None


_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # fmt: skip


def filesystem(loc: str | os.PathLike | Uri):
    """``(pyarrow.fs.FileSystem, path on it)`` of a location (for Parquet, Ray Train)."""
    import pyarrow.fs as pafs

    loc = location(loc)
    if isinstance(loc, Uri):
        env = tuple((k, os.environ.get(k, "")) for k in _ENV)  # new env (tests): new fs
        return _object_fs("s3" if loc.scheme == "s3" else "gs", env), loc.path
    return pafs.LocalFileSystem(), str(loc.resolve())


def ray_storage(loc: str | os.PathLike | Uri) -> dict:
    """``storage_path`` (and ``storage_filesystem``) keyword arguments placing Ray Train's or
    Tune's files in ``loc`` (``RunConfig``, ``Tuner.restore``/``can_restore``): a local path
    as is; on an object store this module's pyarrow filesystem (its endpoint and credentials)
    and the prefix-stripped path, as Ray asks when a filesystem is given."""
    loc = location(loc)
    if isinstance(loc, Path):
        return {"storage_path": str(loc)}
    fs, path = filesystem(loc)
    return {"storage_path": path, "storage_filesystem": fs}


def _call(loc: Uri, what: str, fn, *args, **kw):
    """Run a pyarrow.fs call, naming the URI in any error (missing bucket, key, access)."""
    try:
        return fn(*args, **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{loc}: no such object or bucket ({what}: {e})") from None
    except OSError as e:
        raise StorageError(f"{loc}: {what} failed ({e})") from None


# ------------------------------------------------------------------------ reading
def read_bytes(loc: str | os.PathLike | Uri) -> bytes:
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = filesystem(loc)

    def get() -> bytes:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()

    return _call(loc, "read", get)


def read_text(loc: str | os.PathLike | Uri, errors: str = "strict") -> str:
    return read_bytes(loc).decode("utf-8", errors=errors)


def read_json(loc: str | os.PathLike | Uri) -> Any:
    return json.loads(read_bytes(loc))


def open_input(loc: str | os.PathLike | Uri, buffer_size: int = 1 << 20) -> IO[bytes]:
    """A sequential binary stream (objects: one GET streamed in ``buffer_size`` blocks)."""
    loc = location(loc)
    if isinstance(loc, Path):
        return open(loc, "rb")
    fs, path = filesystem(loc)
    return _call(loc, "open", fs.open_input_stream, path, compression=None,
                 buffer_size=buffer_size)  # fmt: skip


def tail(loc: str | os.PathLike | Uri, n: int) -> bytes:
    """The last ``n`` bytes (objects: one ranged GET, not the whole object)."""
    loc = location(loc)
    if isinstance(loc, Path):
        with open(loc, "rb") as f:
            f.seek(max(0, os.path.getsize(loc) - n))
            return f.read()
    fs, path = filesystem(loc)

    def get() -> bytes:
        with fs.open_input_file(path) as f:
            size = f.size()
            return f.read_at(min(n, size), max(0, size - n))

    return _call(loc, "ranged read", get)


# ------------------------------------------------------------------------ metadata
class Entry(NamedTuple):
    """One listed file or folder: its name (no folder), size, mtime (ns) and kind."""

    name: str
    size: int
    mtime_ns: int
    is_dir: bool


def _info(loc: Uri):
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    return _call(loc, "stat", fs.get_file_info, path), pafs.FileType


def stat(loc: str | os.PathLike | Uri) -> Entry | None:
    """Size and mtime of a file or object (None: none there)."""
    loc = location(loc)
    if isinstance(loc, Path):
        try:
            st = loc.stat()
        except OSError:
            return None
        return Entry(loc.name, st.st_size, st.st_mtime_ns, loc.is_dir())
    info, types = _info(loc)
    if info.type == types.NotFound:
        return None
    mtime = info.mtime_ns or 0
    return Entry(loc.name, info.size or 0, mtime, info.type == types.Directory)


def is_file(loc: str | os.PathLike | Uri) -> bool:
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.is_file()
    st = stat(loc)
    return st is not None and not st.is_dir


def is_dir(loc: str | os.PathLike | Uri) -> bool:
    """A local folder, or a key prefix with at least one object under it."""
    loc = location(loc)
    if isinstance(loc, Path):
        return loc.is_dir()
    st = stat(loc)
    return st is not None and st.is_dir


def exists(loc: str | os.PathLike | Uri) -> bool:
    loc = location(loc)
    return loc.exists() if isinstance(loc, Path) else stat(loc) is not None


def size(loc: str | os.PathLike | Uri) -> int:
    st = stat(loc)
    if st is None:
        raise FileNotFoundError(f"{loc}: no such file or object")
    return st.size


def listdir(loc: str | os.PathLike | Uri) -> list[Entry]:
    """The entries directly under a folder or prefix, sorted by name ([] if none)."""
    loc = location(loc)
    if isinstance(loc, Path):
        if not loc.is_dir():
            return []
        out = []
        for e in os.scandir(loc):
            try:
                st = e.stat()
            except OSError:  # vanished meanwhile
                continue
            out.append(Entry(e.name, st.st_size, st.st_mtime_ns, e.is_dir()))
        return sorted(out)
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = _call(loc, "list", fs.get_file_info, sel)
    return sorted(
        Entry(i.base_name, i.size or 0, i.mtime_ns or 0, i.type == pafs.FileType.Directory)
        for i in infos
    )


# ------------------------------------------------------------------------ writing
def makedirs(loc: str | os.PathLike | Uri) -> None:
    """Create a local folder (parents too); nothing for object stores (prefixes are implicit)."""
    loc = location(loc)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(loc: str | os.PathLike | Uri, data: bytes | str) -> Loc:
    """Write ``data`` atomically: local temp name + fsync + rename + folder fsync; an object
    in one upload of complete bytes (visible only once complete)."""
    loc = location(loc)
    data = data.encode() if isinstance(data, str) else data
    if isinstance(loc, Uri):
        fs, path = filesystem(loc)

        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        _call(loc, "write", put)
        return loc
    loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.parent / f"{TEMP_PREFIX}{loc.name}-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, loc)
    _fsync_dir(loc.parent)
    return loc


def write_text(loc: str | os.PathLike | Uri, text: str) -> Loc:
    return write_bytes(loc, text.encode())


def write_json(loc: str | os.PathLike | Uri, obj: Any, **kw: Any) -> Loc:
    return write_bytes(loc, json.dumps(obj, **kw).encode())


def upload(src: str | os.PathLike, loc: Uri) -> None:
    """Upload a finished local file as one object, atomically.

    The file is mapped into memory and handed to a single write: pyarrow completes an
    object's upload whenever its stream is closed, even on an error (its destructor closes
    too), so a reader of the source that fails half-way would publish half an object. A
    mapped file cannot fail half-way, and the object appears only when the upload completes.
    """
    import mmap

    fs, path = filesystem(loc)
    with open(src, "rb") as f:
        n = os.fstat(f.fileno()).st_size
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if n else b""
        try:

            def put() -> None:
                with fs.open_output_stream(path) as out:
                    out.write(memoryview(data))

            _call(loc, "upload", put)
        finally:
            if n:
                data.close()


def download(loc: Uri, dst: str | os.PathLike) -> None:
    """Copy one object to a local file (streamed, not held in memory)."""
    with open_input(loc, CHUNK) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, CHUNK)


def delete(loc: str | os.PathLike | Uri, missing_ok: bool = True) -> None:
    loc = location(loc)
    if isinstance(loc, Path):
        loc.unlink(missing_ok=missing_ok)
        return
    fs, path = filesystem(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise FileNotFoundError(f"{loc}: no such object") from None
    except OSError as e:
        raise StorageError(f"{loc}: delete failed ({e})") from None


def delete_dir(loc: str | os.PathLike | Uri) -> None:
    """Remove a folder (or every object under a prefix); nothing if there is none."""
    loc = location(loc)
    if isinstance(loc, Path):
        shutil.rmtree(loc, ignore_errors=True)
        return
    if is_dir(loc):
        fs, path = filesystem(loc)
        _call(loc, "delete", fs.delete_dir, path)


def walk_files(loc: str | os.PathLike | Uri) -> Iterator[Loc]:
    """Every file under a folder or prefix (recursive), in name order."""
    loc = location(loc)
    if isinstance(loc, Path):
        yield from sorted(p for p in loc.rglob("*") if p.is_file())
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    infos = _call(loc, "list", fs.get_file_info,
                  pafs.FileSelector(path, allow_not_found=True, recursive=True))  # fmt: skip
    for i in sorted(infos, key=lambda i: i.path):
        if i.type == pafs.FileType.File:
            yield Uri(f"{loc.scheme}://{i.path}")


def copy(src: str | os.PathLike | Uri, dst: str | os.PathLike | Uri) -> Loc:
    """Copy one file, atomically at ``dst``: within one object store a server-side copy (no
    bytes through this process); otherwise a streamed download/upload or a local copy to a
    temp name and a rename."""
    src, dst = location(src), location(dst)
    if isinstance(src, Uri) and isinstance(dst, Uri) and src.scheme == dst.scheme:
        fs, spath = filesystem(src)
        _call(src, "copy", fs.copy_file, spath, dst.path)
        return dst
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        local = src if isinstance(src, Path) else Path(tmp) / "f"
        if isinstance(src, Uri):
            download(src, local)
        if isinstance(dst, Uri):
            upload(local, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            part = dst.parent / f"{TEMP_PREFIX}{dst.name}-{os.getpid()}"
            shutil.copy2(local, part)
            os.replace(part, dst)
    return dst


@contextlib.contextmanager
def staged(loc: str | os.PathLike | Uri) -> Iterator[Path]:
    """A local folder to write into for a tool that needs local paths (matplotlib, csv):
    ``loc`` itself when local, else a temp folder whose files are uploaded into ``loc``
    (each an atomic object) when the block ends without an error."""
    loc = location(loc)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)
        yield loc
        return
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        yield Path(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                upload(f, join(loc, *f.relative_to(tmp).parts))


def relative(loc: str | os.PathLike | Uri, root: str | os.PathLike | Uri) -> str:
    """``loc``'s path below ``root`` ('a/b.txt'); ValueError if it is not below it."""
    loc, root = location(loc), location(root)
    if isinstance(loc, Path) and isinstance(root, Path) and loc.is_relative_to(root):
        return loc.relative_to(root).as_posix()
    if isinstance(loc, Uri) and isinstance(root, Uri) and loc.path.startswith(root.path + "/"):
        return loc.path[len(root.path) + 1 :]
    raise ValueError(f"{loc} is not below {root}")
