"""
KV memory in fixed-size blocks, shared between requests through a prefix cache (for continuous-batching servers).

BlockPool holds every layer's keys and values as `num_blocks` blocks of `block_size` token slots. A request owns a
list of blocks (its block table); its token at position p lives in slot p % block_size of block table[p // size].
Memory is a budget, not max_batch x sequence_len: a short request takes few blocks, a long one many.

Prefix cache: once a block is full, it is indexed by the chain of tokens that led to it (its parent block's key and
its own tokens), so any later request whose prompt starts with the same tokens (an earlier turn of the same
conversation, a shared system prompt) takes those blocks as they are and prefills only the rest. Blocks are
reference-counted; a full block nobody uses stays cached until its memory is needed (least recently used first).
Shared blocks are never written to: a request writes only past its matched prefix, which ends at a block boundary.

PackedBatch is the model-facing view for one forward over some requests: their new tokens laid end to end in one
row, requests decoding a token beside prompts being prefilled. Their new keys go to their own slots, and attention
reads each row's keys from its blocks: as a strided view of the pool where rows' blocks are consecutive and evenly
spaced (n samples of one prompt, most rows of a fresh pool), else gathered. Block 0 is scratch: it backs reads
past a row's end, which attention never looks at.
"""
import itertools
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from nanochat import cuda_runtime


class BlockPool:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device="cpu",
                 dtype=torch.float32, prefix_cache=True):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (block 0 is scratch), got {num_blocks}")
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k, self.v))  # each layer's (keys, values), made once: a view per forward costs
        self.pinned_copies = cuda_runtime.pin_memory(self.k.device)  # host tables go to the device from pinned memory
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # blocks holding nothing worth keeping (a stack)
        self.evictable = OrderedDict()  # cached blocks nobody uses, least recently used first
        self.index = {}  # key -> block: the prefix cache
        self.entry = {}  # block -> (key, parent key, tokens) of the prefix it holds
        self.notes = {}  # key -> what a server keeps beside a cached prefix (annotate); leaves with its block
        self.evictions = 0  # cached blocks reused for something else

    @classmethod
    def for_model(cls, model, budget_bytes, block_size=16, prefix_cache=True):
        """As many blocks as budget_bytes holds, for this model's layers, KV heads and dtype."""
        cfg = model.config
        head_dim = cfg.n_embd // cfg.n_head
        dtype = model.cos.dtype
        per_block = block_bytes(cfg.n_layer, block_size, cfg.n_kv_head, head_dim, dtype)
        return cls(cfg.n_layer, int(budget_bytes // per_block), block_size, cfg.n_kv_head, head_dim,
                   device=model.get_device(), dtype=dtype, prefix_cache=prefix_cache)

    @property
    def usable_blocks(self):
        return self.num_blocks - 1

    def available(self):
        """Blocks an allocation can take now: free ones and cached ones nobody uses."""
        return len(self.free) + len(self.evictable)

    def used(self):
        return self.usable_blocks - self.available()

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def allocate(self, n):
        """n blocks for one request (refcount 1), or None when fewer are available (nothing is taken then)."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:  # reuse the least recently used cached block: its prefix leaves the cache
                block, _ = self.evictable.popitem(last=False)
                key = self.entry.pop(block)[0]
                del self.index[key]
                self.notes.pop(key, None)
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks):
        """Drop one reference to each block; a block nobody uses stays cached (if it holds a prefix) or is freed."""
        freed = []
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.entry:
                    self.evictable[block] = None
                else:
                    freed.append(block)
        # taken again in this order: a request's blocks are consecutive when they can be, so attention reads its
        # keys as one slice of the pool instead of gathering them
        self.free.extend(reversed(freed))

    def match(self, tokens):
        """The cached blocks that hold the longest prefix of tokens, referenced for the caller, with their keys.
        At most (len(tokens) - 1) // block_size blocks: the last token is always computed, as its logits are
        needed."""
        if not self.prefix_cache:
            return [], []
        blocks, keys, parent = [], [], None
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            key = hash((parent, chunk))
            block = self.index.get(key)
            if block is None or self.entry[block][1:] != (parent, chunk):  # absent, or a hash collision
                break
            blocks.append(block)
            keys.append(key)
            parent = key
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        return blocks, keys

    def register(self, block, parent, tokens):
        """Index a full block holding `tokens` after the prefix keyed `parent`; returns its key. When the same
        prefix is already cached in another block (two requests computed it at once), this block stays private."""
        chunk = tuple(tokens)
        key = hash((parent, chunk))
        if self.prefix_cache and key not in self.index and block not in self.entry:
            self.index[key] = block
            self.entry[block] = (key, parent, chunk)
        return key

    def annotate(self, key, note):
        """Keep `note` beside the cached prefix `key` (whichever block holds it) until it leaves the cache (ignored
        for a prefix that is not cached)."""
        if key in self.index:
            self.notes[key] = note

    def note(self, key):
        """What annotate() kept beside the cached prefix `key`, or None."""
        return self.notes.get(key)


def block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype):
    """Bytes of one block: keys and values of block_size tokens in every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedRow:
    """One request's place in the pool: its blocks (fixed for its life) and how many of its positions hold keys.
    consecutive: how many of its first blocks follow one another in the pool (their keys are one slice of it)."""
    blocks: list
    length: int = 0

    def __post_init__(self):
        run = min(1, len(self.blocks))
        while run < len(self.blocks) and self.blocks[run] == self.blocks[0] + run:
            run += 1
        self.consecutive = run

    def slots(self, start, stop, block_size):
        """The pool slots of its positions start .. stop - 1 (a range per block)."""
        out = []
        while start < stop:
            block = start // block_size
            end = min(stop, (block + 1) * block_size)
            shift = (self.blocks[block] - block) * block_size  # position p of this block is slot p + shift
            out += range(start + shift, end + shift)
            start = end
        return out


@dataclass
class _AttentionGroup:
    """Rows attended in one call: `size` rows of `width` new tokens each (tokens: their places in the packed row,
    row by row; None when whole), reading keys 0 .. keys - 1 of their blocks (reads: (size, keys) slots, scratch
    past a row's end). first: the lowest position of their queries. fresh: one row whose keys are all new (a whole
    prompt). in_step: one-token rows all at the same position (every key a window leaves is visible to each: no
    mask). base, for rows each in consecutive blocks, evenly spaced (one row, or rows admitted together with the
    same reservation): the slot of the first row's position 0, and row_stride slots to the next row's (their keys
    are a strided view of the pool: no gather). whole: the group is every token of the forward, in order."""
    size: int
    width: int
    keys: int
    first: int
    fresh: bool
    in_step: bool = False
    base: int | None = None
    row_stride: int = 0
    whole: bool = False
    tokens: torch.Tensor = None
    reads: torch.Tensor = None
    plans: dict = field(default_factory=dict)


def _pool_view(layer, view):
    """view = (shape, strides, offset in elements) of one layer's keys or values in the pool -> that strided view."""
    shape, strides, offset = view
    return layer.as_strided(shape, strides, layer.storage_offset() + offset)


class PackedBatch:
    """The KV cache of one forward over `rows` (PagedRow) that advance by new_lens[i] tokens each: their new tokens
    are laid end to end in a single row (the model's input is (1, sum(new_lens))), so requests decoding one token
    and prompts being prefilled run in one forward with no padding. prev: (R, 1, C) smear state of each row's last
    token (zeros for a row that starts here), or None. Row lengths advance by new_lens when the forward is done.

    The linear layers see one long row; attention (attend) is per group of rows: rows decoding one token whose
    lengths are within 2x of each other together (their keys padded to the longest: at most half is padding), and
    each longer row (a prompt chunk) on its own. The forward uses it through the cache interface (gpt.NoCache
    states it)."""

    def __init__(self, pool, rows, new_lens, prev=None):
        self.pool, self.rows, self.new_lens = pool, rows, list(new_lens)
        self.batch_size = len(rows)
        self.prev_embedding = prev
        bs = pool.block_size
        for row, n in zip(rows, self.new_lens):
            if n < 1 or row.length + n > len(row.blocks) * bs:  # would write into blocks that are not its own
                raise ValueError(f"KV overflow: position {row.length + n - 1} is past the row's "
                                 f"{len(row.blocks)} blocks of {bs}")
        # The index arrays are built as Python lists (a few per row: numpy's per-call cost, paid cold after each
        # forward, was most of a decode step's host time) and go to the device in one asynchronous copy: no host
        # sync. Only the key slots of rows that are not a view of the pool (reads) are gathered with numpy.
        R, new = len(rows), self.new_lens
        lengths = [r.length for r in rows]
        starts = list(itertools.accumulate(new, initial=0))
        N = starts.pop()
        self.end = max(L + n for L, n in zip(lengths, new))  # one past the highest position
        self.num_tokens, self.decode_only = N, N == R  # decode only: one new token per row
        self.in_step = self.decode_only and min(lengths) == max(lengths)  # every row at the same position
        # what goes to the device: (owner, attribute, values), only what this forward's path reads
        tables = []
        if not self.decode_only:
            # smear: a token's previous is the one before it in its row, or the row's prev for its first token (in
            # the concatenation [prev of each row, this forward's tokens])
            previous = array("q", itertools.chain.from_iterable([i, *range(R + s, R + s + n - 1)]
                                                                for i, (s, n) in enumerate(zip(starts, new))))
            tables += [(self, "_last", [s + n - 1 for s, n in zip(starts, new)]), (self, "_previous", previous)]
        self.groups = []
        for members in self._grouping(lengths, new):
            size, width = len(members), new[members[0]]
            ls = [lengths[i] for i in members]
            group = _AttentionGroup(size, width, max(ls) + width, min(ls), fresh=width > 1 and ls[0] == 0,
                                    in_step=width == 1 and min(ls) == max(ls))
            blocks_read = pool.blocks_for(group.keys)
            bases = [rows[i].blocks[0] * bs for i in members]
            stride = bases[1] - bases[0] if size > 1 else 0
            if all(rows[i].consecutive >= blocks_read for i in members) and (size == 1 or stride > 0) and \
                    all(b - a == stride for a, b in zip(bases, bases[1:])):
                group.base, group.row_stride = bases[0], stride
            else:  # (slots past a row's length are masked; past its blocks, scratch block 0)
                table = np.zeros((size, blocks_read), dtype=np.int64)
                for j, i in enumerate(members):
                    used = rows[i].blocks[:blocks_read]
                    table[j, :len(used)] = used
                k = np.arange(group.keys)
                tables.append((group, "reads", array("q", (table[:, k // bs] * bs + k % bs).tobytes())))
            group.whole = size * width == N  # every token, in order: no gather of queries, no scatter of outputs
            if not group.whole:
                tokens = itertools.chain.from_iterable(range(starts[i], starts[i] + width) for i in members)
                tables.append((group, "tokens", array("q", tokens)))
            self.groups.append(group)
        self.positions = self.write_slots = self.write_view = None
        if self.in_step and self.groups[0].base is not None:
            # rows in step, each in consecutive blocks, evenly spaced (n samples of one prompt): their new keys go to
            # a strided view of the pool too, and the positions are a slice: nothing to send to the device
            g, H, D = self.groups[0], *pool.k.shape[2:]
            self.write_view = ((R, H, D), (g.row_stride * H * D, D, 1), (g.base + lengths[0]) * H * D)
            return
        positions, write = [], []
        for row, L, n in zip(rows, lengths, new):
            positions += range(L, L + n)
            write += row.slots(L, L + n, bs)
        tables += [(self, "positions", positions), (self, "write_slots", write)]
        host = array("q")  # int64: a few calls for short lists, where numpy's (np.array, concatenate) cost more
        for *_, values in tables:
            host.extend(values)
        packed = torch.frombuffer(host, dtype=torch.int64)
        if pool.pinned_copies:
            packed = packed.pin_memory()
        # (split_with_sizes: Tensor.split's Python wrapper costs more than the split)
        split = packed.to(pool.k.device, non_blocking=True).split_with_sizes([len(values) for *_, values in tables])
        for (owner, name, _), tensor in zip(tables, split):
            setattr(owner, name, tensor)
        self.positions = self.positions[None]
        for g in self.groups:
            g.reads = g.reads.view(g.size, -1) if g.reads is not None else None

    @staticmethod
    def _grouping(lengths, new):
        """Row indices (ascending) of each attention group: one-token rows taken longest first, a new group whenever
        a row's keys are fewer than half the group's longest; every longer row alone."""
        groups = []
        for i in sorted((i for i, n in enumerate(new) if n == 1), key=lambda i: -lengths[i]):
            if groups and 2 * (lengths[i] + 1) >= lengths[groups[-1][0]] + 1:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [sorted(g) for g in groups] + [[i] for i, n in enumerate(new) if n > 1]

    def begin(self, T):
        """The positions of this forward's tokens, (1, N) (or a slice when every row decodes at the same position, as
        n samples of one prompt do), and one past the highest."""
        assert T == self.num_tokens, "a packed batch is one row of all its rows' new tokens"
        if self.in_step:
            return slice(self.end - 1, self.end), self.end
        return self.positions, self.end

    def attend(self, layer_idx, q, k, v, window):
        """Write k, v (1, N, H, D) into the rows' slots; return attention (1, N, Hq, D) of each row's queries over
        its own keys within `window`."""
        k_layer, v_layer = self.pool.layers[layer_idx]
        N, H, D = k.shape[1:]
        if self.write_view is not None:
            shape = self.write_view[0]
            _pool_view(k_layer, self.write_view).copy_(k.view(shape))
            _pool_view(v_layer, self.write_view).copy_(v.view(shape))
        else:
            k_layer.index_copy_(0, self.write_slots, k.reshape(N, H, D).to(k_layer.dtype))
            v_layer.index_copy_(0, self.write_slots, v.reshape(N, H, D).to(v_layer.dtype))
        gqa = q.size(2) != H
        y = None if self.groups[0].whole else torch.empty_like(q[0])
        for g in self.groups:
            qg = (q if g.whole else q[0, g.tokens]).view(g.size, g.width, -1, D).transpose(1, 2)
            if g.fresh and g.width - 1 <= window:  # a whole prompt within the window: its own keys, plain causal
                kg, vg = ((t if g.whole else t[0, g.tokens]).view(1, -1, H, D).transpose(1, 2) for t in (k, v))
                out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa)
            else:
                mask, read = g.plans[window] if window in g.plans else self._plan(g, window, H, D)
                if g.base is not None:  # rows in consecutive blocks, evenly spaced: a view of the pool, no copy
                    kg, vg = _pool_view(k_layer, read), _pool_view(v_layer, read)  # (already (rows, heads, keys, D))
                else:
                    kg, vg = (t.index_select(0, read).view(g.size, -1, H, D).transpose(1, 2)
                              for t in (k_layer, v_layer))
                if kg.dtype != q.dtype:
                    kg, vg = kg.to(q.dtype), vg.to(q.dtype)
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, enable_gqa=gqa)
            out = out.transpose(1, 2)
            if g.whole:
                return out.reshape(q.shape)
            y.index_copy_(0, g.tokens, out.reshape(g.size * g.width, *q.shape[2:]))
        return y[None]

    def _plan(self, g, window, H, D):
        """How the group reads its keys in this window (shared by the layers of one window): the mask of which keys
        from its first one each query sees (None when all), and where the keys are: (shape, strides, slot offset
        in elements) of the pool's view as (rows, heads, keys, D), or the slots to gather."""
        start = max(0, g.first - window)
        mask = None
        if not g.in_step:
            queries = (self.positions[0] if g.whole else self.positions[0, g.tokens]).view(g.size, g.width, 1)
            diff = queries - torch.arange(start, g.keys, device=queries.device)
            mask = ((diff >= 0) & (diff <= window))[:, None]
        if g.base is not None:
            read = ((g.size, H, g.keys - start, D), (g.row_stride * H * D, D, H * D, 1), (g.base + start) * H * D)
        else:
            read = g.reads[:, start:].reshape(-1)
        g.plans[window] = mask, read
        return g.plans[window]

    def previous(self, x):
        """(1, N, C) -> each token's previous token in its row (prev, or zeros, for a row's first token); keeps each
        row's last as prev_embedding."""
        prev, self.prev_embedding = self.prev_embedding, self.last_rows(x)
        first = prev[:, 0] if prev is not None else x.new_zeros(self.batch_size, x.size(-1))
        if self.decode_only:  # each token is its row's first
            return first[None]
        return torch.cat([first, x[0]])[self._previous][None]

    def last_rows(self, x):
        """(1, N, ...) -> (R, 1, ...): each row's last token."""
        return x.transpose(0, 1) if self.decode_only else x[0, self._last][:, None]

    def advance(self, n):
        for row, m in zip(self.rows, self.new_lens):
            row.length += m
