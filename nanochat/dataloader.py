"""
Pretraining dataloader: BOS-aligned best-fit packing over a striped, resumable stream of units.

Pieces (each usable on its own; the Ray Data glue reuses the packer and the cursor):
- BestFitPacker: tokenized documents (each starting with BOS) in, rows of T+1 tokens out.
- StreamCursor: which units a worker reads, in which order, and how far it got. Worker r of W owns units
  r, r+W, r+2W, ... of the split's fixed unit list, each epoch (train loops forever; val is read once, in order).
- merge_states / remaining_units / assign_units: resume on any new world size from the states of all old workers.
- document_batches: the plain (no Ray) per-worker document stream, driven by a cursor.
- tokenizing_distributed_data_loader_with_state_bos_bestfit: all of the above for one process.

Resume contract. A worker's state dict says how many units of its current-epoch assignment have had ALL their
documents enter the packing buffer (`position`), plus how many documents of the next unit already did
(`partial_docs`). Restoring continues right after them: nothing that entered a packer is read again, and the only
documents lost are those sitting in the packing buffers at save time (`buffered_docs` per worker; at most
buffer_size - 1 + tokenizer_batch_size each, since we refill in tokenizer batches until the buffer is full).

Worker state dict (JSON-serializable; treat as read-only):
    {"kind": "worker", "version": 1, "split": "train", "rank": r, "world_size": W,
     "n_units": N, "fingerprint": "<16 hex: unit order>",
     "epoch": e,            # 1-based epoch the worker is in
     "position": k,         # units of its epoch-e assignment fully entered the packer
     "partial_docs": d,     # documents of assignment[k] that entered the packer too
     "buffered_docs": b,    # documents in its packer at save time (the ones a resume loses)
     "pq_idx": i, "rg_idx": j,  # file index / unit index of the next unit to read (for logs, like nanochat)
     "plan": {...}}         # the resume plan this run started from (same for all workers)
Resume plan (world-size independent; what merge_states returns):
    {"kind": "plan", "version": 1, "split": "train", "n_units": N, "fingerprint": "...", "epoch": E,
     "done": {"<epoch>": [[start, stop), ...]},        # units fully consumed, as half-open ranges
     "partial": {"<epoch>": {"<unit>": start_doc}}}    # units consumed up to a document offset
"""
import bisect

import torch

from nanochat import cuda_runtime
from nanochat.common import get_dist_info
from nanochat.dataset import resolve_source

STATE_VERSION = 1


# -----------------------------------------------------------------------------
# Best-fit packing

class BestFitPacker:
    """BOS-aligned best-fit-crop packing. Each of the B rows holds T+1 tokens: repeatedly take the LARGEST buffered
    document that fits the remaining space; if none fits, pop the SHORTEST one and use only its first `remaining`
    tokens (the rest is discarded). Rows therefore always start with a document start (BOS) and have no padding.
    The buffer is kept sorted by length, so each pick is a binary search. Ties go to the document buffered first, for
    both picks (as nanochat's linear scans do), so the same documents give nanochat's rows."""

    def __init__(self, B, T, buffer_size=1000, bos_token_id=None):
        self.B, self.T, self.buffer_size = B, T, buffer_size
        self.bos_token_id = bos_token_id  # if given, add() checks every document starts with it
        self._lens, self._docs = [], []   # parallel lists, sorted by length

    def __len__(self):
        return len(self._docs)

    def needs_docs(self):
        return len(self._docs) < self.buffer_size

    def add(self, docs):
        for doc in docs:
            if len(doc) == 0:
                raise ValueError("cannot pack an empty document (tokenize with the BOS token prepended)")
            if self.bos_token_id is not None and doc[0] != self.bos_token_id:
                raise ValueError(f"document does not start with BOS ({self.bos_token_id}): {list(doc[:5])}...")
            i = bisect.bisect_right(self._lens, len(doc))
            self._lens.insert(i, len(doc))
            self._docs.insert(i, doc)

    def _pop(self, i):
        self._lens.pop(i)
        return self._docs.pop(i)

    def pack_row(self, refill=None):
        """One row of T+1 tokens, or None if the documents ran out first. refill() adds documents and returns False
        once the stream is exhausted; it is called until the buffer holds buffer_size docs before every pick."""
        row, cap = [], self.T + 1
        while len(row) < cap:
            while refill is not None and self.needs_docs() and refill():
                pass
            if not self._docs:
                return None
            remaining = cap - len(row)
            i = bisect.bisect_right(self._lens, remaining) - 1
            if i >= 0:  # among equal lengths the one buffered first (equal lengths keep their insertion order)
                row.extend(self._pop(bisect.bisect_left(self._lens, self._lens[i])))
            else:
                row.extend(self._pop(0)[:remaining])
        return row

    def pack_batch(self, refill=None):
        """B rows (list of lists of T+1 ints), or None if the documents ran out (a partial batch is dropped)."""
        rows = []
        for _ in range(self.B):
            row = self.pack_row(refill)
            if row is None:
                return None
            rows.append(row)
        return rows


# -----------------------------------------------------------------------------
# Unit assignment and resume plans

def _to_ranges(units):
    """Sorted ints -> [[start, stop), ...] (compact: consumed units are mostly a prefix plus a ragged front)."""
    ranges = []
    for u in sorted(units):
        if ranges and ranges[-1][1] == u:
            ranges[-1][1] = u + 1
        else:
            ranges.append([u, u + 1])
    return ranges


def _from_ranges(ranges):
    return {u for a, b in ranges for u in range(a, b)}


def new_plan(n_units, fingerprint=None, split="train"):
    """The plan of a fresh start: epoch 1, nothing consumed."""
    return {"kind": "plan", "version": STATE_VERSION, "split": split, "n_units": n_units,
            "fingerprint": fingerprint, "epoch": 1, "done": {}, "partial": {}}


def assign_units(plan, rank, world_size, epoch=None, n_units=None):
    """[(unit_idx, start_doc), ...] that worker `rank` of `world_size` reads in `epoch` (default: the plan's):
    the units not yet consumed in that epoch, in order, dealt round-robin. n_units defaults to the plan's; pass
    the source's current count if files were appended since (the new units are simply not consumed yet)."""
    epoch = plan["epoch"] if epoch is None else epoch
    n_units = plan["n_units"] if n_units is None else n_units
    done = _from_ranges(plan["done"].get(str(epoch), []))
    partial = plan["partial"].get(str(epoch), {})
    remaining = [(u, partial.get(str(u), 0)) for u in range(n_units) if u not in done]
    return remaining[rank::world_size]


def remaining_units(states_or_plan):
    """(epoch, [(unit_idx, start_doc), ...]): what is left of the current epoch after merging all workers' states."""
    plan = merge_states(states_or_plan)
    return plan["epoch"], assign_units(plan, 0, 1)


class StreamCursor:
    """Tracks one worker's progress through its units. The consumer calls record() after each batch of documents
    has entered its packer; state_dict() then says exactly which documents are safely behind the cursor."""

    def __init__(self, n_units, rank=0, world_size=1, plan=None, fingerprint=None, split="train"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if n_units <= rank:
            raise ValueError(f"the {split} split has {n_units} units, fewer than the {world_size} workers: "
                             f"worker {rank} would get no data (use fewer workers or smaller units)")
        self.n_units, self.rank, self.world_size, self.split = n_units, rank, world_size, split
        self.plan = plan if plan is not None else new_plan(n_units, fingerprint, split)
        self.fingerprint = fingerprint if fingerprint is not None else self.plan.get("fingerprint")
        self._start_epoch(self.plan["epoch"])

    def _start_epoch(self, epoch):
        # an epoch can hand this worker nothing (after a resume, only a few units may be left): skip past it
        while True:
            self.epoch, self.position, self.partial_docs = epoch, 0, 0
            self.assignment = assign_units(self.plan, self.rank, self.world_size, epoch, self.n_units)
            if self.assignment:
                return
            epoch += 1

    def current(self):
        """(unit_idx, start_doc) of the next documents to read."""
        unit, start = self.assignment[self.position]
        return unit, start + self.partial_docs

    def pending(self):
        """[(unit_idx, start_doc), ...] still to read in the current epoch (the first one may be partly read)."""
        return [self.current()] + self.assignment[self.position + 1:]

    def record(self, n_docs, unit_done, unit=None):
        """n_docs more documents of the current unit entered the packer; unit_done: that was its last batch."""
        if unit is not None and unit != self.assignment[self.position][0]:
            raise ValueError(f"out of order: got documents of unit {unit}, expected unit "
                             f"{self.assignment[self.position][0]}")
        if not unit_done:
            self.partial_docs += n_docs
            return
        self.position += 1
        self.partial_docs = 0
        if self.position == len(self.assignment):
            self._start_epoch(self.epoch + 1)

    def state_dict(self, buffered_docs=0):
        return {"kind": "worker", "version": STATE_VERSION, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "n_units": self.n_units, "fingerprint": self.fingerprint,
                "epoch": self.epoch, "position": self.position, "partial_docs": self.partial_docs,
                "buffered_docs": buffered_docs, "plan": self.plan}

    @classmethod
    def from_state_dict(cls, state):
        """The cursor exactly where `state` left it (same rank and world size)."""
        cursor = cls(state["n_units"], state["rank"], state["world_size"], state["plan"], state["fingerprint"],
                     state.get("split", "train"))
        cursor._start_epoch(state["epoch"])
        cursor.position, cursor.partial_docs = state["position"], state["partial_docs"]
        return cursor


def merge_states(states):
    """Combine the state dicts of ALL workers of a run (any order; a single dict for W=1) into a resume plan for
    any new world size. A plan passes through unchanged. Raises ValueError if states are missing or mismatched."""
    if isinstance(states, dict):
        states = [states]
    states = list(states)
    if len(states) == 1 and states[0].get("kind") == "plan":
        return states[0]
    if not states or any(s.get("kind") != "worker" for s in states):
        raise ValueError("merge_states expects the worker state dicts of a run (or one resume plan)")
    first = states[0]
    W, n_units, base = first["world_size"], first["n_units"], first["plan"]
    for s in states:
        if (s["world_size"], s["n_units"], s["fingerprint"], s["plan"], s.get("split")) != \
                (W, n_units, first["fingerprint"], base, first.get("split")):
            raise ValueError("worker states come from different runs or data sources; cannot merge")
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(W)):
        raise ValueError(f"need the states of all {W} workers to resume without repeats; got ranks {ranks}")

    done = {int(e): _from_ranges(r) for e, r in base["done"].items()}
    partial = {int(e): {int(u): o for u, o in p.items()} for e, p in base["partial"].items()}
    for s in states:
        c = StreamCursor.from_state_dict(s)
        for e in range(base["epoch"], c.epoch + 1):
            e_done, e_partial = done.setdefault(e, set()), partial.setdefault(e, {})
            assignment = assign_units(base, c.rank, W, e, n_units)
            finished = assignment if e < c.epoch else assignment[:c.position]
            for u, _ in finished:
                e_done.add(u)
                e_partial.pop(u, None)
            if e == c.epoch and c.partial_docs:
                u, start = assignment[c.position]
                e_partial[u] = start + c.partial_docs
    epoch = min(s["epoch"] for s in states)
    while len(done.get(epoch, ())) >= n_units:
        epoch += 1
    return {"kind": "plan", "version": STATE_VERSION, "split": first.get("split", "train"), "n_units": n_units,
            "fingerprint": first["fingerprint"], "epoch": epoch,
            "done": {str(e): _to_ranges(d) for e, d in sorted(done.items()) if e >= epoch and d},
            "partial": {str(e): {str(u): o for u, o in sorted(p.items())}
                        for e, p in sorted(partial.items()) if e >= epoch and p}}


def _check_plan_matches(plan, source, split, n_units):
    if plan.get("split", "train") != split:
        raise ValueError(f"resume state is for the {plan.get('split')} split, not {split}")
    if plan["n_units"] > n_units or (plan.get("fingerprint") is not None
                                      and source.fingerprint(split, plan["n_units"]) != plan["fingerprint"]):
        raise ValueError(f"resume state does not match the data source ({source.description}): its first "
                         f"{plan['n_units']} {split} units differ (files changed, reordered or removed?)")


# -----------------------------------------------------------------------------
# The plain per-worker document stream

def document_batches(source, units, cursor, batch_size=128, num_epochs=None):
    """Yield (texts, unit_idx, unit_done) in cursor order, at most batch_size documents at a time, starting at the
    cursor (mid-unit after a resume). The consumer must call cursor.record(len(texts), unit_done, unit_idx) once
    the texts are in its packer, before asking for more. Stops after epoch `num_epochs` (None = never)."""
    while num_epochs is None or cursor.epoch <= num_epochs:
        here = (cursor.epoch, cursor.position)
        unit, start = cursor.current()
        docs = source.read_unit(units[unit])[start:]
        if not docs:
            yield [], unit, True
        for i in range(0, len(docs), batch_size):
            yield docs[i:i + batch_size], unit, i + batch_size >= len(docs)
        if (cursor.epoch, cursor.position) == here:
            raise RuntimeError("document_batches: the consumer did not call cursor.record() for each batch")


# -----------------------------------------------------------------------------
# Single-process loaders (nanochat names)

def _file_positions(units):
    """unit index -> (file index, unit index within the split) for nanochat-style pq_idx / rg_idx logging."""
    files = {}
    return [(files.setdefault(u.path, len(files)), u.index) for u in units]


def worker_cursor(source, split, rank=None, world_size=None, resume_state_dict=None, num_epochs=None):
    """-> (DataSource, units, StreamCursor, num_epochs) for one worker: the split's units, where this worker starts
    (from the resume states of all old workers, any world size), and how many epochs it reads (val: one)."""
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    src = resolve_source(source)
    units = src.units(split)
    plan = None
    if split == "val":
        if resume_state_dict is not None:
            raise ValueError("the val loader is not resumable: it always starts at the beginning of the val split")
        num_epochs = 1
    elif resume_state_dict is not None:
        plan = merge_states(resume_state_dict)
        _check_plan_matches(plan, src, split, len(units))
    return src, units, StreamCursor(len(units), rank, world_size, plan, src.fingerprint(split), split), num_epochs


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, device="cpu", resume_state_dict=None, source="auto", rank=None, world_size=None,
        buffer_size=1000, tokenizer_threads=4, tokenizer_batch_size=128, num_epochs=None):
    """Yield (inputs, targets, state_dict): int64 (B, T) tensors on `device` and this worker's state (module doc).

    split 'train' loops over epochs forever (or stops after `num_epochs`); 'val' reads its units once, in order,
    and stops when the documents run out (a last partial batch is dropped). resume_state_dict: the list of ALL
    workers' state dicts of the previous run, a single state dict if it ran as one worker, or a merge_states plan;
    the world size may differ. source: anything resolve_source accepts (a DataSource, 'auto', a path, ...).
    rank / world_size default to nanochat.common.get_dist_info()."""
    src, units, cursor, num_epochs = worker_cursor(source, split, rank, world_size, resume_state_dict, num_epochs)
    bos = tokenizer.get_bos_token_id()
    packer = BestFitPacker(B, T, buffer_size, bos_token_id=bos)
    docs = document_batches(src, units, cursor, tokenizer_batch_size, num_epochs)

    def refill():
        try:
            texts, unit, unit_done = next(docs)
        except StopIteration:
            return False
        if texts:
            packer.add(tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads))
        cursor.record(len(texts), unit_done, unit)
        return True

    yield from packed_batches(packer, refill, cursor, units, device)


def packed_batches(packer, refill, cursor, units, device):
    """(inputs, targets, state) batches from a packer fed by refill(), with the cursor's state after each batch;
    shared by the plain loader and the Ray Data stream."""
    positions = _file_positions(units)
    while True:
        rows = packer.pack_batch(refill)
        if rows is None:
            return
        state = cursor.state_dict(buffered_docs=len(packer))
        state["pq_idx"], state["rg_idx"] = positions[cursor.current()[0]]
        inputs, targets = rows_to_device(rows, device)
        yield inputs, targets, state


def rows_to_device(rows, device):
    """B rows of T + 1 tokens -> (inputs, targets), each (B, T) on `device`: one (2, B, T) host buffer and one copy,
    pinned when headed for a GPU so the copy is asynchronous."""
    full = torch.tensor(rows, dtype=torch.long)
    B, T = full.size(0), full.size(1) - 1
    pin = cuda_runtime.pin_memory(device)
    host = torch.empty((2, B, T), dtype=torch.long, pin_memory=pin)
    host[0].copy_(full[:, :-1])
    host[1].copy_(full[:, 1:])
    out = host.to(device, non_blocking=pin)
    return out[0], out[1]


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same as the _with_state variant, yielding just (inputs, targets)."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
