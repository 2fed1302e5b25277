"""Ray Data stream: exactly-once across 2 Ray workers, batch-for-batch identical to the plain loader, states that
resume in either loader (same or new world size), packing invariants. Documents are numbered "[i] ..." so ids can be
read back from the tokens."""
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import zip_longest

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import StreamCursor, tokenizing_distributed_data_loader_with_state_bos_bestfit as plain_loader
from nanochat.dataset import resolve_source
from ray_jobs.data_stream import ray_data_loader_with_state, ray_document_batches

N_FILES, DOCS_PER_FILE, RG = 3, 1000, 100  # 30 train units of 100 documents
LOADER = dict(B=4, T=64, buffer_size=50, tokenizer_batch_size=16)
RAY_OPTS = dict(num_actors=1, read_tasks=1)  # plenty for the tiny tokenizer; fewer processes to start on 2 cores


def doc_id(tokenizer, doc):
    return int(re.match(r"\[(\d+)\]", tokenizer.decode(doc[1:])).group(1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_corpus")
    fallback = resolve_source("fallback")
    paras = [p.strip() for u in fallback.units("train") for d in fallback.read_unit(u) for p in d.split("\n\n")
             if len(p.strip()) > 20]
    n = N_FILES * DOCS_PER_FILE
    texts = [f"[{i}] {paras[i % len(paras)][:160]}" for i in range(n + 200)]
    for f in range(N_FILES):
        pq.write_table(pa.table({"text": texts[f * DOCS_PER_FILE:(f + 1) * DOCS_PER_FILE]}),
                       root / f"train_{f}.parquet", row_group_size=RG)
    pq.write_table(pa.table({"text": texts[n:]}), root / "val.parquet", row_group_size=50)
    src = resolve_source(str(root / "train_*.parquet"), val=str(root / "val.parquet"))
    assert len(src.units("train")) == 30 and len(src.units("val")) == 4
    return src, n


class Recorder:
    """Plain-loader tokenizer that records the id of every document entering the packer."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=1):
        self.seen.extend(int(re.match(r"\[(\d+)\]", t).group(1)) for t in texts)
        return self.tok.encode(texts, prepend=prepend, num_threads=num_threads)


def _check_rows(x, y, bos):
    # rows were T+1 long before the shift, fully used (no padding), and start at a document boundary
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (LOADER["B"], LOADER["T"])
    assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == bos).all()
    assert x.is_contiguous() and y.is_contiguous()


def _lockstep(ray_it, plain_it, bos, steps=None, on_step=None):
    """Advance both loaders together, asserting identical batches and states; returns the number of steps.
    on_step(step, state) is called after each one."""
    n = 0
    try:
        for got, want in zip_longest(ray_it, plain_it):
            assert got is not None and want is not None, f"one stream ended first, at step {n}"
            (x, y, s), (xp, yp, sp) = got, want
            _check_rows(x, y, bos)
            assert torch.equal(x, xp) and torch.equal(y, yp) and s == sp, f"step {n}"
            n += 1
            if on_step:
                on_step(n, s)
            if n == steps:
                break
    finally:
        ray_it.close()
    return n


def _concurrently(*fns):
    """Run the callables in threads at once (like Train workers, each starting its own Ray Data job)."""
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result(timeout=300) for f in [pool.submit(fn) for fn in fns]]


def test_two_concurrent_workers_exactly_once_and_resume_in_either_loader(ray_local, tiny_tokenizer, corpus,
                                                                          tmp_path):
    src, n = corpus
    bos = tiny_tokenizer.get_bos_token_id()

    # 1. two workers of W=2 at the same time (threads here, Train workers in training), each a Ray Data job, one
    # epoch: every batch and state equals the plain loader's, whose tokenizer records which documents entered the
    # packer. A snapshot of each state is kept at an uneven point (rank 0 ahead of rank 1), for the resume below.
    snap_at, snaps, seen, seen_at_snap = {0: 30, 1: 9}, {}, {}, {}

    def worker(rank):
        rec = Recorder(tiny_tokenizer)

        def on_step(step, state):
            if step == snap_at[rank]:
                snaps[rank], seen_at_snap[rank] = json.loads(json.dumps(state)), list(rec.seen)

        steps = _lockstep(ray_data_loader_with_state(tiny_tokenizer, split="train", source=src, rank=rank,
                                                     world_size=2, num_epochs=1, **LOADER, **RAY_OPTS),
                          plain_loader(rec, split="train", source=src, rank=rank, world_size=2, num_epochs=1,
                                       **LOADER), bos, on_step=on_step)
        seen[rank] = rec.seen
        return steps

    steps = _concurrently(partial(worker, 0), partial(worker, 1))
    assert min(steps) > 100
    assert all((i // RG) % 2 == rank for rank in range(2) for i in seen[rank])  # own units only: r, r+2, ...
    assert seen[0] == sorted(seen[0]) and seen[1] == sorted(seen[1])          # in order (preserve_order)
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == set(range(n)) and set(counts.values()) == {1}      # exactly once across workers

    saved = [snaps[0], snaps[1]]
    before = Counter(seen_at_snap[0] + seen_at_snap[1])
    assert any(s["partial_docs"] for s in saved)

    # 2. resume, with the plain loader on the Ray states and the Ray loader on the plain ones (they are equal, above):
    # (a) same world size, a few steps; (b) a new one (W=1; each actor loads the tokenizer from the storage root), to
    # the end of the epoch. Identical throughout, and nothing is read twice or skipped: only what sat in the old
    # packing buffers is lost. Both run at once, to overlap the Ray Data start-ups.
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    rec = Recorder(tiny_tokenizer)
    same_world = partial(_lockstep, ray_data_loader_with_state(tiny_tokenizer, split="train", source=src, rank=1,
                                                               world_size=2, resume_state_dict=saved, **LOADER,
                                                               **RAY_OPTS),
                         plain_loader(tiny_tokenizer, split="train", source=src, rank=1, world_size=2,
                                      resume_state_dict=saved, **LOADER), bos, steps=5)
    new_world = partial(_lockstep, ray_data_loader_with_state(str(tmp_path), split="train", source=src, rank=0,
                                                              world_size=1, resume_state_dict=saved, num_epochs=1,
                                                              **LOADER, **RAY_OPTS),
                        plain_loader(rec, split="train", source=src, rank=0, world_size=1, resume_state_dict=saved,
                                     num_epochs=1, **LOADER), bos)
    steps_same, steps_new = _concurrently(same_world, new_world)
    assert steps_same == 5 and steps_new > 100
    after = Counter(rec.seen)
    assert max(before.values()) == max(after.values()) == 1
    assert not set(before) & set(after) and set(before) | set(after) == set(range(n))


def test_val_stream_documents_and_batches(ray_local, tiny_tokenizer, corpus):
    src, n = corpus
    bos = tiny_tokenizer.get_bos_token_id()

    def document_ids():  # the Ray document stream itself, decoded
        units = src.units("val")
        cursor = StreamCursor(len(units), 1, 2, split="val")
        ids = []
        for docs, unit, unit_done in ray_document_batches(tiny_tokenizer, src, units, cursor, 16, num_epochs=1,
                                                          **RAY_OPTS):
            assert all(d[0] == bos for d in docs)
            ids.extend(doc_id(tiny_tokenizer, d) for d in docs)
            cursor.record(len(docs), unit_done, unit)
        return ids

    batches = partial(_lockstep, ray_data_loader_with_state(tiny_tokenizer, split="val", source=src, rank=1,
                                                            world_size=2, **LOADER, **RAY_OPTS),
                      plain_loader(tiny_tokenizer, split="val", source=src, rank=1, world_size=2, **LOADER), bos)
    ids, steps = _concurrently(document_ids, batches)
    assert ids == [n + i for i in range(200) if (i // 50) % 2 == 1]  # this worker's units 1 and 3, once, in order
    assert steps > 5  # the val loader is finite, and batch for batch the plain (deterministic) one
    with pytest.raises(ValueError, match="not resumable"):
        next(ray_data_loader_with_state(tiny_tokenizer, 2, 16, "val", source=src, resume_state_dict={}, rank=0,
                                        world_size=1))
