"""Task base class, mixtures, multiple-choice rendering and the data loader shared by all tasks.

A task is an indexable collection of conversations ({"messages": [...], ...extra}). Data comes from the
HuggingFace Hub by default (`datasets.load_dataset`) or from local files when a `data_path` is given, so
everything also works offline (as with the pack shipped in nanochat/data/tasks/).
"""
import gzip
import json
import math
import random
from bisect import bisect_right
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# Task base and combinators


class Task:
    """A logical slice [start:stop:step] over a subclass's examples.
    Subclasses set eval_type ('categorical' | 'generative') and define get_example(index) and
    evaluate(conversation, response), and num_examples() unless their rows are in self.ds; reward() defaults to
    float(evaluate()). `stop` is clamped to num_examples(), so e.g. stop=5200 on a partial test split simply takes
    what is there."""
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, response):
        raise NotImplementedError

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range ({n} examples)")
        return self.get_example(self.start + i * self.step)


class TaskMixture(Task):
    """All examples of all tasks, in one deterministic shuffled order (random.Random(42)), so that training
    sees the tasks interleaved. Pass a task several times to oversample it."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(ti, li) for ti, task in enumerate(self.tasks) for li in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        ti, li = self.index_map[index]
        return self.tasks[ti][li]


class TaskSequence(Task):
    """The tasks one after another, unshuffled (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0]  # offsets[i] = index of tasks[i]'s first example
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        ti = bisect_right(self.offsets, index) - 1
        return self.tasks[ti][index - self.offsets[ti]]


def render_mc(question, letters, choices):
    """The multiple-choice prompt. The letter comes right after '=' with no space: small models bind the
    letter token to its choice better this way, and the answer is then the bare letter token."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def validate_messages(messages, allow_system=True):
    """Check a chat message list: optional leading system message (if allowed), then user/assistant strictly
    alternating starting with user, at least 2 of them, every content a str. Raises ValueError (message
    without location; callers add the file/line or example index)."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    rest = messages
    if messages and messages[0]["role"] == "system":
        if not allow_system:
            raise ValueError("system messages are not allowed here")
        rest = messages[1:]
    if len(rest) < 2:
        raise ValueError(f"need at least 2 user/assistant messages, got {len(rest)}")
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            pos = i + len(messages) - len(rest)
            raise ValueError(f"message {pos} has role {m['role']!r}, expected {expected!r} "
                             f"(roles must alternate user/assistant, starting with user)")
    return messages


# -----------------------------------------------------------------------------
# Data loading: Hub (default) or local files

LOCAL_EXTENSIONS = (".jsonl.gz", ".jsonl", ".parquet", ".json.gz", ".json")


def load_split(repo, subset, split, data_path=None, shuffle_seed=42, required=()):
    """Rows (dicts, indexable, with len) of one dataset split.
    data_path None: `datasets.load_dataset(repo, subset, split=split)` from the HuggingFace Hub.
    data_path a file: that file (.jsonl, .jsonl.gz, .parquet, .json list of objects, .json.gz).
    data_path a directory: the split's file(s) in it, see find_split_files().
    shuffle_seed: None keeps file order; otherwise the order is np.random.default_rng(seed).permutation(n),
    which is exactly what `datasets.Dataset.shuffle(seed=seed)` does, so Hub and local copies of the same
    data give the same order. required: field names every row must have."""
    if data_path is None:
        return _load_hub(repo, subset, split, shuffle_seed, required)
    rows = []
    for path in find_split_files(data_path, split):
        rows.extend(read_rows(path, required))
    return rows if shuffle_seed is None else shuffle_rows(rows, shuffle_seed)


def shuffle_rows(rows, seed=42):
    """A shuffled copy of a list, in the same order `datasets.Dataset.shuffle(seed=seed)` produces."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def _load_hub(repo, subset, split, shuffle_seed, required):
    import datasets  # imported lazily: slow to import, and only needed for the Hub path

    try:
        ds = datasets.load_dataset(repo, subset, split=split)
    except Exception as e:
        raise RuntimeError(f"could not load {repo} (subset={subset!r}, split={split!r}) from the HuggingFace "
                           f"Hub: {e}. Offline? Pass data_path= pointing at local files.") from e
    missing = [k for k in required if k not in ds.column_names]
    if missing:
        raise ValueError(f"{repo} ({subset}, {split}) lacks column(s) {missing}; it has {ds.column_names}")
    return ds if shuffle_seed is None else ds.shuffle(seed=shuffle_seed)


def find_split_files(data_path, split):
    """Resolve data_path to the list of files holding `split`. A file is returned as is. In a directory, the
    first match wins: a subdirectory named after the split (all its data files, sorted: the layout of HF
    parquet exports), `{split}.jsonl.gz` / `.jsonl` / `.parquet` / `.json.gz` / `.json`, or HF-style shards
    `{split}-*.parquet` / `{split}-*.jsonl[.gz]` (sorted)."""
    path = Path(data_path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"data file or directory not found: {path}")
    if (path / split).is_dir():
        files = sorted(p for p in (path / split).iterdir() if p.name.endswith(LOCAL_EXTENSIONS))
        if files:
            return files
    for ext in LOCAL_EXTENSIONS:
        if (path / f"{split}{ext}").is_file():
            return [path / f"{split}{ext}"]
    shards = sorted(p for p in path.glob(f"{split}-*") if p.name.endswith(LOCAL_EXTENSIONS))
    if shards:
        return shards
    raise FileNotFoundError(f"no data for split {split!r} in {path}: expected {split}.jsonl.gz, {split}.jsonl, "
                            f"{split}.parquet, {split}.json or {split}-*.parquet shards")


class DataFileError(ValueError):
    """A local data file is unreadable or malformed; the message starts with the file's path."""


def read_rows(path, required=()):
    """Read one local data file into a list of dicts; any problem raises an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        rows, where = _parse_file(path)
    except DataFileError:
        raise
    except Exception as e:  # truncated or non-gzip data, bad encoding, corrupt parquet (ArrowInvalid), ...
        raise DataFileError(f"{path}: cannot read data file: {type(e).__name__}: {e}") from e
    for row, loc in zip(rows, where):
        if not isinstance(row, dict):
            raise DataFileError(f"{loc}: each row must be a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataFileError(f"{loc}: row lacks field(s) {missing}")
    return rows


def _parse_file(path):
    """(rows, locations), a location per row ('file:line' or 'file row i') for error messages."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
        return rows, [f"{path} row {i}" for i in range(len(rows))]
    if name.endswith((".jsonl", ".jsonl.gz")):
        rows, where = [], []
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path}:{lineno}: invalid JSON: {e}") from None
                where.append(f"{path}:{lineno}")
        return rows, where
    if name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataFileError(f"{path}: a .json data file must hold a list of objects")
        return rows, [f"{path} item {i}" for i in range(len(rows))]
    raise DataFileError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_EXTENSIONS)}")


def _open_text(path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")
