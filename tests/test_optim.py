"""Tests for nanochat/optim.py: AdamW parity with torch, Muon math, cautious WD, determinism, and the 2-process gloo
run (gradient sync inside step(), ZeRO-2 sharded state, re-sharding checkpoints across world sizes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.optim import (MuonAdamW, consolidate_state_dicts, polar_express, shard_state_dict)

# -----------------------------------------------------------------------------
# A tiny model whose params exercise every distributed code path with W=2:
#   wte (64,32): AdamW, 2048 elements, rows divisible by 2 -> reduce_scatter / row-sharded state
#   lm_head (33,32): AdamW, 1056 elements, odd rows -> all_reduce fallback, replicated state
#   scalars (3,): AdamW, < 1024 elements -> all_reduce, replicated state
#   attn.0-2 (32,32): Muon K=3 -> chunk 2, zero-padded stack, rank 0 owns 2 params, rank 1 owns 1
#   fc.0-1 (64,32): Muon K=2, tall (lr x sqrt 2); proj.0 (32,64): Muon K=1, wide, rank 1 owns nothing
V_IN, V_OUT, C, B, T = 64, 33, 32, 8, 16
PARAM_NAMES = ["wte", "lm_head", "scalars", "attn.0", "attn.1", "attn.2", "fc.0", "fc.1", "proj.0"]
LR_MULTS = [1.0, 0.8, 0.5]  # a per-step lr schedule, rewritten into the groups like base_train does


def make_params():
    g = torch.Generator().manual_seed(0)
    shapes = {"wte": (V_IN, C), "lm_head": (V_OUT, C), "attn": (C, C), "fc": (2 * C, C), "proj": (C, 2 * C)}
    P = {}
    for name in PARAM_NAMES:
        if name == "scalars":
            P[name] = torch.tensor([1.0, 0.0, 0.5])
        else:
            shape = shapes[name.split(".")[0]]
            P[name] = torch.randn(shape, generator=g) * (0.5 if name == "wte" else shape[1] ** -0.5)
    return {k: torch.nn.Parameter(v) for k, v in P.items()}


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V_IN, (B, T), generator=g), torch.randint(0, V_OUT, (B, T), generator=g)


def loss_fn(P, idx, targets):
    h = P["wte"][idx]
    for i in range(3):
        h = h + torch.tanh(h @ P[f"attn.{i}"].T)
    u = torch.relu(h @ P["fc.0"].T) * (h @ P["fc.1"].T)
    h = h * P["scalars"][0] + (u @ P["proj.0"].T) * P["scalars"][2] + P["scalars"][1]
    return F.cross_entropy((h @ P["lm_head"].T).view(-1, V_OUT), targets.view(-1))


def make_opt(P):
    return MuonAdamW([
        dict(kind="adamw", params=[P["wte"]], lr=0.05, betas=(0.8, 0.995), weight_decay=0.01),
        dict(kind="adamw", params=[P["lm_head"]], lr=0.01, betas=(0.8, 0.96), weight_decay=0.01),
        dict(kind="adamw", params=[P["scalars"]], lr=0.02, betas=(0.96, 0.95)),
        dict(kind="muon", params=[P[f"attn.{i}"] for i in range(3)], lr=0.02, weight_decay=0.1),
        dict(kind="muon", params=[P["fc.0"], P["fc.1"]], lr=0.02, weight_decay=0.1),
        dict(kind="muon", params=[P["proj.0"]], lr=0.02, weight_decay=0.1),
    ])


def train_step(P, opt, step, idx, targets):
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * LR_MULTS[step]
    loss_fn(P, idx, targets).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def snapshot(P):
    return {k: v.detach().clone() for k, v in P.items()}


def load_params(P, values):
    with torch.no_grad():
        for k, v in values.items():
            P[k].copy_(v)


# -----------------------------------------------------------------------------
# Single-process tests

def test_adamw_matches_torch():
    torch.manual_seed(0)
    shapes = [(40, 30), (7,), (3, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([dict(kind="adamw", params=ours, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    assert opt.param_groups[0]["initial_lr"] == 0.01
    for step in range(6):
        lr = 0.01 * (1 - step / 6)  # schedules rewrite lr between steps; both must pick it up
        opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = lr
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # bf16 params: math runs in fp32 (fp32 state), the param stays bf16 and tracks the fp32 result
    p16 = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    o16 = MuonAdamW([dict(kind="adamw", params=[p16], lr=0.01)])
    o32 = MuonAdamW([dict(kind="adamw", params=[p32], lr=0.01)])
    g = torch.randn(16, 8)
    p16.grad, p32.grad = g.bfloat16(), g.bfloat16().float()
    o16.step()
    o32.step()
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_polar_express_and_first_muon_update_are_near_orthogonal(shape):
    torch.manual_seed(0)
    s = torch.linalg.svdvals(polar_express(torch.randn(shape)))
    assert s.min() > 0.5 and s.max() < 1.5, s
    # first Muon step from p=0 with wd=0: the update itself is (p0 - p1) / lr_eff
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.1)])
    p.grad = torch.randn(shape)
    opt.step()
    update = -p.detach() / (0.1 * max(1, shape[0] / shape[1]) ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.max() / s.min() < 4, s
    # Muon+ / NorMuon keep the Frobenius norm at that of a semi-orthogonal matrix: sqrt(min(m, n))
    torch.testing.assert_close(update.norm(), torch.tensor(min(shape) ** 0.5), rtol=1e-4, atol=0)


def test_convergence():
    torch.manual_seed(0)
    targets = [torch.randn(32, 32) * 0.1, torch.randn(64, 32) * 0.1, torch.randn(50)]
    params = [torch.nn.Parameter(torch.randn_like(t) * 0.1) for t in targets]
    opt = MuonAdamW([dict(kind="muon", params=[params[0]], lr=0.02),
                     dict(kind="muon", params=[params[1]], lr=0.02, weight_decay=0.01),
                     dict(kind="adamw", params=[params[2]], lr=0.05)])
    dist0 = [(p - t).norm().item() for p, t in zip(params, targets)]
    for step in range(100):
        for group in opt.param_groups:  # linear decay so Muon's fixed-size steps can settle
            group["lr"] = group["initial_lr"] * (1 - step / 100)
        sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
        opt.step()
        opt.zero_grad()
    dist1 = [(p - t).norm().item() for p, t in zip(params, targets)]
    for d0, d1 in zip(dist0, dist1):
        assert d1 < d0 / 2, (dist0, dist1)


def test_cautious_weight_decay():
    # A rank-1 grad u v^T survives orthogonalization (and every later per-row / per-matrix rescale) with its signs,
    # so the update's sign pattern equals the grad's and we can predict the cautious mask elementwise.
    torch.manual_seed(0)
    p0 = torch.randn(16, 8)
    grad = torch.outer(torch.randn(16), torch.randn(8))
    lr, wd = 0.05, 0.5
    results = {}
    for decay in (0.0, wd):
        p = torch.nn.Parameter(p0.clone())
        opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, weight_decay=decay)])
        p.grad = grad.clone()
        opt.step()
        results[decay] = p.detach()
    mask = (grad * p0) >= 0
    assert 0 < mask.sum() < mask.numel()
    diff = results[wd] - results[0.0]
    # elements whose update opposes the param's sign are not decayed at all; the others by exactly lr_eff*wd*p,
    # lr_eff = lr * sqrt(16/8) for this tall matrix
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))
    torch.testing.assert_close(diff[mask], -lr * 2 ** 0.5 * wd * p0[mask], rtol=1e-4, atol=1e-7)


def test_deterministic():
    idx, targets = make_batch()
    runs = []
    for _ in range(2):
        P = make_params()
        opt = make_opt(P)
        for step in range(3):
            train_step(P, opt, step, idx, targets)
        runs.append(snapshot(P))
    for k in PARAM_NAMES:
        assert torch.equal(runs[0][k], runs[1][k]), k


# -----------------------------------------------------------------------------
# Two gloo processes vs one process. One spawn serves all distributed tests (module-scoped fixture).

def _worker(rank, world_size, tmpdir):
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        idx, targets = make_batch()
        half = slice(rank * B // world_size, (rank + 1) * B // world_size)  # each rank sees its half of the batch
        P = make_params()
        opt = make_opt(P)
        out = {}
        for step in range(3):
            if step == 2:
                torch.save(opt.state_dict(), f"{tmpdir}/optim_rank{rank}.pt")
                out["params_step2"] = snapshot(P)
            train_step(P, opt, step, idx[half], targets[half])
        out["params_step3"] = snapshot(P)
        out["state_keys"] = {i: sorted(e) for i, e in opt.state_dict()["state"].items()}
        out["rows"] = {i: e["rows"] for i, e in opt.state_dict()["state"].items() if "rows" in e}
        # resume from the single-process run's full state (1 -> 2 ranks): load_state_dict shards it for this rank
        ref = torch.load(f"{tmpdir}/single.pt")
        P = make_params()
        load_params(P, ref["params_step2"])
        opt = make_opt(P)
        opt.load_state_dict(ref["full_state_step2"])
        train_step(P, opt, 2, idx[half], targets[half])
        out["params_resumed"] = snapshot(P)
        torch.save(out, f"{tmpdir}/out_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmpdir = str(tmp_path_factory.mktemp("optim_dist"))
    idx, targets = make_batch()
    P = make_params()
    opt = make_opt(P)
    single = {}
    for step in range(3):
        if step == 2:
            single["params_step2"] = snapshot(P)
            single["full_state_step2"] = consolidate_state_dicts([opt.state_dict()], 1)
            torch.save(single, f"{tmpdir}/single.pt")
        train_step(P, opt, step, idx, targets)
    single["params_step3"] = snapshot(P)
    mp.spawn(_worker, args=(2, tmpdir), nprocs=2, join=True)
    ranks = [torch.load(f"{tmpdir}/out_rank{r}.pt") for r in range(2)]
    shards = [torch.load(f"{tmpdir}/optim_rank{r}.pt") for r in range(2)]
    return single, ranks, shards


def _assert_params_close(a, b):
    for k in PARAM_NAMES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=5e-6, msg=lambda m: f"{k}: {m}")


def test_distributed_matches_single_process(runs):
    single, ranks, _ = runs
    for k in PARAM_NAMES:  # the all_gathers leave every rank with bitwise identical params
        assert torch.equal(ranks[0]["params_step3"][k], ranks[1]["params_step3"][k]), k
    _assert_params_close(ranks[0]["params_step3"], single["params_step3"])


def test_distributed_state_is_sharded(runs):
    _, ranks, _ = runs
    # indices: wte 0, lm_head 1, scalars 2, attn 3-5, fc 6-7, proj 8
    assert sorted(ranks[0]["state_keys"]) == [0, 1, 2, 3, 4, 6, 8]
    assert sorted(ranks[1]["state_keys"]) == [0, 1, 2, 5, 7]
    assert ranks[0]["rows"] == {0: (0, 32, 64)} and ranks[1]["rows"] == {0: (32, 64, 64)}
    assert ranks[1]["state_keys"][5] == ["momentum_buffer", "second_momentum_buffer"]


def test_reshard_roundtrip_and_resume_on_one_process(runs):
    _, ranks, shards = runs
    full = consolidate_state_dicts(shards, 2)
    assert full["state"][0]["exp_avg"].shape == (V_IN, C)
    # full -> shards -> full is exact, for the old and for other world sizes
    for world in (1, 2, 3):
        again = consolidate_state_dicts([shard_state_dict(full, r, world) for r in range(world)], world)
        assert again["param_groups"] == full["param_groups"] and sorted(again["state"]) == sorted(full["state"])
        for i, entry in full["state"].items():
            assert sorted(again["state"][i]) == sorted(entry)
            for key, v in entry.items():
                assert torch.equal(again["state"][i][key], v) if torch.is_tensor(v) else again["state"][i][key] == v
    # 2 -> 1 ranks: one more step on the whole batch continues the 2-process run
    idx, targets = make_batch()
    P = make_params()
    load_params(P, ranks[0]["params_step2"])
    opt = make_opt(P)
    with pytest.raises(ValueError):  # a single rank's shard only loads on that rank of that world size
        opt.load_state_dict(shards[1])
    opt.load_state_dict(full)
    train_step(P, opt, 2, idx, targets)
    _assert_params_close(snapshot(P), ranks[0]["params_step3"])


def test_resume_two_processes_from_single_process_state(runs):
    single, ranks, _ = runs
    for r in range(2):
        _assert_params_close(ranks[r]["params_resumed"], single["params_step3"])
