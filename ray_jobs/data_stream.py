"""
Ray Data feeding one training worker: the same stream as the plain loader, tokenized in CPU actors.

Why not one shared dataset + streaming_split: it balances rows dynamically, so which document reaches which
worker is not reproducible and there is no cursor to resume from. Instead each worker runs its own small Ray Data
job over ITS units (StreamCursor: units r, r+W, ... of the split, minus what a resume plan says is consumed):

    from_items(units, in cursor order)                     ~docs_per_block documents per block
    -> map_batches(_read_unit_chunks)   read tasks         documents, cut into tokenizer_batch_size chunks
    -> map_batches(_Tokenize)           CPU actor pool     BOS + encode_ordinary_batch (tokenizer loaded once)
    -> iter_batches, preserve_order     on the worker      chunks, in cursor order
    -> BestFitPacker + StreamCursor                        (B, T+1) rows and the resumable state

Chunks are cut exactly as nanochat.dataloader.document_batches cuts them and enter the packer one per refill, so
the batches and state dicts are IDENTICAL to the plain loader's: a checkpoint taken with one resumes with the other,
on any world size (merge_states). The Ray job only moves work off the training process; all the logic is shared.

Memory / CPU knobs (StreamOptions, per worker):
- object_store_memory: Ray Data's backpressure budget for this job's in-flight blocks (default 256 MiB), so a
  100-shard dataset streams in bounded memory: units are read lazily in cursor order, a block is about one parquet
  row group (~2.5 MB of text, ~4 MB of tokens on the hub shards), at most prefetch_batches blocks wait on the worker.
- num_actors x actor_cpus, read_tasks x read_cpus: fractional CPUs, so trainers and readers do not starve each
  other (whole-CPU actors next to 1-CPU trainers can leave no CPU for the read tasks: a silent hang, P1).
- docs_per_block: small units (.txt/.jsonl blocks) are grouped, since each block costs a task and an actor call.
- units_per_job: one Ray Data job covers this many units (crossing epochs); the next job starts when it is drained
  (a few seconds of start-up, once per ~1000 row groups on the hub data).
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from nanochat import storage

# The UDFs below run in Ray worker processes that import this module: keep torch out of the top-level imports
# (a torch import costs seconds per actor on a small box). The loader imports it lazily.

DEFAULT_OBJECT_STORE_MEMORY = 256 * 2**20
DEFAULT_UNITS_PER_JOB = 1024
_SOURCES = {}  # per-process cache of DataSources (a .jsonl source parses its file once, not once per unit)


def _cached_source(source):
    key = (source.name, tuple(source.train_files), tuple(source.val_files or ()), source.block_docs,
           source.val_fraction)
    if key not in _SOURCES:
        _SOURCES.clear()
        _SOURCES[key] = source
    return _SOURCES[key]


def _read_unit_chunks(items, source, chunk_docs):
    """Read stage: for each unit item, its documents from `start` on, flagged by chunk (as document_batches cuts
    them). A unit with nothing left still sends one row with text=None, so the worker can record it as done."""
    from nanochat.dataset import Unit
    src = _cached_source(source)
    units, texts, chunk_end, unit_done = [], [], [], []
    for unit, path, index, start in zip(items["unit"].tolist(), items["path"].tolist(), items["index"].tolist(),
                                        items["start"].tolist()):
        docs = src.read_unit(Unit(path, index))[start:]
        if not docs:
            units.append(unit), texts.append(None), chunk_end.append(True), unit_done.append(True)
            continue
        for i, text in enumerate(docs):
            last = i == len(docs) - 1
            units.append(unit)
            texts.append(text)
            chunk_end.append(last or (i + 1) % chunk_docs == 0)
            unit_done.append(last)
    return pa.table({"unit": pa.array(units, pa.int64()), "text": pa.array(texts, pa.string()),
                     "chunk_end": pa.array(chunk_end), "unit_done": pa.array(unit_done)})


def load_encoding(tokenizer):
    """A tiktoken.Encoding from: an Encoding, a RustBPETokenizer (anything with .enc), a tokenizer directory
    (holding tokenizer.pkl) or a storage root (holding tokenizer/tokenizer.pkl)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from nanochat.tokenizer import RustBPETokenizer
        path = os.fspath(tokenizer)
        for candidate in (path, storage.join(path, "tokenizer")):
            try:
                return RustBPETokenizer.from_directory(candidate).enc
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"no tokenizer.pkl in {path} or {path}/tokenizer")
    return getattr(tokenizer, "enc", tokenizer)


class _Tokenize:
    """Actor stage: loads the tokenizer once (shipped by object, or by path on shared storage), then encodes
    batches of documents with BOS prepended. Rows with text=None are markers and get no tokens."""

    def __init__(self, tokenizer, threads=1):
        self.enc = load_encoding(tokenizer)
        self.bos = self.enc.encode_single_token("<|bos|>")
        self.threads = threads  # the pool is the parallelism; more threads only help with whole-CPU actors

    def __call__(self, batch):
        texts = batch.column("text").to_pylist()
        encoded = iter(self.enc.encode_ordinary_batch([t for t in texts if t is not None], num_threads=self.threads))
        # one flat int32 buffer + offsets (no per-token Python objects on either side of the object store)
        docs = [None if t is None else next(encoded) for t in texts]
        offsets = np.zeros(len(docs) + 1, dtype=np.int32)
        np.cumsum([0 if d is None else len(d) + 1 for d in docs], out=offsets[1:])
        values = np.empty(offsets[-1], dtype=np.int32)
        for d, start in zip(docs, offsets[:-1].tolist()):
            if d is not None:
                values[start] = self.bos
                values[start + 1:start + 1 + len(d)] = d
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        return batch.drop_columns(["text"]).append_column("tokens", tokens)


def _upcoming_units(cursor, num_epochs, max_units):
    """[(unit_idx, start_doc), ...]: the next units the cursor will read, across epochs (stops after num_epochs),
    found by walking a copy of it."""
    from nanochat.dataloader import StreamCursor
    sim = StreamCursor.from_state_dict(cursor.state_dict())
    out = []
    while len(out) < max_units and (num_epochs is None or sim.epoch <= num_epochs):
        out.append(sim.current())
        sim.record(0, True)
    return out


@dataclass
class StreamOptions:
    """Ray Data knobs of one worker's stream (module doc)."""
    num_actors: int = 2            # tokenizer actors
    actor_cpus: float = 0.5        # logical CPUs reserved per actor
    read_tasks: int = 2            # concurrent read tasks (fractional CPUs alone would let Ray start dozens)
    read_cpus: float = 0.25
    prefetch_batches: int = 4      # blocks (= units) kept ready ahead of the packer
    object_store_memory: int = DEFAULT_OBJECT_STORE_MEMORY  # backpressure budget of this job's blocks
    units_per_job: int = DEFAULT_UNITS_PER_JOB
    docs_per_block: int = 1024     # units are grouped into blocks of about this many documents (an actor call each)
    tokenizer_threads: int = 1     # per actor; the pool is the parallelism


def _build_dataset(source, units, upcoming, tokenizer, chunk_docs, opt):
    import ray.data

    from nanochat.dataset import file_kind
    from ray.data import ActorPoolStrategy, ExecutionResources, TaskPoolStrategy
    items = [{"unit": u, "path": units[u].path, "index": units[u].index, "start": s} for u, s in upcoming]
    # a block (read task, actor call) per ~docs_per_block documents: each block costs ~10 ms of Ray overhead, which
    # dwarfs tokenizing the fallback's 8-doc units; a parquet row group (1024 docs on the hub) is a block of its own
    per_unit = 1024 if file_kind(items[0]["path"]) == "parquet" else source.block_docs
    units_per_block = max(1, opt.docs_per_block // per_unit)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / units_per_block))
    ds = ds.map_batches(_read_unit_chunks, batch_size=None, batch_format="numpy", num_cpus=opt.read_cpus,
                        compute=TaskPoolStrategy(size=opt.read_tasks),
                        fn_kwargs={"source": source, "chunk_docs": chunk_docs})
    ds = ds.map_batches(_Tokenize, batch_size=None, batch_format="pyarrow", num_cpus=opt.actor_cpus,
                        compute=ActorPoolStrategy(size=opt.num_actors),
                        fn_constructor_args=(tokenizer, opt.tokenizer_threads))
    # this dataset's own copy of the DataContext (taken at from_items): order matters, the budget bounds memory
    ds.context.execution_options.preserve_order = True
    if opt.object_store_memory:
        ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=opt.object_store_memory)
    ds.context.enable_progress_bars = False
    return ds


def ray_document_batches(tokenizer, source, units, cursor, tokenizer_batch_size=128, num_epochs=None, **options):
    """Like nanochat.dataloader.document_batches, but tokenized: yield (docs, unit_idx, unit_done) where docs are
    token lists starting with BOS, in cursor order and the same chunks. The consumer must call
    cursor.record(len(docs), unit_done, unit_idx) once they are in its packer, before asking for more.
    tokenizer: as for ray_data_loader_with_state; options: StreamOptions fields."""
    opt = StreamOptions(**options)
    if not isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_encoding(tokenizer)  # ship the bare Encoding, not a wrapper
    while True:
        upcoming = _upcoming_units(cursor, num_epochs, opt.units_per_job)
        if not upcoming:
            return
        start = (cursor.epoch, cursor.position)
        ds = _build_dataset(source, units, upcoming, tokenizer, tokenizer_batch_size, opt)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                       prefetch_batches=opt.prefetch_batches))
        try:
            docs, n_chunks = [], 0
            for table in batches:
                flat = table.column("tokens").combine_chunks()
                offsets, values = flat.offsets.to_numpy(), flat.values.to_numpy()
                cols = [table.column(c).to_pylist() for c in ("unit", "chunk_end", "unit_done")]
                for k, (unit, chunk_end, unit_done) in enumerate(zip(*cols)):
                    if offsets[k + 1] > offsets[k]:
                        docs.append(values[offsets[k]:offsets[k + 1]].tolist())
                    if chunk_end:
                        yield docs, unit, unit_done
                        docs, n_chunks = [], n_chunks + 1
        finally:
            if hasattr(batches, "close"):
                batches.close()  # a consumer that stops early shuts the job (and its actors) down now, not at GC
        if n_chunks and (cursor.epoch, cursor.position) == start:
            raise RuntimeError("ray_document_batches: the consumer did not call cursor.record() for each batch")


def ray_data_loader_with_state(tokenizer, B, T, split, device="cpu", resume_state_dict=None, source="auto",
                               rank=None, world_size=None, buffer_size=1000, tokenizer_batch_size=128,
                               num_epochs=None, num_actors=2, **options):
    """Yield (inputs, targets, state_dict) exactly like tokenizing_distributed_data_loader_with_state_bos_bestfit
    (same arguments, same batches, same state format), with tokenization in a Ray Data actor pool.

    tokenizer: a RustBPETokenizer / tiktoken.Encoding (shipped to the actors by object), or a tokenizer directory or
    storage root path (each actor loads it from there: the path must be readable on every node). Call it from a
    Ray Train worker (or any process connected to Ray); rank / world_size default to get_dist_info().
    num_actors and the other keyword options (StreamOptions) size the Ray Data job; they do not change the batches."""
    from nanochat.dataloader import BestFitPacker, packed_batches, worker_cursor

    src, units, cursor, num_epochs = worker_cursor(source, split, rank, world_size, resume_state_dict, num_epochs)
    enc = load_encoding(tokenizer)
    packer = BestFitPacker(B, T, buffer_size, bos_token_id=enc.encode_single_token("<|bos|>"))
    docs = ray_document_batches(tokenizer if isinstance(tokenizer, (str, os.PathLike)) else enc, src, units, cursor,
                                tokenizer_batch_size, num_epochs, num_actors=num_actors, **options)

    def refill():
        try:
            tokens, unit, unit_done = next(docs)
        except StopIteration:
            return False
        if tokens:
            packer.add(tokens)
        cursor.record(len(tokens), unit_done, unit)
        return True

    try:
        yield from packed_batches(packer, refill, cursor, units, device)
    finally:
        docs.close()

