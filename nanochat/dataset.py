"""
Pretraining text: where it comes from, and how it is cut into units of work.

Sources (see resolve_source):
- Hub shards: nanochat's pretraining parquet shards, downloaded into the base dir by `python -m nanochat.dataset`.
  'climbmix' (NEW, default) = karpathy/climbmix-400b-shuffle, 6543 shards in base_data_climbmix/;
  'fineweb' (OLD, alias 'fineweb-edu') = karpathy/fineweb-edu-100b-shuffle, 1823 shards in base_data/.
  Split: train = the downloaded shards 0..N-1, val = one FIXED shard, the last one of the source (6542 / 1822),
  which the downloader always fetches along with the train shards. `python -m nanochat.dataset -n N` downloads
  them in threads of one process; `python -m ray_jobs.download -n N` (same flags) as Ray tasks over the cluster.
- Local files: a file, directory or glob of .parquet files (a `text` column), .txt files (one document per
  paragraph, i.e. per block of text separated by blank lines) or .jsonl files (a "text" field per line); .txt and
  .jsonl may be compressed (.gz, .bz2, .zst, detected by extension). s3://, gs:// and any other fsspec URI work
  the same way (nanochat.storage), with the credentials and endpoint the filesystem package finds in the
  environment (e.g. AWS_ENDPOINT_URL for an S3-compatible store).
  Split: the `val=` files if given, else the LAST `val_fraction` (5%, at least one) of the ordered units.
- 'fallback': real prose shipped in nanochat/data/ (Project Gutenberg via NLTK, public domain; see its README),
  used when the Hub cannot be reached. 'auto' = hub shards if downloaded, else the fallback, with a log line.

Unit of work: (file, row group) for parquet; for .txt/.jsonl, (file, block) where block i holds documents
[i*block_docs, (i+1)*block_docs) of the file. Each split lists its units in a fixed order (files sorted, units in
file order); the dataloader stripes them over workers. read_unit(unit) -> list[str] of documents.
"""
import glob
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from nanochat import storage
from nanochat.flags import ArgsMixin, flag, storage_flag

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Hub sources


@dataclass(frozen=True)
class HubSpec:
    name: str
    base_url: str
    num_shards: int
    dirname: str

    @property
    def val_index(self):
        return self.num_shards - 1  # the last shard is held out, explicitly, for validation


HUB_SOURCES = {
    "climbmix": HubSpec("climbmix", "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                        6543, "base_data_climbmix"),
    "fineweb": HubSpec("fineweb", "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                       1823, "base_data"),
}
HUB_ALIASES = {"fineweb-edu": "fineweb"}
DEFAULT_HUB = "climbmix"
DATA_URL_ENV = "NANOCHAT_DATA_URL"  # overrides the base URL of whichever hub source is downloaded
_SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")


def hub_spec(name):
    name = HUB_ALIASES.get(name, name)
    if name not in HUB_SOURCES:
        raise ValueError(f"unknown hub source {name!r}; choose one of {sorted(HUB_SOURCES) + sorted(HUB_ALIASES)}")
    return HUB_SOURCES[name]


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def hub_data_dir(name=DEFAULT_HUB, base_dir=None):
    if base_dir is None:
        from nanochat.common import get_base_dir
        base_dir = get_base_dir()
    return storage.join(base_dir, hub_spec(name).dirname)


# -----------------------------------------------------------------------------
# Parquet validation (a truncated download has no footer, so it fails here and is fetched again)

def check_parquet(path, require_text=True):
    """Raise ValueError naming `path` unless it is a complete parquet file (magic bytes at both ends, a readable
    footer) with a `text` column."""
    try:
        f = storage.open_read(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    with f:  # one open file for all the checks (on an object store: ranged reads of one object)
        try:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
            f.seek(0)
            head = f.read(4)
        except OSError as e:
            raise ValueError(f"{path}: cannot read: {e}") from e
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise ValueError(f"{path}: not a complete parquet file ({size} bytes, bad magic bytes; truncated?)")
        try:
            f.seek(0)
            schema = pq.ParquetFile(f).schema_arrow
        except Exception as e:
            raise ValueError(f"{path}: unreadable parquet footer: {type(e).__name__}: {e}") from e
    if require_text and schema.get_field_index("text") < 0:
        raise ValueError(f"{path}: parquet file has no 'text' column (columns: {', '.join(schema.names)})")


def is_valid_parquet(path, require_text=True):
    try:
        check_parquet(path, require_text)
        return True
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# Download

class DownloadError(RuntimeError):
    pass


class PermanentDownloadError(DownloadError):
    """The server said no (4xx): retrying cannot help."""


def _retryable(error):
    """Transient: connection resets, timeouts, 5xx, 429, a truncated or corrupt transfer. Other 4xx are not."""
    response = getattr(error, "response", None)
    if isinstance(error, requests.HTTPError) and response is not None:
        return response.status_code >= 500 or response.status_code in (408, 429)
    return True


def download_shard(url, path, *, max_attempts=5, backoff=2.0, timeout=30, chunk_size=1 << 20):
    """Fetch one shard into `path` (a local path or a storage URI); returns False if a valid copy was already there
    (a re-run fetches only what is missing or invalid), True if fetched. Streams into a temporary name next to it,
    checks the length and the parquet footer, then renames, so `path` only ever holds a complete shard. Transient
    errors are retried with exponential backoff and jitter (about backoff, 2*backoff, 4*backoff, ... seconds); a 4xx
    answer fails at once with PermanentDownloadError."""
    if is_valid_parquet(path):
        return False
    if storage.exists(path):
        logger.warning("%s exists but is not a valid parquet file (truncated or corrupt): fetching it again", path)
        storage.remove(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    last_error = None
    for attempt in range(1, max_attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                expected = r.headers.get("Content-Length")
                written = 0
                with storage.open_write(tmp) as f:
                    for chunk in r.iter_content(chunk_size):
                        f.write(chunk)
                        written += len(chunk)
            # (a Content-Encoding would make the decoded size differ from Content-Length; the footer check remains)
            if expected is not None and r.headers.get("Content-Encoding", "identity") == "identity" \
                    and written != int(expected):
                raise IOError(f"truncated transfer: got {written} of {expected} bytes")
            check_parquet(tmp)
            storage.rename(tmp, path)
            return True
        except (requests.RequestException, OSError, ValueError) as e:
            last_error = e
            storage.remove(tmp)
            if not _retryable(e):
                raise PermanentDownloadError(f"{url}: {e}") from None
            if attempt < max_attempts:
                delay = backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # jitter: no thundering herd
                logger.warning("download %s: attempt %d/%d failed (%s); retrying in %.2fs",
                               url, attempt, max_attempts, e, delay)
                time.sleep(delay)
    raise DownloadError(f"failed to download {url} after {max_attempts} attempts: {last_error}")


def check_reachable(url, *, attempts=3, timeout=10, backoff=2.0):
    """DownloadError naming `url` if its server cannot be reached at all (refused, unknown host, no route, no answer)
    in `attempts` quick tries (at most ~40 s), so a dead mirror fails the stage at once instead of after every
    shard's retries. Any HTTP answer, even an error status, means the server is there: each shard's own retries and
    4xx rules take it from there."""
    for attempt in range(attempts):
        try:
            requests.head(url, timeout=timeout, allow_redirects=True)
            return
        except requests.RequestException as e:
            error = e
            if attempt + 1 < attempts:
                time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"cannot reach the shard server for {url} ({attempts} tries): {error}")


def shard_plan(num_train_shards=-1, *, source=DEFAULT_HUB, data_dir=None, base_url=None):
    """[(url, path)] of train shards 0..N-1 (N=-1: all) plus the source's fixed val shard (last). Base URL:
    `base_url`, else $NANOCHAT_DATA_URL, else the Hub; data_dir: default <base dir>/<source's dir>."""
    spec = hub_spec(source)
    n_train = spec.num_shards - 1 if num_train_shards < 0 else min(num_train_shards, spec.num_shards - 1)
    base_url = (base_url or os.environ.get(DATA_URL_ENV) or spec.base_url).rstrip("/")
    data_dir = data_dir or hub_data_dir(spec.name)
    return [(f"{base_url}/{shard_name(i)}", storage.join(data_dir, shard_name(i)))
            for i in list(range(n_train)) + [spec.val_index]]


def missing_shards(plan):
    """The paths of a plan that do not hold a valid shard yet."""
    return [path for _, path in plan if not is_valid_parquet(path)]


def download_shards(num_train_shards=-1, *, source=DEFAULT_HUB, data_dir=None, base_url=None, workers=4,
                    max_attempts=5, backoff=2.0, timeout=30, progress=True):
    """Download train shards 0..N-1 plus the val shard in threads of this process (the Ray job
    ray_jobs/download.py spreads the same work over a cluster). Returns the shard paths (val last). Raises
    DownloadError naming every shard that failed."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm
    plan = shard_plan(num_train_shards, source=source, data_dir=data_dir, base_url=base_url)
    failures = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_shard, url, path, max_attempts=max_attempts, backoff=backoff,
                               timeout=timeout): path for url, path in shards_to_fetch(plan, timeout)}
        for fut in tqdm(as_completed(futures), total=len(futures), unit="shard", disable=not progress,
                        desc=f"{source} shards"):
            try:
                fut.result()
            except DownloadError as e:
                failures[futures[fut]] = str(e)
    raise_for_failures(failures, len(plan))
    return [path for _, path in plan]


def shards_to_fetch(plan, timeout=10):
    """The (url, path) pairs of a plan that do not hold a valid shard yet, once their server answers
    (check_reachable; nothing missing: no network needed). Each storage path is checked once, here."""
    missing = set(missing_shards(plan))
    todo = [(url, path) for url, path in plan if path in missing]
    if todo:
        check_reachable(todo[0][0], timeout=min(timeout, 10))
    return todo


def raise_for_failures(failures, total):
    """DownloadError naming every failed shard ({path: reason}), if any."""
    if failures:
        lines = [f"{storage.basename(p)}: {failures[p]}" for p in sorted(failures)]
        raise DownloadError(f"{len(failures)} of {total} shards failed:\n  " + "\n  ".join(lines))


# -----------------------------------------------------------------------------
# Units and data sources

class Unit(NamedTuple):
    path: str   # file path or URI
    index: int  # parquet row group, or block of `block_docs` documents in a .txt/.jsonl file


_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}  # compressed extensions: pyarrow codecs


def file_kind(path):
    """'parquet', 'jsonl', 'txt', or None for files a source ignores."""
    name = os.path.basename(path).lower()
    if name.endswith(".parquet"):
        return "parquet"
    for ext in _CODECS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return None


def _expand(spec):
    """A file, directory or glob (local or URI) -> sorted list of files of a supported kind."""
    has_glob = any(c in spec for c in "*?[")
    if not storage.is_uri(spec):
        if has_glob:
            matches = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        elif os.path.isdir(spec):
            matches = [os.path.join(spec, n) for n in os.listdir(spec)]
        elif os.path.isfile(spec):
            if file_kind(spec) is None:
                raise ValueError(f"{spec}: unsupported file type (expected .parquet, .txt or .jsonl, "
                                 f"optionally compressed)")
            return [spec]
        else:
            raise FileNotFoundError(f"data source {spec!r}: no such file or directory")
        files = sorted(p for p in matches if file_kind(p) is not None)
    else:
        fs, path = storage.filesystem(spec)
        prefix = storage.scheme(spec) + "://"
        if has_glob:
            found = fs.glob(path)
        elif fs.isfile(path):
            return [spec]
        elif fs.isdir(path):
            found = fs.find(path)
        else:
            raise FileNotFoundError(f"data source {spec!r}: not found")
        files = sorted(prefix + f for f in found if file_kind(f) is not None)
    if not files:
        raise FileNotFoundError(f"data source {spec!r}: no .parquet, .txt or .jsonl files found")
    return files


def _read_text_documents(path):
    """All documents of a .txt (paragraphs) or .jsonl ("text" field) file, in file order."""
    kind = file_kind(path)
    raw = storage.read_bytes(path)
    codec = _CODECS.get(os.path.splitext(path)[1].lower())
    if codec:
        raw = pa.CompressedInputStream(pa.BufferReader(raw), codec).read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text: {e}") from e
    if kind == "txt":
        # one document per paragraph: blocks separated by one or more blank lines
        docs = [p.strip() for p in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))]
        docs = [d for d in docs if d]
    else:
        docs = []
        # split on "\n" only: str.splitlines() would also break on U+2028 etc., which JSON strings may contain raw
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field")
            docs.append(row["text"])
    if not docs:
        raise ValueError(f"{path}: contains no documents")
    return docs


DEFAULT_BLOCK_DOCS = 64   # documents per unit for .txt/.jsonl files
DEFAULT_VAL_FRACTION = 0.05


class DataSource:
    """An ordered list of files cut into units, with a train/val split.

    val_files given: train = units of `train_files`, val = units of `val_files` (hub shards, the fallback corpus,
    or an explicit local val file). Otherwise val = the last max(1, ceil(val_fraction * n)) units of all files.
    Listing opens every parquet footer and reads every text file once (cached); read_unit keeps the last two
    files open/parsed, since a worker reads the units of a file one after another."""

    def __init__(self, name, train_files, val_files=None, val_fraction=DEFAULT_VAL_FRACTION,
                 block_docs=DEFAULT_BLOCK_DOCS, description=None):
        if not train_files:
            raise ValueError(f"data source {name!r} has no files")
        self.name = name
        self.train_files = list(train_files)
        self.val_files = list(val_files) if val_files else None
        self.val_fraction = val_fraction
        self.block_docs = block_docs
        self.description = description or name
        self._units = None
        self._init_cache()

    def _init_cache(self):
        self._cache = OrderedDict()  # path -> ParquetFile or list[str]
        self._lock = threading.Lock()

    # pickle support (Ray ships sources to actors): drop open files and locks
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_cache"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __repr__(self):
        return f"DataSource({self.description})"

    def _open(self, path):
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return self._cache[path]
        if file_kind(path) == "parquet":
            try:
                handle = pq.ParquetFile(storage.open_read(path) if storage.is_uri(path) else path)
            except FileNotFoundError:
                raise
            except Exception as e:
                raise ValueError(f"{path}: not a valid parquet file: {type(e).__name__}: {e}") from e
            names = handle.schema_arrow.names
            if "text" not in names:
                raise ValueError(f"{path}: parquet file has no 'text' column (columns: {', '.join(names)})")
        else:
            handle = _read_text_documents(path)
        with self._lock:
            self._cache[path] = handle
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return handle

    def _file_units(self, path):
        handle = self._open(path)
        if isinstance(handle, list):
            return [Unit(path, i) for i in range(math.ceil(len(handle) / self.block_docs))]
        if handle.metadata.num_rows == 0:
            raise ValueError(f"{path}: contains no documents (0 rows)")
        return [Unit(path, i) for i in range(handle.metadata.num_row_groups)]

    def _list_units(self):
        if self._units is None:
            train = [u for p in self.train_files for u in self._file_units(p)]
            if self.val_files:
                val = [u for p in self.val_files for u in self._file_units(p)]
            else:
                if len(train) < 2:
                    raise ValueError(f"data source {self.description}: only {len(train)} unit(s); need at least 2 "
                                     f"to hold out a validation unit (add data or pass an explicit val file)")
                n_val = max(1, math.ceil(self.val_fraction * len(train)))
                train, val = train[:-n_val], train[-n_val:]
            self._units = {"train": train, "val": val}
        return self._units

    def units(self, split):
        """The split's units in their fixed order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._list_units()[split]

    def read_unit(self, unit):
        """The documents (list[str]) of one unit."""
        path, index = unit
        handle = self._open(path)
        if isinstance(handle, list):
            return handle[index * self.block_docs:(index + 1) * self.block_docs]
        column = handle.read_row_group(index, columns=["text"]).column("text")
        return ["" if t is None else t for t in column.to_pylist()]

    def fingerprint(self, split, n=None):
        """Short hash of the first n units (file basenames + indices): identifies the unit order in a resume state,
        independent of where the data directory lives. Appending files keeps the fingerprint of the prefix."""
        units = self.units(split)[:n]
        h = hashlib.sha1("\n".join(f"{os.path.basename(p)}:{i}" for p, i in units).encode())
        return h.hexdigest()[:16]

    def validate(self):
        self._list_units()
        return self

    def iter_batched(self, split, start=0, step=1):
        """nanochat's parquets_iter_batched: for each file in order, units start, start+step, ... of that file."""
        by_file = OrderedDict()
        for u in self.units(split):
            by_file.setdefault(u.path, []).append(u)
        for file_units in by_file.values():
            for u in file_units[start::step]:
                yield self.read_unit(u)


def hub_source(name=DEFAULT_HUB, data_dir=None):
    """Downloaded shards of a hub source: train = every shard present but the val shard, val = the val shard."""
    spec = hub_spec(name)
    data_dir = data_dir or hub_data_dir(spec.name)
    found = {}
    for n in storage.listdir(data_dir):
        m = _SHARD_RE.match(n)
        if m:
            found[int(m.group(1))] = storage.join(data_dir, n)
    hint = f"download with: python -m nanochat.dataset -n N --source {spec.name}"
    if spec.val_index not in found:
        raise FileNotFoundError(f"{spec.name}: validation shard {shard_name(spec.val_index)} not found in "
                                f"{data_dir}; {hint}")
    train = [found[i] for i in sorted(found) if i != spec.val_index]
    if not train:
        raise FileNotFoundError(f"{spec.name}: no train shards in {data_dir}; {hint}")
    return DataSource(spec.name, train, [found[spec.val_index]],
                      description=f"{spec.name} hub shards ({len(train)} train + val shard {spec.val_index}) "
                                  f"in {data_dir}")


def hub_shards_present(name=DEFAULT_HUB, data_dir=None):
    try:
        hub_source(name, data_dir)
        return True
    except FileNotFoundError:
        return False


FALLBACK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FALLBACK_TRAIN = os.path.join(FALLBACK_DIR, "gutenberg_train.jsonl.gz")
FALLBACK_VAL = os.path.join(FALLBACK_DIR, "gutenberg_val.jsonl.gz")
PACKAGE_TASK_DATA = os.path.join(FALLBACK_DIR, "tasks")  # small offline task pack (chat, GSM8K, ARC, MMLU, CORE)
FALLBACK_BLOCK_DOCS = 8  # small units so the 73-doc val file still has 10 units to stripe over workers


def fallback_source():
    """The offline corpus shipped with the package: ~3 M characters of Project Gutenberg prose (public domain)."""
    return DataSource("fallback", [FALLBACK_TRAIN], [FALLBACK_VAL], block_docs=FALLBACK_BLOCK_DOCS,
                      description="offline fallback corpus (Project Gutenberg via NLTK, public domain: Austen, "
                                  "Chesterton, Melville, Shakespeare, Blake; ~3 M chars, shipped in nanochat/data)")


def local_source(spec, val=None, val_fraction=DEFAULT_VAL_FRACTION, block_docs=DEFAULT_BLOCK_DOCS):
    """Files given by a path / directory / glob / URI; `val` (same forms) names explicit validation files."""
    train = _expand(spec)
    val_files = _expand(val) if val else None
    if val_files:
        val_set = set(val_files)
        train = [f for f in train if f not in val_set]
    split = f"val = {len(val_files)} file(s)" if val_files else f"val = last {val_fraction:.0%} of units"
    return DataSource("local", train, val_files, val_fraction=val_fraction, block_docs=block_docs,
                      description=f"local files {spec} ({len(train)} files, {split})")


def resolve_source(spec="auto", *, data_dir=None, base_dir=None, val=None, val_fraction=DEFAULT_VAL_FRACTION,
                   block_docs=DEFAULT_BLOCK_DOCS):
    """Turn a source spec into a validated DataSource (errors surface here, naming the bad file).

    spec: a DataSource (returned as is); 'climbmix' / 'fineweb' / 'fineweb-edu': downloaded hub shards (in
    `data_dir`, else their directory under the storage root `base_dir`); 'hub': climbmix shards if present, else
    fineweb; 'fallback': the shipped corpus; 'auto' (or None): hub shards if present, else the fallback corpus;
    anything else: local path / dir / glob / URI.
    """
    if isinstance(spec, DataSource):
        return spec
    spec = os.fspath(spec) if spec else "auto"

    def shard_dir(name):
        return data_dir or hub_data_dir(name, base_dir)
    if spec in ("auto", "hub"):
        for name in (DEFAULT_HUB, "fineweb"):
            if hub_shards_present(name, shard_dir(name)):
                src = hub_source(name, shard_dir(name))
                break
        else:
            if spec == "hub":
                raise FileNotFoundError(f"no downloaded hub shards in {shard_dir(DEFAULT_HUB)} or "
                                        f"{shard_dir('fineweb')}; run: python -m nanochat.dataset -n N")
            src = fallback_source().validate()
            logger.warning("pretraining data: no downloaded hub shards found; using the %s", src.description)
            return src
    elif spec in HUB_SOURCES or spec in HUB_ALIASES:
        src = hub_source(spec, shard_dir(hub_spec(spec).name))
    elif spec == "fallback":
        src = fallback_source()
    else:
        src = local_source(spec, val=val, val_fraction=val_fraction, block_docs=block_docs)
    src.validate()
    logger.info("pretraining data: %s", src.description)
    return src


def download_or_fallback(num_train_shards, source=DEFAULT_HUB, *, data_dir=None, base_url=None, probe_timeout=10,
                         download=download_shards, **download_kwargs):
    """For demos only: the hub source with N train shards, downloading what is missing with `download` (same
    signature as download_shards); if the Hub cannot be reached, the offline fallback corpus (with a warning saying
    so). Shards already in storage need no network. Real runs call `download` directly, which never falls back."""
    spec = hub_spec(source)
    plan = shard_plan(num_train_shards, source=spec.name, data_dir=data_dir, base_url=base_url)
    if missing_shards(plan):
        url = plan[-1][0].rsplit("/", 1)[0]
        try:  # one quick probe, so an offline machine does not sit through every shard's retries
            requests.head(plan[-1][0], timeout=probe_timeout, allow_redirects=True).raise_for_status()
            download(num_train_shards, source=spec.name, data_dir=data_dir, base_url=url, **download_kwargs)
        except (requests.RequestException, DownloadError) as e:
            src = fallback_source().validate()
            logger.warning("pretraining data: cannot download %s shards from %s (%s); using the %s",
                           spec.name, url, str(e).splitlines()[0], src.description)
            return src
    return resolve_source(spec.name, data_dir=data_dir)


def parquets_iter_batched(split, start=0, step=1, source="auto"):
    """nanochat-compatible: yield the documents of each unit (row group) of the split, file by file, taking units
    start, start+step, ... of every file (e.g. start=rank, step=world_size)."""
    yield from resolve_source(source).iter_batched(split, start, step)


# -----------------------------------------------------------------------------
# Command line: `python -m nanochat.dataset` (threads of this process); ray_jobs/download.py runs the same command
# line with its Ray fan-out as `download`

@dataclass
class DownloadConfig(ArgsMixin):
    num_files: int = flag(-1, "train shards to download (-1 = all)", aliases=["-n"])
    num_workers: int = flag(16, "downloads in flight at once", aliases=["-w"])
    source: str = flag(DEFAULT_HUB, "which shuffle to download", aliases=["--dataset"],
                       choices=sorted(HUB_SOURCES) + sorted(HUB_ALIASES))
    base_url: str | None = flag(None, f"mirror base URL (default ${DATA_URL_ENV} or the Hub)")
    data_dir: str | None = flag(None, "target directory or URI (default: <storage root>/base_data_climbmix or "
                                      "base_data)", aliases=["--dir"])
    max_attempts: int = flag(5, "tries per shard on transient errors")
    backoff: float = flag(2.0, "first retry delay in seconds (doubles)")
    storage: str | None = storage_flag()


def main(argv=None, download=download_shards, description=None):
    """Parse the download flags and run `download` (default: threads here). -> exit status."""
    from nanochat.common import get_base_dir, setup_default_logging
    args = DownloadConfig.parse(argv, description or __doc__)
    setup_default_logging()
    try:
        root = get_base_dir(args.storage)  # a URI root whose filesystem package is missing fails now, naming it
        paths = download(args.num_files, source=args.source, workers=args.num_workers, base_url=args.base_url,
                         data_dir=args.data_dir or hub_data_dir(args.source, root), max_attempts=args.max_attempts,
                         backoff=args.backoff)
    except DownloadError as e:
        logger.error("%s", e)
        return 1
    print(f"{len(paths)} shards ready in {paths[0].rsplit('/', 1)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
