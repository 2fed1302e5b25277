"""nanochat/paged_cache.py: block allocation, the prefix cache (match, register, LRU eviction, notes), and the model's
forward over rows packed into one giving the logits of a plain forward."""
import random

import pytest
import torch

from conftest import perturbed
from nanochat.gpt import GPTConfig, build_model
from nanochat.paged_cache import BlockPool, PackedBatch, PagedRow, block_bytes

# smear, value embeddings, GQA and a sliding window (128 of 256) all on
CONFIG = dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL")


def pool(num_blocks=8, block_size=4, prefix_cache=True):
    return BlockPool(1, num_blocks, block_size, 1, 2, prefix_cache=prefix_cache)


def test_allocate_release_and_the_scratch_block():
    p = pool()
    assert p.usable_blocks == 7 and p.available() == 7
    a = p.allocate(3)
    assert len(a) == 3 and 0 not in a and p.used() == 3
    assert p.allocate(5) is None and p.available() == 4  # all or nothing
    p.release(a)
    assert p.available() == 7 and p.used() == 0
    assert p.allocate(3) == a  # released blocks are taken again in their order: consecutive ones stay so
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1, 1, 4, 1, 2)


def test_prefix_match_shares_blocks_and_leaves_the_last_token_to_compute():
    p = pool()
    tokens = list(range(10))  # two full blocks of 4, and 2 tokens
    blocks = p.allocate(3)
    parent = None
    for i in range(2):
        parent = p.register(blocks[i], parent, tokens[4 * i:4 * i + 4])
    assert p.match(tokens[:3]) == ([], [])  # shorter than a block
    hit, keys = p.match(tokens + [99])
    assert hit == blocks[:2] and keys[-1] == parent and p.refs[blocks[0]] == 2
    assert p.match(tokens[:8])[0] == blocks[:1]  # 8 tokens: the 8th must be computed, so only block 0 is taken
    assert p.match([7] + tokens[1:])[0] == []  # a different first token shares nothing
    off = pool(prefix_cache=False)
    b = off.allocate(1)
    off.register(b[0], None, tokens[:4])
    assert off.match(tokens)[0] == []


def test_unused_cached_blocks_are_evicted_least_recently_used_first():
    p = pool(num_blocks=4, block_size=2)  # 3 usable
    a, b = p.allocate(1), p.allocate(1)
    p.register(a[0], None, [1, 2])
    p.register(b[0], None, [3, 4])
    p.release(a)
    p.release(b)
    assert p.available() == 3 and len(p.entry) == 2  # cached, yet available
    assert p.match([1, 2, 0])[0] == a  # a is used again: b is now the least recently used
    p.release(a)
    assert p.allocate(2) is not None and p.evictions == 1
    assert p.match([3, 4, 0])[0] == [] and p.match([1, 2, 0])[0] == a  # b's prefix left the cache, a's stayed


def test_a_note_stays_beside_its_cached_prefix_until_the_prefix_leaves():
    p = pool(num_blocks=3, block_size=2)  # 2 usable
    a, b = p.allocate(1), p.allocate(1)
    key = p.register(a[0], None, [1, 2])
    private = p.register(b[0], None, [1, 2])  # the same prefix: cached in a only, so the note is the prefix's
    p.annotate(private, "kept")
    p.annotate(hash(("not", "cached")), "dropped")
    assert private == key and p.note(key) == "kept" and len(p.notes) == 1
    p.release(a + b)
    assert p.note(key) == "kept"  # unused but still cached
    p.allocate(2)  # a is reused for something else: its prefix and its note leave
    assert p.note(key) is None and p.notes == {}


def test_a_prefix_computed_twice_keeps_one_copy_in_the_cache():
    p = pool()
    a, b = p.allocate(1), p.allocate(1)
    key_a = p.register(a[0], None, [5, 6, 7, 8])
    assert p.register(b[0], None, [5, 6, 7, 8]) == key_a  # same key, so descendants chain the same way
    p.release(b)
    assert b[0] in p.free and p.match([5, 6, 7, 8, 9])[0] == a


def test_budget_in_bytes():
    model = build_model(GPTConfig(**CONFIG))
    per_block = block_bytes(4, 16, 2, 16, torch.float32)
    assert per_block == 2 * 4 * 16 * 2 * 16 * 4
    p = BlockPool.for_model(model, 10.5 * per_block, block_size=16)
    assert p.num_blocks == 10 and p.k.shape == (4, 160, 2, 16)


@pytest.mark.parametrize("block_size,scattered", [(16, True), (5, True), (16, False)])
def test_packed_forward_matches_the_plain_forward(block_size, scattered):
    """Rows in scattered (or consecutive: read as slices) blocks, at different lengths, packed into one forward per
    step: prompt chunks of different sizes beside rows decoding one token (once a row's chunks are done it decodes,
    while the others still prefill), give the logits of a plain forward over each whole sequence (past the
    128-token window too)."""
    torch.manual_seed(0)
    model = perturbed(build_model(GPTConfig(**CONFIG)), scale=0.1).eval()
    lengths = [200, 37, 150]
    seqs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    p = BlockPool.for_model(model, 100 * block_bytes(4, block_size, 2, 16, torch.float32), block_size)
    order = list(range(1, p.num_blocks))
    if scattered:
        random.Random(0).shuffle(order)  # blocks far from contiguous
    rows = []
    for n in lengths:
        k = p.blocks_for(n)
        rows.append(PagedRow(order[:k]))
        order = order[k:]
    assert all(len(r.blocks) == p.blocks_for(n) for r, n in zip(rows, lengths))
    sliced = [g.base is not None for g in PackedBatch(p, rows, [30, 30, 30]).groups]
    assert sliced == [not scattered] * 3
    chunks = [[60, 70, 60], [30], [100, 40]]  # prompt chunks per row, then one token per step to the end
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
        got, prev, steps, mixed = [[] for _ in seqs], {}, 0, 0
        while any(r.length < n for r, n in zip(rows, lengths)):
            live = [i for i in range(3) if rows[i].length < lengths[i]]
            spans = [chunks[i].pop(0) if chunks[i] else 1 for i in live]
            mixed += 1 in spans and any(n > 1 for n in spans)
            ids = torch.cat([seqs[i][rows[i].length:rows[i].length + n] for i, n in zip(live, spans)])[None]
            batch_prev = torch.cat([prev[i] for i in live]) if prev else None
            cache = PackedBatch(p, [rows[i] for i in live], spans, batch_prev)
            logits = model(ids, kv_cache=cache)[0]
            for j, (i, part) in enumerate(zip(live, logits.split(spans))):
                got[i].append(part)
                prev[i] = cache.prev_embedding[j:j + 1]
            steps += 1
    assert mixed == 2 and steps == 3 + 10  # decode tokens beside prompt chunks twice; row 0: 3 chunks, 10 tokens
    for ref, parts, n in zip(refs, got, lengths):
        torch.testing.assert_close(torch.cat(parts), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scattered", [False, True])
def test_rows_in_step_decode_past_the_window(scattered):
    """Rows at the same position (n samples of one prompt) decode in one group that needs no mask, past the 128-token
    window too. In consecutive blocks at an even spacing (requests admitted together with the same reservation) their
    keys are read and written through a strided view of the pool, with no index tables at all; scattered, their keys
    are gathered. Either way: the plain forward's logits (last_only: each row's one token)."""
    torch.manual_seed(0)
    model = perturbed(build_model(GPTConfig(**CONFIG)), scale=0.1).eval()
    seqs = [torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    p = BlockPool.for_model(model, 40 * block_bytes(4, 16, 2, 16, torch.float32), 16)
    order = p.allocate(30)
    if scattered:
        random.Random(0).shuffle(order)
    rows = [PagedRow(order[i * 10:(i + 1) * 10]) for i in range(3)]  # 10 blocks each
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
        cache = PackedBatch(p, rows, [140] * 3)
        model(torch.cat([s[:140] for s in seqs])[None], kv_cache=cache)
        prev, got = cache.prev_embedding, []
        for t in range(140, 150):
            cache = PackedBatch(p, rows, [1] * 3, prev)
            (group,) = cache.groups
            assert group.size == 3 and group.in_step and (group.base is None) == scattered
            assert (cache.write_view is None) == scattered  # in a view: new keys written through one too
            assert group.row_stride == (0 if scattered else 10 * 16)
            got.append(model(torch.stack([s[t] for s in seqs])[None], kv_cache=cache, last_only=True)[:, 0])
            assert all(mask is None for mask, _ in group.plans.values())
            prev = cache.prev_embedding
    for i, ref in enumerate(refs):
        torch.testing.assert_close(torch.stack([g[i] for g in got]), ref[140:], rtol=1e-4, atol=1e-4)


def test_a_rows_slots_and_consecutive_blocks():
    row = PagedRow([7, 8, 9, 3, 4])
    assert row.consecutive == 3 and PagedRow([]).consecutive == 0 and PagedRow([5]).consecutive == 1
    assert row.slots(2, 10, 4) == [30, 31, 32, 33, 34, 35, 36, 37]  # blocks 7 and 8 follow each other
    assert row.slots(10, 14, 4) == [38, 39, 12, 13] and row.slots(5, 5, 4) == []


def test_last_only_logits_are_each_rows_last_token():
    model = perturbed(build_model(GPTConfig(**CONFIG)), scale=0.1).eval()
    p = BlockPool.for_model(model, 16 * block_bytes(4, 16, 2, 16, torch.float32))
    rows = [PagedRow(p.allocate(2)), PagedRow(p.allocate(2))]
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last = model(torch.cat([ids[0], ids[1, :7]])[None], kv_cache=PackedBatch(p, rows, [20, 7]), last_only=True)
        full = [model(ids[:1])[0, -1], model(ids[1:, :7])[0, -1]]
    assert last.shape == (2, 1, 300) and [r.length for r in rows] == [20, 7]
    torch.testing.assert_close(last[:, 0], torch.stack(full), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="KV overflow: position 32 is past the row's 2 blocks of 16"):
        PackedBatch(p, [PagedRow(rows[0].blocks, length=32)], [1])
