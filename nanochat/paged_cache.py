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

PagedBatch is the model-facing view for one forward over some requests (the interface of engine.KVCache): their
new keys go to their own slots, and attention reads each row's keys gathered from its blocks. Block 0 is scratch:
it backs padding and table entries past a row's end, which attention never looks at.
"""
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


class BlockPool:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device="cpu",
                 dtype=torch.float32, prefix_cache=True):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (block 0 is scratch), got {num_blocks}")
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))  # blocks holding nothing worth keeping (a stack)
        self.evictable = OrderedDict()  # cached blocks nobody uses, least recently used first
        self.index = {}  # key -> block: the prefix cache
        self.entry = {}  # block -> (key, parent key, tokens) of the prefix it holds
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
                self.evictions += 1
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks):
        """Drop one reference to each block; a block nobody uses stays cached (if it holds a prefix) or is freed."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.entry:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

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


def block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype):
    """Bytes of one block: keys and values of block_size tokens in every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedRow:
    """One request's place in the pool: its blocks and how many of its positions hold keys."""
    blocks: list
    length: int = 0


class PagedBatch:
    """The KV cache of one forward over `rows` (PagedRow), each advancing by new_lens[i] <= T tokens (the rest of
    the T columns is padding). prev: (B, 1, C) smear state of each row's last token (zeros for a row that starts
    here), or None. Row lengths advance by new_lens when the forward is done."""

    def __init__(self, pool, rows, new_lens, prev=None):
        self.pool, self.rows, self.new_lens = pool, rows, list(new_lens)
        self.batch_size = len(rows)
        self.prev_embedding = prev
        self.span = None
        self.begin(max(self.new_lens))

    def begin(self, T):
        """Slots of this forward of T columns: where each row's new keys go (padding goes to scratch block 0) and
        where attention reads each row's keys 0 .. hi + T - 1 from. Built on the host, where the lengths are, and
        moved to the device in one asynchronous copy: no host sync."""
        if self.span is not None and self.span[2] == T:  # (worked out at construction, for the usual T)
            return self.span[:2]
        bs, B = self.pool.block_size, self.batch_size
        for row, n in zip(self.rows, self.new_lens):
            if row.length + n > len(row.blocks) * bs:  # would write into blocks that are not its own
                raise ValueError(f"KV overflow: position {row.length + n - 1} is past the row's "
                                 f"{len(row.blocks)} blocks of {bs}")
        # numpy: a dozen small host ops cost a few microseconds each here, instead of torch's ~10
        lengths = np.array([r.length for r in self.rows], dtype=np.int64)
        new_lens = np.array(self.new_lens, dtype=np.int64)
        lo, hi = int(lengths.min()), int(lengths.max())
        width = self.pool.blocks_for(hi + T)
        table = np.zeros((B, width), dtype=np.int64)
        for i, r in enumerate(self.rows):
            own = r.blocks[:width]
            table[i, :len(own)] = own
        pos = lengths[:, None] + np.arange(T)
        slots = np.take_along_axis(table, np.minimum(pos // bs, width - 1), axis=1) * bs + pos % bs
        write = np.where(np.arange(T)[None, :] < new_lens[:, None], slots, pos % bs)
        keys = np.arange(hi + T)
        read = table[:, keys // bs] * bs + keys % bs
        packed = torch.from_numpy(np.concatenate([lengths, np.maximum(new_lens - 1, 0), write.ravel(), read.ravel()]))
        device = self.pool.k.device
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        self.cache_seqlens, self._last, self.write_slots, self.read_slots = packed.split([B, B, B * T, B * (hi + T)])
        self.span, self.fresh, self._reads = (lo, hi, T), hi == 0, {}
        return lo, hi

    def insert(self, layer_idx, k, v, key_start, key_stop):
        """Write k, v (B, T, H, D) into the rows' slots; return every row's keys and values at positions
        key_start .. key_stop - 1 (gathered from its blocks)."""
        B, T, H, D = k.shape
        k_layer, v_layer = self.pool.k[layer_idx], self.pool.v[layer_idx]
        k_layer.index_copy_(0, self.write_slots, k.reshape(B * T, H, D).to(k_layer.dtype))
        v_layer.index_copy_(0, self.write_slots, v.reshape(B * T, H, D).to(v_layer.dtype))
        if self.fresh:  # every row starts here: the keys are exactly the new ones
            return k[:, key_start:key_stop], v[:, key_start:key_stop]
        if key_start not in self._reads:  # a sliding window reads fewer keys; layers of one window share them
            span = self.span[1] + T
            self._reads[key_start] = self.read_slots.view(B, span)[:, key_start:key_stop].reshape(-1)
        read = self._reads[key_start]
        n = key_stop - key_start
        return k_layer.index_select(0, read).view(B, n, H, D), v_layer.index_select(0, read).view(B, n, H, D)

    def last_rows(self, x):
        """(B, T, ...) -> (B, 1, ...): each row's last real (not padding) position."""
        return x[torch.arange(x.size(0), device=x.device), self._last][:, None]

    def advance(self, n):
        for row, m in zip(self.rows, self.new_lens):
            row.length += m
