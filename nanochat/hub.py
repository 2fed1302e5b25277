"""
Models from outside the storage root, as a --source: a local directory, or a model repo on the Hugging Face Hub.

    --source ./exports/d20                 a directory
    --source karpathy/nanochat-d32         a Hub repo, its default branch
    --source me/my-export@v2               a branch, tag or commit
    --source hf://me/my-export             the Hub even when a local directory me/my-export exists

A directory (or repo) holds a Hugging Face export (config.json, model.safetensors or shards with their index,
tokenizer.json) or nanochat's own checkpoint layout (model_<step>.pt + meta_<step>.json, with tokenizer.pkl at the
root or in tokenizer/). nanochat.checkpoint_manager loads both; this module finds the directory.

Which is which: base|mid|sft|rl name the storage root's checkpoints (checkpoint_manager never asks here); hf://...
is the Hub; an existing local directory is that directory (as in transformers' from_pretrained); else owner/name
[@revision] is a Hub repo id. Anything else is an error that says so.

Downloads use huggingface_hub (`pip install -e ".[hf]"`; nanochat imports without it): from HF_ENDPOINT (read at
load time; default huggingface.co) into the usual Hugging Face cache (HF_HUB_CACHE / HF_HOME), with the user's token
(HF_TOKEN or `hf auth login`) for private repos. Only what a load needs is fetched: a Hugging Face export's JSON files,
safetensors and tokenizer; of nanochat's layout the model and meta of one step (the newest, or the one asked for) and
the tokenizer. A repo with many steps never downloads them all.

Verification: huggingface_hub checks only a download's size. Here every file of the load is then checked against the
Hub's record (model_info with files_metadata): its size and the sha256 of an LFS file, or the git blob hash of any
other. A file that does not match is deleted from the cache and the load fails naming it, so the next load
downloads it again.

Interrupted downloads: huggingface_hub (2.4) resumes a file whose connection was closed early or timed out, with a
Range request from its last whole 10 MB chunk, up to 5 times in a row; a reset connection, or the process's end,
loses that file's partial data (its temp file is deleted). So a download that fails on a network error is retried
here (max_attempts in all): files already complete stay in the cache, only the rest is fetched again.

Offline (HF_HUB_OFFLINE=1, or local_files_only): the same files are found in the cache alone, chosen from the repo
listing cached by the last download, without checksums (there is no Hub record to compare with; the files were
checked when they were downloaded). The same happens, with a warning, when the Hub cannot be reached.
"""
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass

logger = logging.getLogger("nanochat")

HUB_PREFIX = "hf://"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name (the Hub checks the finer rules itself)
COMMIT = re.compile(r"[0-9a-f]{40}")
STEP_META = re.compile(r"meta_(\d+)\.json")
TOKENIZER_FILES = ("tokenizer.pkl", "token_bytes.pt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


class HubError(RuntimeError):
    """A model repo cannot be found, downloaded or trusted. `path` names the repo file at fault, if one is."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Source:
    """A parsed source: a local directory (path), or a Hub repo (repo_id, revision; None: the default branch)."""
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self):
        if self.repo_id is None:
            return self.path
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse(source):
    """A --source that is not base|mid|sft|rl -> Source (see the module docstring for how it is told apart)."""
    if source.startswith(HUB_PREFIX):
        return _repo(source[len(HUB_PREFIX):], source)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return Source(path=os.path.abspath(path))
    if REPO_ID.fullmatch(source.split("@", 1)[0]):
        return _repo(source, source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"--source {source!r}: no such directory")
    raise ValueError(f"--source {source!r} is not base|mid|sft|rl, an existing directory, or a Hugging Face Hub repo "
                     f"id (owner/name[@revision], or hf://owner/name[@revision])")


def _repo(text, source):
    repo_id, at, revision = text.partition("@")
    if not REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise ValueError(f"--source {source!r}: a Hub repo is owner/name or owner/name@revision")
    return Source(repo_id=repo_id, revision=revision or None)


def source_name(source):
    """A name for what was trained from `source`, e.g. the output tag of a training stage: the repo's or the
    directory's name."""
    src = parse(source)
    return src.repo_id.split("/")[1] if src.repo_id else os.path.basename(src.path.rstrip(os.sep))


def pin(source, endpoint=None, local_files_only=False):
    """`source` in a form that names the same files wherever and whenever it is loaded: a directory made absolute
    (workers run elsewhere), a Hub repo as hf://owner/name@<commit> (its current one), so that every worker of a
    run loads the same weights even if the repo is updated meanwhile. Offline, or with the Hub unreachable, a repo
    stays as it is (the cache cannot change under it)."""
    src = parse(source)
    if src.repo_id is None or (src.revision and COMMIT.fullmatch(src.revision)) or local_files_only or \
            _hub_constants().is_offline_mode():
        return str(src)
    try:
        info = _model_info(src, _endpoint(endpoint), files_metadata=False)
    except _Unreachable as e:
        logger.warning(f"{src}: the Hub cannot be reached ({e.__cause__}); not pinning its revision")
        return str(src)
    return str(Source(repo_id=src.repo_id, revision=info.sha))


def locate(source, step=None, endpoint=None, cache_dir=None, local_files_only=False, max_attempts=3):
    """The local directory holding what loading `source` needs: the directory itself, or the repo's snapshot in
    the Hugging Face cache, downloaded (only the files needed, step: which one of nanochat's layout, default the
    newest) and verified. Raises HubError (or FileNotFoundError / ValueError for a source that is neither)."""
    src = parse(source)
    if src.repo_id is None:
        return src.path
    endpoint = _endpoint(endpoint)
    if local_files_only or _hub_constants().is_offline_mode():
        return _from_cache(src, step, cache_dir)
    try:
        info = _model_info(src, endpoint, files_metadata=True)
    except _Unreachable as e:
        logger.warning(f"{src}: the Hub at {endpoint} cannot be reached ({e.__cause__}); looking in the cache")
        return _from_cache(src, step, cache_dir)
    files = {s.rfilename: s for s in info.siblings or []}
    label = f"{src.repo_id}@{info.sha}"
    wanted = select_files(files, step, label)
    path = _download(src, wanted, endpoint, cache_dir, max_attempts)
    if os.path.basename(path) != info.sha:
        raise HubError(f"{src} changed while it was being downloaded (commit {info.sha}, now "
                       f"{os.path.basename(path)}): load it again, or pin a commit with owner/name@<commit>")
    verify(path, wanted, files, label)
    return path


def select_files(names, step=None, label="the repo"):
    """The files (of a repo or directory listing) that loading it needs. A Hugging Face export (config.json): its
    top-level JSON files, safetensors and tokenizer. nanochat's layout: model_<step>.pt and meta_<step>.json of
    `step` (default: the newest step having both) and the tokenizer files, at the top or in tokenizer/."""
    names = set(names)
    top = {n for n in names if "/" not in n}
    if "config.json" in top:
        return sorted(n for n in top if n.endswith(".safetensors") or n in TOKENIZER_FILES or
                      (n.endswith(".json") and not STEP_META.fullmatch(n)))
    steps = {int(m.group(1)): m.group(1) for n in top if (m := STEP_META.fullmatch(n)) and
             f"model_{m.group(1)}.pt" in top}
    if not steps:
        raise HubError(f"{label} is neither a Hugging Face export (config.json) nor a nanochat checkpoint "
                       f"(model_<step>.pt with meta_<step>.json)")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise HubError(f"{label} has no checkpoint step {step}; its steps: {sorted(steps)}")
    tokenizer = [n for n in names if n in TOKENIZER_FILES or n in {f"tokenizer/{t}" for t in TOKENIZER_FILES}]
    return sorted([f"model_{steps[step]}.pt", f"meta_{steps[step]}.json", *tokenizer])


def verify(path, wanted, files, label):
    """Check each wanted file under `path` against the Hub's record of it (a RepoSibling: size, and lfs.sha256 or
    the git blob id); a mismatch deletes the file from the cache and raises HubError naming it."""
    for name in wanted:
        local, record = os.path.join(path, name), files[name]
        algorithm, expected = ("sha256", record.lfs.sha256) if record.lfs else ("git blob sha1", record.blob_id)
        size = record.lfs.size if record.lfs else record.size
        if expected is None or size is None:
            logger.warning(f"{label}: the Hub gives no size or checksum for {name}; it is not verified")
            continue
        actual_size = os.path.getsize(local)
        actual = _checksum(local, algorithm, actual_size)
        if (actual_size, actual) != (size, expected):
            _discard(local)
            raise HubError(f"{label}: the downloaded {name} does not match the Hub's record of it ({actual_size} "
                           f"bytes, {algorithm} {actual}; the Hub has {size} bytes, {expected}); it was deleted from "
                           f"the cache, so the next load downloads it again", name)


def _checksum(path, algorithm, size):
    """sha256 of the file (how the Hub names LFS files), or its git blob hash (sha1 of "blob <size>\\0" + bytes)."""
    sha = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _discard(local):
    """Delete a cached file: the snapshot's link and the blob it points to (else the cache would keep serving it)."""
    blob = os.path.realpath(local)
    os.remove(local)
    if blob != os.path.abspath(local) and os.path.exists(blob):
        os.remove(blob)


# -----------------------------------------------------------------------------
# huggingface_hub calls, their errors in our words

class _Unreachable(Exception):
    """The Hub did not answer (connection refused or dropped, timeout); __cause__ is huggingface_hub's error."""


def _hub_constants():
    """huggingface_hub's settings (endpoint, offline mode, cache); first, an error naming the extra if it is missing."""
    try:
        from huggingface_hub import constants
    except ImportError:
        raise ImportError('models from the Hugging Face Hub need huggingface_hub: pip install -e ".[hf]"') from None
    return constants


def _endpoint(endpoint):
    return (endpoint or os.environ.get("HF_ENDPOINT") or _hub_constants().ENDPOINT).rstrip("/")


def _transient(e):
    """Whether another try may succeed: no answer from the Hub, or an answer of its own failure (5xx)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    if isinstance(e, HfHubHTTPError):
        return e.response is not None and e.response.status_code >= 500
    return isinstance(e, (httpx2.TransportError, OSError))


def _model_info(src, endpoint, files_metadata):
    """HfApi.model_info, with the Hub's refusals as HubError and no answer as _Unreachable."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    try:
        return HfApi(endpoint=endpoint).model_info(src.repo_id, revision=src.revision, files_metadata=files_metadata)
    except GatedRepoError:
        raise HubError(f"{src} is gated on {endpoint}: accept its terms on the Hub, then log in (`hf auth login`) "
                       f"or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"no model repo {src.repo_id} on {endpoint}: it does not exist, or it is private (log in "
                       f"with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{src.repo_id} on {endpoint} has no revision {src.revision!r}") from None
    except HfHubHTTPError as e:
        if not _transient(e):
            raise HubError(f"{src}: the Hub at {endpoint} refused the request: {e}") from e
        raise _Unreachable() from e
    except Exception as e:
        if _transient(e):
            raise _Unreachable() from e
        raise


def _download(src, wanted, endpoint, cache_dir, max_attempts):
    """snapshot_download of the wanted files, retried on network errors (see the module docstring)."""
    from huggingface_hub import snapshot_download
    for attempt in range(1, max_attempts + 1):
        try:
            return snapshot_download(src.repo_id, revision=src.revision, allow_patterns=wanted, cache_dir=cache_dir,
                                     endpoint=endpoint)
        except Exception as e:
            if not _transient(e):
                raise
            if attempt == max_attempts:
                raise HubError(f"downloading {src} from {endpoint} failed {max_attempts} times; last: "
                               f"{type(e).__name__}: {e}") from e
            logger.warning(f"downloading {src}: {type(e).__name__}: {e}; trying again ({attempt}/{max_attempts})")
            time.sleep(attempt)


def _from_cache(src, step, cache_dir):
    """The snapshot in the cache with the files an online load would pick (from the cached repo listing)."""
    from huggingface_hub import constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError
    try:
        names = [f.path for f in get_cached_repo_tree(src.repo_id, revision=src.revision, cache_dir=cache_dir)]
        wanted = select_files(names, step, str(src))
        return snapshot_download(src.repo_id, revision=src.revision, allow_patterns=wanted, cache_dir=cache_dir,
                                 local_files_only=True)
    except (CachedRepoTreeNotFoundError, LocalEntryNotFoundError) as e:
        raise HubError(f"{src} is not (completely) in the Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}, "
                       f"and the Hub is not used (offline or unreachable): {e}") from None
