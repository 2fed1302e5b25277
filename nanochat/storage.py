"""
Storage: the one place where artifacts are read and written, for local paths and any fsspec URI.

Every artifact of a run (data shards, tokenizer, checkpoints, metrics.jsonl, the speedrun's stage log, report
sections and curves, eval CSVs) goes through these functions, so a storage root may be a local directory, an NFS
mount, or an object store URI (s3://, gs://, memory://, ...) shared by every node of a cluster.

- Local paths (and file:// URIs) use the OS directly. Writes go to a temp file in the same directory, are fsynced
  and renamed into place, so a reader (or a crash) never sees half a file.
- URIs go through fsspec. Writes are buffered in memory and sent as one PUT, which object stores apply atomically.
  There are no directories on object stores: makedirs is a no-op there, and a "directory" exists once an object
  below it does.
- A URI whose filesystem package is missing fails at once, naming the extra to install (`pip install
  -e ".[s3]"` for s3://, `".[gcs]"` for gs://).
"""
import io
import json
import os
import tempfile
import time

import fsspec

# the pip extra that provides each scheme's filesystem package
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """A stored model file (a checkpoint's, an export's) is missing, truncated or corrupt. `path` names the file."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def scheme(path):
    path = os.fspath(path)
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_uri(path):
    """True for a remote/fsspec URI (s3://, gs://, memory://, ...); local paths and file:// URIs are local."""
    return scheme(path) not in ("", "file")


def local_path(path):
    """A local path as the OS sees it (file:// stripped, made absolute)."""
    path = os.fspath(path)
    return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)


def join(root, *parts):
    root = os.fspath(root)
    if not is_uri(root):
        return os.path.join(root, *parts)
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts if p])


def basename(path):
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path):
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(path)


def filesystem(path):
    """(fsspec filesystem, path within it) for a URI. StorageError naming the pip extra if the package is missing.
    Cached listings of the path are dropped: another process (or node) may have written since."""
    try:
        fs, p = fsspec.core.url_to_fs(os.fspath(path))
        fs.invalidate_cache(p)
        return fs, p
    except ImportError as e:
        extra = EXTRAS.get(scheme(path))
        hint = f'pip install -e ".[{extra}]"' if extra else "install the fsspec implementation for this scheme"
        raise StorageError(f"storage {path!r} needs the {scheme(path)}:// filesystem package, which is not "
                           f"installed ({e}); {hint}") from None
    except ValueError as e:  # unknown protocol
        raise StorageError(f"storage {path!r}: {e}") from None


def check_root(root):
    """Fail at start-up (not at the second stage) if the root's filesystem cannot be used at all."""
    if is_uri(root):
        filesystem(root)
    return root


def exists(path):
    if not is_uri(path):
        return os.path.exists(local_path(path))
    fs, p = filesystem(path)
    return fs.exists(p)


def isfile(path):
    if not is_uri(path):
        return os.path.isfile(local_path(path))
    fs, p = filesystem(path)
    return fs.isfile(p)


def makedirs(path):
    """Create a local directory (and parents); nothing to do on object stores."""
    if not is_uri(path):
        os.makedirs(local_path(path), exist_ok=True)


def entries(path):
    """[(name, is_dir, mtime)] directly under `path`; [] if it does not exist. Object stores have no directory
    mtimes: those read 0.0."""
    if not is_uri(path):
        try:
            with os.scandir(local_path(path)) as it:
                return [(e.name, e.is_dir(), e.stat().st_mtime) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, p = filesystem(path)
    try:
        infos = fs.ls(p, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for info in infos:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if not name or info["name"].rstrip("/") == p.rstrip("/"):
            continue
        is_dir = info.get("type") == "directory"
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0.0
        out.append((name, is_dir, mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0.0)))
    return out


def listdir(path):
    """Names directly under `path` (files and directories); [] if it does not exist."""
    return [name for name, _, _ in entries(path)]


def size(path):
    if not is_uri(path):
        return os.path.getsize(local_path(path))
    fs, p = filesystem(path)
    return fs.size(p)


def modified(path):
    """Modification time (seconds since the epoch) of a file; 0.0 where the filesystem does not say."""
    if not is_uri(path):
        return os.path.getmtime(local_path(path))
    fs, p = filesystem(path)
    try:
        return fs.modified(p).timestamp()
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return 0.0


def open_read(path, mode="rb", **kwargs):
    """An open file for reading (local or remote). FileNotFoundError if it is missing."""
    if not is_uri(path):
        return open(local_path(path), mode, **kwargs)
    fs, p = filesystem(path)
    return fs.open(p, mode, **kwargs)


def read_bytes(path):
    if not is_uri(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_text(path):
    return read_bytes(path).decode("utf-8")


def read_json(path, default=None):
    """Parsed JSON of a file, or `default` if the file does not exist."""
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        return default


def write_atomic(path, write_fn):
    """Create or replace `path` from write_fn(binary file), all or nothing. Returns write_fn's result."""
    if is_uri(path):  # serialize in memory, then one PUT: the object appears whole or not at all
        buf = io.BytesIO()
        result = write_fn(buf)
        fs, p = filesystem(path)
        fs.pipe_file(p, buf.getvalue())
        return result
    path = local_path(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # make the rename itself durable (a crash right after could otherwise lose the new directory entry)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return result


def write_bytes(path, data):
    write_atomic(path, lambda f: f.write(data))


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kwargs):
    write_text(path, json.dumps(obj, **kwargs))


def open_write(path):
    """A plain (not atomic) binary writer, for streaming large files to a temporary name before rename()."""
    if not is_uri(path):
        path = local_path(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")
    fs, p = filesystem(path)
    return fs.open(p, "wb")


def rename(src, dst):
    """Move a file into place: os.replace locally, a server-side copy + delete on object stores."""
    if not is_uri(src):
        os.replace(local_path(src), local_path(dst))
        return
    fs, p = filesystem(src)
    fs.mv(p, filesystem(dst)[1])


def remove(path):
    """Delete a file; missing files are fine."""
    try:
        if not is_uri(path):
            os.remove(local_path(path))
        else:
            fs, p = filesystem(path)
            fs.rm_file(p)
    except FileNotFoundError:
        pass


def pyarrow_filesystem(path):
    """(pyarrow FileSystem, path within it), e.g. for Ray Data and Ray Train, backed by the same fsspec filesystem
    as everything else here (so the same credentials and endpoint apply)."""
    import pyarrow.fs as pafs
    if not is_uri(path):
        return pafs.LocalFileSystem(), local_path(path)
    fs, p = filesystem(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p


class AppendLog:
    """A line-oriented log (metrics.jsonl) that any root can hold. Locally lines are appended and flushed as they
    come. Object stores cannot append: the whole object is rewritten with one PUT, at most every `interval` seconds
    and on close, keeping the lines an earlier (resumed) run wrote."""

    def __init__(self, path, interval=30.0):
        self.path, self.interval = path, interval
        self.remote = is_uri(path)
        if self.remote:
            try:
                self._lines = read_text(path).splitlines(keepends=True)
            except FileNotFoundError:
                self._lines = []
            self._dirty, self._last = False, time.monotonic()
        else:
            makedirs(dirname(local_path(path)))
            self._f = open(local_path(path), "a")

    def write(self, line):
        line = line if line.endswith("\n") else line + "\n"
        if not self.remote:
            self._f.write(line)
            self._f.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self):
        if self.remote and self._dirty:
            write_text(self.path, "".join(self._lines))
            self._dirty, self._last = False, time.monotonic()

    def close(self):
        if self.remote:
            self.flush()
        else:
            self._f.close()
