"""BOS best-fit packing, exactly-once striping over workers, resume on a different world size, val determinism."""
import json
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import (BestFitPacker, StreamCursor, assign_units, merge_states, remaining_units,
                                 tokenizing_distributed_data_loader_bos_bestfit,
                                 tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_with_state)
from nanochat.dataset import resolve_source

BOS = 0


def doc(length, tag):
    return [BOS] + [tag] * (length - 1)


# -----------------------------------------------------------------------------
# packing on hand-made token lists

def test_largest_fitting_doc_is_chosen():
    p = BestFitPacker(B=1, T=9)  # rows of 10 tokens
    p.add([doc(5, 1), doc(3, 2), doc(8, 3), doc(2, 4), doc(11, 5)])
    assert p.pack_row() == doc(8, 3) + doc(2, 4)   # 8 is the largest that fits 10, then 2 fills the rest
    assert p.pack_row() == doc(5, 1) + doc(3, 2) + doc(11, 5)[:2]  # 5, then 3; nothing fits 2: crop the shortest


def test_shortest_doc_is_cropped_when_nothing_fits():
    p = BestFitPacker(B=1, T=9)
    p.add([doc(7, 1), doc(6, 2), doc(9, 3)])
    assert p.pack_row() == doc(9, 3) + doc(6, 2)[:1]  # 9 fits; remaining 1: the shortest (6) gives its BOS
    assert p.pack_row() is None and len(p) == 0       # 7 fits, then the documents run out: no partial row


def test_crop_takes_the_shortest_even_if_longer_ones_exist():
    p = BestFitPacker(B=1, T=9)
    p.add([doc(20, 1), doc(12, 2), doc(15, 3)])
    assert p.pack_row() == doc(12, 2)[:10]
    assert p.pack_row() == doc(15, 3)[:10]
    assert p.pack_row() == doc(20, 1)[:10]
    assert p.pack_row() is None


def test_ties_go_to_the_document_buffered_first():
    # regression: among equal-length documents that fit, the one added last was taken (nanochat takes the first)
    p = BestFitPacker(B=1, T=9)
    p.add([doc(4, 1), doc(4, 2), doc(6, 3), doc(6, 4), doc(20, 5), doc(20, 6)])
    assert p.pack_row() == doc(6, 3) + doc(4, 1)
    assert p.pack_row() == doc(6, 4) + doc(4, 2)
    assert p.pack_row() == doc(20, 5)[:10]  # nothing fits: the shortest, first buffered, is cropped
    assert p.pack_row() == doc(20, 6)[:10]


def nanochat_rows(docs, B, T, buffer_size, num_rows):
    """nanochat's best-fit loop written out: linear scans over a list buffer in insertion order, refilled to
    buffer_size before every pick; the largest doc that fits (first of equals), else crop the shortest (first)."""
    stream, buffer, rows = iter(docs), [], []
    for _ in range(num_rows):
        row = []
        while len(row) < T + 1:
            while len(buffer) < buffer_size:
                buffer.append(next(stream))
            remaining = T + 1 - len(row)
            best = max((i for i, d in enumerate(buffer) if len(d) <= remaining), default=-1,
                       key=lambda i: (len(buffer[i]), -i))
            row += buffer.pop(best) if best >= 0 else buffer.pop(min(range(len(buffer)),
                                                                     key=lambda i: len(buffer[i])))[:remaining]
        rows.append(row)
    return rows


def test_packing_gives_nanochats_rows():
    rng = random.Random(1)
    docs = [doc(rng.choice([3, 5, 5, 8, 12, 12, 30, 40]), 1 + i) for i in range(2000)]  # many equal lengths
    stream = iter(docs)
    p = BestFitPacker(B=4, T=31, buffer_size=24)

    def refill():
        p.add([next(stream)])
        return True
    ours = [row for _ in range(40) for row in p.pack_batch(refill)]
    assert ours == nanochat_rows(docs, 4, 31, 24, len(ours))


def test_rows_full_bos_aligned_and_made_of_doc_prefixes():
    rng = random.Random(0)
    docs = [doc(rng.randint(1, 40), 1 + i) for i in range(400)]  # tag = 1 + index, so segments are traceable
    stream = iter(docs)
    p = BestFitPacker(B=4, T=31, buffer_size=16, bos_token_id=BOS)
    exhausted = []

    def refill():
        d = next(stream, None)
        if d is None:
            exhausted.append(True)
            return False
        p.add([d])
        return True

    n_rows, used = 0, set()
    while (rows := p.pack_batch(refill)) is not None:
        assert exhausted or len(p) >= p.buffer_size - 1  # the buffer is kept full while documents remain
        for row in rows:
            n_rows += 1
            assert len(row) == 32 and row[0] == BOS  # full (no padding), starts with a document
            starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
            for a, b in zip(starts, starts[1:]):
                segment = row[a:b]
                if len(segment) > 1:
                    i = segment[1] - 1
                    assert segment == docs[i][:len(segment)] and i not in used
                    used.add(i)
    assert n_rows > 50


def test_buffer_is_refilled_to_buffer_size_before_each_pick():
    calls = []
    p = BestFitPacker(B=1, T=9, buffer_size=5)

    def refill():
        calls.append(len(p))
        p.add([doc(4, 1)])
        return True

    p.pack_row(refill)
    assert calls[:5] == [0, 1, 2, 3, 4]  # filled to 5 before the first pick
    assert len(p) >= 4                   # topped up again before the later picks


def test_packer_rejects_bad_documents():
    p = BestFitPacker(B=1, T=4, bos_token_id=BOS)
    with pytest.raises(ValueError, match="empty"):
        p.add([[]])
    with pytest.raises(ValueError, match="BOS"):
        p.add([[5, 6, 7]])


# -----------------------------------------------------------------------------
# unit assignment and state merging, at the cursor level

def test_cursor_striping_and_merge_to_new_world_size():
    n = 11
    cursors = [StreamCursor(n, r, 3) for r in range(3)]
    assert [[u for u, _ in c.assignment] for c in cursors] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    cursors[0].record(5, False)          # half of unit 0
    cursors[1].record(10, True)          # unit 1 done
    cursors[1].record(3, False)          # part of unit 4
    for _ in range(3):                   # worker 2 finishes its epoch: now in epoch 2
        cursors[2].record(10, True)
    cursors[2].record(10, True)          # ... and has done unit 2 of epoch 2
    states = [json.loads(json.dumps(c.state_dict())) for c in cursors]  # survives a JSON checkpoint
    plan = merge_states(list(reversed(states)))
    assert plan["epoch"] == 1
    assert plan["done"] == {"1": [[1, 3], [5, 6], [8, 9]], "2": [[2, 3]]}
    assert plan["partial"] == {"1": {"0": 5, "4": 3}}
    epoch, remaining = remaining_units(states)
    assert remaining == [(0, 5), (3, 0), (4, 3), (6, 0), (7, 0), (9, 0), (10, 0)]
    assert assign_units(plan, 1, 2) == [(3, 0), (6, 0), (9, 0)]
    # after the resumed epoch 1, epoch 2 skips unit 2 (already done by the old worker 2)
    c = StreamCursor(n, 0, 1, plan)
    for _ in remaining:
        c.record(1, True)
    assert c.epoch == 2 and [u for u, _ in c.assignment] == [0, 1] + list(range(3, 11))
    with pytest.raises(ValueError, match="all 3 workers"):
        merge_states(states[:2])
    with pytest.raises(ValueError, match="fewer than the 4 workers"):
        StreamCursor(3, 3, 4)


# -----------------------------------------------------------------------------
# the full loader on real text: a few thousand uniquely numbered Gutenberg paragraphs

N_FILES, DOCS_PER_FILE, RG = 3, 1000, 100   # 30 train units of 100 documents
LOADER = dict(B=4, T=64, buffer_size=50, tokenizer_batch_size=16, tokenizer_threads=1)


def _paragraphs():
    src = resolve_source("fallback")
    paras = []
    for u in src.units("train"):
        for d in src.read_unit(u):
            paras.extend(p.strip() for p in d.split("\n\n") if len(p.strip()) > 20)
    return paras


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paras = _paragraphs()
    n = N_FILES * DOCS_PER_FILE
    texts = [f"[{i}] {paras[i % len(paras)][:400]}" for i in range(n + 400)]
    for f in range(N_FILES):
        pq.write_table(pa.table({"text": texts[f * DOCS_PER_FILE:(f + 1) * DOCS_PER_FILE]}),
                       root / f"train_{f}.parquet", row_group_size=RG)
    pq.write_table(pa.table({"text": texts[n:]}), root / "val.parquet", row_group_size=50)
    src = resolve_source(str(root / "train_*.parquet"), val=str(root / "val.parquet"))
    assert len(src.units("train")) == 30 and len(src.units("val")) == 8
    return src, n


class RecordingTokenizer:
    """Wraps the tiny tokenizer and records the id of every document it tokenizes, i.e. every document that enters
    the packer (the loader tokenizes a batch and adds it to the packer at once)."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=1):
        self.seen.extend(int(re.match(r"\[(\d+)\]", t).group(1)) for t in texts)
        return self.tok.encode(texts, prepend=prepend, num_threads=num_threads)


def _run(tok, src, rank, world, steps=None, **kw):
    """Run one worker for `steps` batches (None: to the end); returns (recorder, last state, docs packed)."""
    rec = RecordingTokenizer(tok)
    bos = tok.get_bos_token_id()
    it = loader_with_state(rec, split=kw.pop("split", "train"), source=src, rank=rank, world_size=world,
                           **{**LOADER, **kw})
    state, packed, n = None, 0, 0
    for x, y, state in it:
        assert x.dtype == torch.int64 and x.shape == (LOADER["B"], LOADER["T"]) and torch.equal(x[:, 1:], y[:, :-1])
        packed += int((x == bos).sum() + (y[:, -1] == bos).sum())  # one BOS per document placed in a row
        n += 1
        if steps is not None and n == steps:
            break
    return rec, state, packed


def test_every_document_reaches_exactly_one_worker_once_per_epoch(tiny_tokenizer, corpus):
    src, n = corpus
    seen = []
    for rank in range(2):
        rec, state, _ = _run(tiny_tokenizer, src, rank, 2, num_epochs=1)
        assert len(rec.seen) == len(set(rec.seen))
        assert all((i // RG) % 2 == rank for i in rec.seen)  # worker r owns units r, r+2, ...
        seen.append(set(rec.seen))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_resume_on_any_world_size_repeats_nothing_and_loses_only_buffered(tiny_tokenizer, corpus, new_world):
    src, n = corpus
    # uneven progress: worker 0 further than worker 1; both stop mid-unit (16-doc tokenizer batches, 100-doc units)
    saved, before = [], Counter()
    for rank, steps in [(0, 40), (1, 23)]:
        rec, state, packed = _run(tiny_tokenizer, src, rank, 2, steps=steps)
        # every document that entered the packer is either in a yielded row or still in the buffer
        assert len(rec.seen) - packed == state["buffered_docs"]
        assert state["buffered_docs"] <= LOADER["buffer_size"] - 1 + LOADER["tokenizer_batch_size"]
        saved.append(json.loads(json.dumps(state)))
        before.update(rec.seen)
    assert any(s["partial_docs"] for s in saved)
    after = Counter()
    for rank in range(new_world):
        rec, _, _ = _run(tiny_tokenizer, src, rank, new_world, resume_state_dict=saved, num_epochs=1)
        after.update(rec.seen)
    assert max(before.values()) == 1 and max(after.values()) == 1
    assert not set(before) & set(after)          # nothing read twice
    assert set(before) | set(after) == set(range(n))  # nothing skipped at the reading level
    # so the documents lost to training are exactly those that sat in the packers at save time
    assert sum(s["buffered_docs"] for s in saved) < 2 * (LOADER["buffer_size"] + LOADER["tokenizer_batch_size"])


def test_resume_across_an_epoch_boundary(tiny_tokenizer, corpus):
    src, n = corpus
    seen = Counter()
    rec0 = RecordingTokenizer(tiny_tokenizer)
    it = loader_with_state(rec0, split="train", source=src, rank=0, world_size=2, **LOADER)
    for _, _, s0 in it:
        if s0["epoch"] == 2 and s0["position"] >= 2:  # worker 0 is well into epoch 2
            break
    rec1, s1, _ = _run(tiny_tokenizer, src, 1, 2, steps=10)  # worker 1 is still early in epoch 1
    seen.update(rec0.seen)
    seen.update(rec1.seen)
    states = [json.loads(json.dumps(s)) for s in (s0, s1)]
    plan = merge_states(states)
    assert plan["epoch"] == 1 and "2" in plan["done"]
    for rank in range(3):
        rec, state, _ = _run(tiny_tokenizer, src, rank, 3, resume_state_dict=states, num_epochs=2)
        seen.update(rec.seen)
    assert set(seen) == set(range(n)) and set(seen.values()) == {2}  # two epochs: every document exactly twice
    # a second resume from the resumed run's states works too (the plan is carried along)
    assert state["plan"] == plan


def test_resume_rejects_another_source(tiny_tokenizer, corpus):
    src, _ = corpus
    _, state, _ = _run(tiny_tokenizer, src, 0, 1, steps=2)
    with pytest.raises(ValueError, match="does not match the data source"):
        next(loader_with_state(tiny_tokenizer, 2, 16, "train", source="fallback", resume_state_dict=state,
                               rank=0, world_size=1))
    with pytest.raises(ValueError, match="all 2 workers"):
        _run(tiny_tokenizer, src, 0, 1, steps=1, resume_state_dict=[dict(state, world_size=2)])


def test_val_loader_is_deterministic_and_finite(tiny_tokenizer, corpus):
    src, n = corpus
    runs = []
    for _ in range(2):
        batches = list(tokenizing_distributed_data_loader_bos_bestfit(
            tiny_tokenizer, LOADER["B"], LOADER["T"], "val", source=src, rank=1, world_size=2, buffer_size=50))
        runs.append(torch.stack([torch.stack([x, y]) for x, y in batches]))
    assert runs[0].shape[0] > 5 and torch.equal(runs[0], runs[1])
    rec, _, _ = _run(tiny_tokenizer, src, 1, 2, split="val")
    assert sorted(rec.seen) == rec.seen and {(i - n) // 50 % 2 for i in rec.seen} == {1}  # in order, own units
    with pytest.raises(ValueError, match="not resumable"):
        next(loader_with_state(tiny_tokenizer, 2, 16, "val", source=src, resume_state_dict={}, rank=0,
                               world_size=1))


def test_fallback_source_and_dist_defaults(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    bos = tiny_tokenizer.get_bos_token_id()
    for split in ["train", "val"]:
        it = loader_with_state(tiny_tokenizer, 2, 64, split, source="fallback", buffer_size=20,
                               tokenizer_batch_size=8)
        for _ in range(3):
            x, y, state = next(it)
            assert x.shape == y.shape == (2, 64) and (x[:, 0] == bos).all()
        assert state["rank"] == 1 and state["world_size"] == 2 and state["split"] == split
        assert state["pq_idx"] == 0 and state["rg_idx"] % 2 == 1
