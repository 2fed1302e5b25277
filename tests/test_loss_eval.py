"""Bits per byte: by-hand values, exclusions, and the distributed sum."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

V = 5
TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 1], dtype=torch.int32)  # token 0 is a special token (0 bytes)


class TableModel(torch.nn.Module):
    """logits = table[x]: a fixed bigram 'model', enough to exercise evaluate_bpb."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def get_device(self):
        return self.table.device

    def forward(self, x, targets, loss_reduction="mean"):
        logits = self.table[x]
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def by_hand(model, batches):
    nats, nbytes = 0.0, 0
    table = model.table.tolist()
    for x, y in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            if yi < 0 or TOKEN_BYTES[yi] == 0:
                continue
            row = table[xi]
            nats += math.log(sum(math.exp(v) for v in row)) - row[yi]
            nbytes += int(TOKEN_BYTES[yi])
    return nats / (math.log(2) * nbytes)


def make_batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (2, 6), generator=g)
        y = torch.randint(0, V, (2, 6), generator=g)
        y[0, 0] = -1  # an ignored target in every batch; specials (0) occur at random
        out.append((x, y))
    return out


def test_bpb_matches_hand_computation():
    model = TableModel()
    batches = make_batches(1)
    assert any((y == 0).any() for _, y in batches)  # the data does contain special targets
    assert evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES) == pytest.approx(by_hand(model, batches), rel=1e-6)
    # only the first `steps` batches are used
    assert evaluate_bpb(model, iter(batches), 2, TOKEN_BYTES) == pytest.approx(by_hand(model, batches[:2]), rel=1e-6)


def test_tiny_example_exact():
    # uniform logits: each counted target costs ln(5) nats; targets 2 (2 bytes) and 3 (3 bytes) count, 0 and -1 not
    model = TableModel()
    with torch.no_grad():
        model.table.zero_()
    x = torch.tensor([[1, 1, 1, 1]])
    y = torch.tensor([[2, 0, -1, 3]])
    assert evaluate_bpb(model, iter([(x, y)]), 1, TOKEN_BYTES) == pytest.approx(2 * math.log(5) / (math.log(2) * 5))


def test_specials_and_ignored_targets_excluded():
    model = TableModel()
    batches = make_batches(2)
    # turning every special target into an ignored one changes nothing: neither counts anywhere
    masked = [(x, torch.where(y == 0, -1, y)) for x, y in batches]
    assert evaluate_bpb(model, iter(masked), 3, TOKEN_BYTES) == evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES)
    # whereas giving special tokens a byte count does change the result
    with_specials = TOKEN_BYTES.clone()
    with_specials[0] = 1
    assert evaluate_bpb(model, iter(batches), 3, with_specials) != evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES)


def test_zero_bytes_is_inf():
    model = TableModel()
    x = torch.tensor([[1, 2, 3]])
    y = torch.tensor([[0, -1, 0]])
    assert evaluate_bpb(model, iter([(x, y)]), 1, TOKEN_BYTES) == float("inf")


def test_short_split_is_used_whole():
    full = evaluate_bpb(TableModel(), iter(make_batches(3)), 3, TOKEN_BYTES)
    assert evaluate_bpb(TableModel(), iter(make_batches(3)), 10, TOKEN_BYTES) == full
    assert evaluate_bpb(TableModel(), iter([]), 10, TOKEN_BYTES) == float("inf")


# -----------------------------------------------------------------------------
# Two gloo ranks, each with its own batches: the all-reduced bpb equals one process over the union

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bpb_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        n = 2 + rank  # unequal amounts of data per rank: the sums, not the per-rank means, must be combined
        bpb = evaluate_bpb(TableModel(), iter(make_batches(10 + rank, n)), n, TOKEN_BYTES)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(bpb))
    finally:
        dist.destroy_process_group()


def test_distributed_sum_equals_union(tmp_path):
    mp.spawn(_bpb_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    union = make_batches(10, 2) + make_batches(11, 3)
    expected = evaluate_bpb(TableModel(), iter(union), len(union), TOKEN_BYTES)
    assert results[0] == results[1] == pytest.approx(expected, rel=1e-12)
    # and it differs from averaging the two ranks' own bpbs
    own = [evaluate_bpb(TableModel(), iter(make_batches(10 + r, 2 + r)), 2 + r, TOKEN_BYTES) for r in range(2)]
    assert sum(own) / 2 != pytest.approx(expected, rel=1e-6)
