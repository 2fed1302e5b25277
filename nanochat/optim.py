"""
MuonAdamW: one optimizer for the whole model, with gradient synchronization and ZeRO-2 state sharding built in.

Param groups carry a ``kind``:

- ``'adamw'``: keys ``lr, betas, eps (1e-10), weight_decay``. Decoupled weight decay ``p *= 1 - lr*wd`` followed by
  bias-corrected Adam. The math runs in fp32 and is copied back, so bf16 params (embeddings) are fine. Optional
  per-param ``lr_mul`` / ``wd_mul`` attributes scale lr / wd.
- ``'muon'``: every param of the group has the same 2-D shape (m, n) = (out, in); keys ``lr, momentum (0.95),
  ns_steps (5), beta2 (0.9), weight_decay``. The K params are stacked into one (K, m, n) tensor and updated with:
  Nesterov momentum -> MuonEq row equilibration -> Polar Express orthogonalization (bf16 on CUDA, fp32 elsewhere)
  -> Muon+ renorm to ||g||_F = sqrt(min(m, n)) -> NorMuon variance reduction (factored second moment) -> cautious
  decoupled weight decay (only where g*p >= 0) and ``p -= lr*max(1, m/n)**0.5 * g``.

Hyperparameters are read from the group on every step, so schedules rewrite ``group['lr']`` (from
``group['initial_lr']``, stored at construction), ``group['momentum']`` and ``group['weight_decay']`` in between.

Distributed (no DDP): when torch.distributed is initialized with world size W > 1, ``step()`` averages the gradients
itself, in three phases so communication overlaps compute: (1) launch every reduction asynchronously, (2) per param /
group wait, update the local shard, launch an async all_gather of the result, (3) wait the gathers. Every rank must
call step() with a grad on every param (a missing one would deadlock the collectives, so it raises instead).

- AdamW params with numel < 1024, or whose shape[0] is not divisible by W: all_reduce(AVG), full update on every rank,
  replicated state.
- Other AdamW params: reduce_scatter(AVG) along dim 0; rank r updates rows [r*n/W, (r+1)*n/W) and holds state only
  for those rows; all_gather puts the full param back on every rank.
- Muon group with K params: chunk = ceil(K/W); the zero-padded (chunk*W, m, n) grad stack is reduce_scattered, rank r
  owns params [r*chunk, min(K, (r+1)*chunk)) (possibly none) and holds momentum / second moment only for them
  (sized (owned, ...), not padded to chunk); the updated stack is all_gathered back and copied into the params.
With no process group (or W == 1) no communication happens and every update covers the full tensors.

Checkpoint format (plain dicts of ints / tuples / tensors; torch.load(weights_only=True) can read them). Params are
numbered 0.. in param-group order, exactly like torch.optim:

- ``state_dict()`` -> *sharded* dict of this rank: ``{'format': 'sharded', 'rank', 'world_size', 'param_groups',
  'state'}``. ``state[i]`` for an AdamW param is ``{'step': int, 'exp_avg', 'exp_avg_sq'}`` (fp32; the local rows only,
  with ``'rows': (lo, hi, total)`` added when row-sharded); for a Muon param this rank owns it is
  ``{'momentum_buffer': (m, n), 'second_momentum_buffer': (m, 1) if m >= n else (1, n)}``. Tensors may be views of
  live optimizer buffers: save (or clone) them before stepping again.
- ``consolidate_state_dicts([sd_rank0, ..., sd_rank{W-1}], W)`` -> *full* dict ``{'format': 'full', 'param_groups',
  'state'}``: the same per-param entries, always full-size, independent of the world size.
- ``shard_state_dict(full, rank, world_size)`` -> the sharded dict that rank of a (new) world size would hold.
- ``load_state_dict(sd)`` accepts a full dict (sharded here for the current rank / world size) or the sharded dict of
  this exact rank and world size.

Resuming on a different world size: every old rank saved ``opt.state_dict()``; load all W_old files (on any process),
``full = consolidate_state_dicts(dicts, W_old)``, then on each new rank ``opt.load_state_dict(full)`` (or save
``shard_state_dict(full, r, W_new)`` per new rank and load those). Resuming with the same W just loads the rank's own
file. The optimizer math is identical for any W, so a resumed run continues where it left off (up to float reduction
order).
"""
import copy
import math

import torch
import torch.distributed as dist

SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all_reduced and updated whole on every rank

# Polar Express (a, b, c) per iteration of X <- aX + (bA + cA^2)X with A = XX^T, for ns_steps = 5
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

_ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
_MUON_DEFAULTS = dict(momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)


# -----------------------------------------------------------------------------
# Math

def polar_express(G, steps=5, compute_dtype=None):
    """Approximate the orthogonal polar factor U V^T of G (..., m, n). bf16 on CUDA (fast tensor cores), fp32
    elsewhere (CPU bf16 matmuls are slow). Returns compute_dtype; the caller casts back."""
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(compute_dtype)
    if X.ndim == 2:
        return polar_express(X.unsqueeze(0), steps, compute_dtype).squeeze(0)
    # the 1.01 margin keeps the top singular value below 1 despite bf16 rounding of the norm
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        # build the Gram matrix on the small side: (n, n) for tall matrices, (m, m) otherwise
        A = X.mT @ X if tall else X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # bA + cA^2
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def muon_eq(X):
    """MuonEq: rescale every row of each (m, n) matrix to the common norm ||X||_F / sqrt(m), so that a few large rows
    do not dominate the orthogonalization."""
    target = X.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    return X * (target / X.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def muon_update_(p, grad, momentum_buf, second_buf, lr, momentum, weight_decay, beta2, ns_steps):
    """In-place Muon step on fp32 stacks: p, grad, momentum_buf (k, m, n); second_buf (k, m, 1) or (k, 1, n)."""
    m, n = p.shape[-2:]
    # Nesterov momentum
    momentum_buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(momentum_buf, momentum)
    # orthogonalize, then Muon+: fix the Frobenius norm to that of an exactly semi-orthogonal matrix
    g = polar_express(muon_eq(g), ns_steps).float()
    g = g * (min(m, n) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7))
    # NorMuon: per-row (m >= n) or per-column variance estimate; normalize by it, keeping ||g||_F unchanged
    red_dim = -1 if m >= n else -2
    v = g.square().mean(dim=red_dim, keepdim=True)
    second_buf.lerp_(v, 1 - beta2)
    scale = second_buf.clamp_min(1e-10).rsqrt()
    norm_sq = v.sum(dim=(-2, -1), keepdim=True)  # ||g||^2 / size(red_dim)
    scaled_norm_sq = (v * scale.square()).sum(dim=(-2, -1), keepdim=True)  # ||g*scale||^2 / size(red_dim)
    g = g * (scale * (norm_sq / scaled_norm_sq.clamp_min(1e-20)).sqrt())
    # cautious decoupled weight decay: only decay where the update already pulls p toward zero
    lr_eff = lr * max(1.0, m / n) ** 0.5
    decay = p * (g * p >= 0) * (lr_eff * weight_decay)
    p.sub_(g, alpha=lr_eff).sub_(decay)


def adamw_update_(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """In-place AdamW step on fp32 tensors (step is the 1-based count after this update): p *= 1 - lr*wd, then
    bias-corrected Adam. torch's fused kernel does it in one pass over memory (eager ops took ~10 passes, and the
    embedding tables make this memory-bound)."""
    step_t = torch.tensor(float(step), device=p.device)
    torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], [step_t], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


# -----------------------------------------------------------------------------
# Sharding rules (shared by the optimizer and the checkpoint helpers so they can never disagree)

def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _adamw_is_sharded(shape, world_size):
    return (world_size > 1 and len(shape) >= 1 and math.prod(shape) >= SMALL_PARAM_NUMEL
            and shape[0] % world_size == 0)


def _adamw_rows(shape, rank, world_size):
    rows = shape[0] // world_size
    return rank * rows, (rank + 1) * rows


def _muon_owned(num_params, rank, world_size):
    """[lo, hi) indices within a Muon group owned by rank (empty when lo == hi)."""
    chunk = -(-num_params // world_size)
    lo = min(num_params, rank * chunk)
    return lo, min(num_params, lo + chunk)


# torch 2.13 renamed the *_tensor collectives (the old names print a FutureWarning); older torch only has the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -----------------------------------------------------------------------------
# Optimizer

class MuonAdamW(torch.optim.Optimizer):

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, group):
        kind = group.get("kind")
        if kind not in ("adamw", "muon"):
            raise ValueError(f"param group needs kind 'adamw' or 'muon', got {kind!r}")
        if "lr" not in group:
            raise ValueError("param group needs an lr")
        for k, v in (_ADAMW_DEFAULTS if kind == "adamw" else _MUON_DEFAULTS).items():
            group.setdefault(k, v)
        group.setdefault("initial_lr", group["lr"])
        super().add_param_group(group)
        if kind == "muon":
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"a muon group needs 2-D params of one shape, got {sorted(shapes)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = _dist_info()
        # phase 1: launch all gradient reductions; each launcher returns a "finish" callable (or None)
        finishers = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                finishers += [self._launch_adamw(p, group, rank, world) for p in group["params"]]
            else:
                finishers.append(self._launch_muon(group, rank, world))
        # phase 2: in launch order, wait for the reduced grad, update the local shard, launch its all_gather;
        # a finish returns (gather work, its send buffer kept alive until then, copy-back callable or None)
        gathers = [f() for f in finishers if f is not None]
        # phase 3: wait for the gathers and write the results into the params
        for g in gathers:
            if g is not None:
                work, _send, after = g
                work.wait()
                if after is not None:
                    after()
        return loss

    def _launch_adamw(self, p, group, rank, world):
        if p.grad is None:
            if world > 1:
                raise RuntimeError("distributed MuonAdamW needs a grad on every param (every rank must communicate)")
            return None
        grad, work = p.grad, None
        sharded = _adamw_is_sharded(p.shape, world)
        if sharded:
            lo, hi = _adamw_rows(p.shape, rank, world)
            grad = torch.empty_like(p.grad[lo:hi])
            work = _reduce_scatter(grad, p.grad, op=dist.ReduceOp.AVG, async_op=True)
        elif world > 1:
            work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)

        def finish():
            if work is not None:
                work.wait()
            local = p[lo:hi] if sharded else p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)
            state["step"] += 1
            # fp32 math: an fp32 param that is not sharded is updated where it lies; otherwise on a copy (bf16
            # params, and a shard whose all_gather input must not alias its output p)
            in_place = not sharded and p.dtype == torch.float32
            new = p if in_place else local.to(torch.float32, copy=True)
            beta1, beta2 = group["betas"]
            adamw_update_(new, grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"],
                          group["lr"] * getattr(p, "lr_mul", 1.0), beta1, beta2, group["eps"],
                          group["weight_decay"] * getattr(p, "wd_mul", 1.0))
            if not sharded:
                if not in_place:
                    p.copy_(new)
                return None
            send = new.to(p.dtype)  # a separate buffer: all_gather's input must not alias its output p
            return _all_gather(p, send, async_op=True), send, None

        return finish

    def _launch_muon(self, group, rank, world):
        params = group["params"]
        K, (m, n) = len(params), params[0].shape
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            if world > 1:
                raise RuntimeError("distributed MuonAdamW needs a grad on every param (every rank must communicate)")
            if all(g is None for g in grads):
                return None
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        lo, hi = _muon_owned(K, rank, world)
        stack, work = None, None
        if world > 1:
            chunk = -(-K // world)
            stack = grads[0].new_zeros(chunk * world, m, n)  # zero padding for the slots no param fills
            for i, g in enumerate(grads):
                stack[i].copy_(g)
            own_grads = grads[0].new_empty(chunk, m, n)
            work = _reduce_scatter(own_grads, stack, op=dist.ReduceOp.AVG, async_op=True)
        else:
            own_grads = torch.stack(grads)

        def finish():
            if work is not None:
                work.wait()
            owned = hi - lo
            if owned > 0:
                state = self.state[params[0]]  # one stacked state per group, keyed by its first param
                if not state:
                    state["momentum_buffer"] = torch.zeros(owned, m, n, dtype=torch.float32, device=params[0].device)
                    sshape = (owned, m, 1) if m >= n else (owned, 1, n)
                    state["second_momentum_buffer"] = torch.zeros(sshape, dtype=torch.float32, device=params[0].device)
                new = torch.stack([p.to(torch.float32) for p in params[lo:hi]])
                muon_update_(new, own_grads[:owned].float(), state["momentum_buffer"], state["second_momentum_buffer"],
                             group["lr"], group["momentum"], group["weight_decay"], group["beta2"], group["ns_steps"])
            if world == 1:
                for p, q in zip(params, new):
                    p.copy_(q)
                return None
            send = params[0].new_zeros(chunk, m, n)
            if owned > 0:
                send[:owned].copy_(new)
            # reuse the grad stack as the gather output when the dtypes allow (saves a (chunk*W, m, n) buffer)
            out = stack if stack.dtype == params[0].dtype else params[0].new_empty(chunk * world, m, n)

            def copy_back():
                for p, q in zip(params, out):  # out[K:] is padding
                    p.copy_(q)
            return _all_gather(out, send, async_op=True), send, copy_back

        return finish

    # -------------------------------------------------------------------------
    # Checkpointing (see the module docstring for the format)

    def _indexed_groups(self):
        """[(group, [global param index, ...])] in torch.optim numbering."""
        out, i = [], 0
        for group in self.param_groups:
            out.append((group, list(range(i, i + len(group["params"])))))
            i += len(group["params"])
        return out

    def state_dict(self):
        rank, world = _dist_info()
        groups, state = [], {}
        for group, ids in self._indexed_groups():
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
            params = group["params"]
            if group["kind"] == "adamw":
                for i, p in zip(ids, params):
                    st = self.state.get(p)
                    if not st:
                        continue
                    entry = {"step": st["step"], "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
                    if _adamw_is_sharded(p.shape, world):
                        entry["rows"] = (*_adamw_rows(p.shape, rank, world), p.shape[0])
                    state[i] = entry
            else:
                st = self.state.get(params[0])
                if not st:
                    continue
                lo, hi = _muon_owned(len(params), rank, world)
                for j, i in enumerate(ids[lo:hi]):
                    state[i] = {"momentum_buffer": st["momentum_buffer"][j],
                                "second_momentum_buffer": st["second_momentum_buffer"][j]}
        return {"format": "sharded", "rank": rank, "world_size": world, "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict):
        rank, world = _dist_info()
        if state_dict.get("format") == "full":
            state_dict = shard_state_dict(state_dict, rank, world)
        elif state_dict.get("format") != "sharded":
            raise ValueError("not a MuonAdamW state dict (missing format 'full' / 'sharded')")
        elif (state_dict["rank"], state_dict["world_size"]) != (rank, world):
            raise ValueError(f"state dict of rank {state_dict['rank']}/{state_dict['world_size']} cannot be loaded on "
                             f"rank {rank}/{world}: consolidate_state_dicts() the old ranks' dicts and load the result")
        saved_groups, saved = state_dict["param_groups"], state_dict["state"]
        mine = self._indexed_groups()
        if [len(g["params"]) for g in saved_groups] != [len(ids) for _, ids in mine]:
            raise ValueError("saved param groups do not match this optimizer's param groups")
        self.state.clear()
        for (group, ids), sg in zip(mine, saved_groups):
            if sg["kind"] != group["kind"]:
                raise ValueError(f"param group kind mismatch: saved {sg['kind']}, have {group['kind']}")
            group.update({k: copy.deepcopy(v) for k, v in sg.items() if k != "params"})
            params = group["params"]
            if group["kind"] == "adamw":
                for i, p in zip(ids, params):
                    if i not in saved:
                        continue
                    local = p[slice(*_adamw_rows(p.shape, rank, world))] if _adamw_is_sharded(p.shape, world) else p
                    e = saved[i]
                    if e["exp_avg"].shape != local.shape:
                        raise ValueError(f"param {i}: saved state shape {tuple(e['exp_avg'].shape)}, "
                                         f"expected {tuple(local.shape)}")
                    self.state[p] = {"step": int(e["step"]),
                                     **{k: e[k].to(p.device, torch.float32, copy=True) for k in ("exp_avg", "exp_avg_sq")}}
            else:
                lo, hi = _muon_owned(len(params), rank, world)
                present = [i in saved for i in ids[lo:hi]]
                if not any(present):
                    continue
                if not all(present):
                    raise ValueError("muon group state is partial: every owned param needs state, or none")
                dev = params[0].device
                self.state[params[0]] = {
                    k: torch.stack([saved[i][k] for i in ids[lo:hi]]).to(dev, torch.float32)
                    for k in ("momentum_buffer", "second_momentum_buffer")}


# -----------------------------------------------------------------------------
# Re-sharding helpers for resuming on a different world size

def consolidate_state_dicts(state_dicts, world_size):
    """Merge the sharded state dicts of all ranks of one run into a world-size-independent 'full' state dict."""
    sds = sorted(state_dicts, key=lambda sd: sd["rank"])
    if [sd["rank"] for sd in sds] != list(range(world_size)) or any(sd["world_size"] != world_size for sd in sds):
        raise ValueError(f"need exactly the sharded state dicts of ranks 0..{world_size - 1} of a {world_size}-rank run")
    state, row_pieces = {}, {}
    for sd in sds:
        for i, entry in sd["state"].items():
            if "rows" in entry:
                row_pieces.setdefault(i, []).append(entry)
            elif i not in state:  # replicated AdamW state (identical on all ranks) or the single owner's Muon state
                state[i] = dict(entry)
    for i, pieces in row_pieces.items():
        pieces.sort(key=lambda e: e["rows"][0])
        if [e["rows"][0] for e in pieces] != [sum(e["exp_avg"].size(0) for e in pieces[:j]) for j in range(len(pieces))]:
            raise ValueError(f"param {i}: row shards do not tile the full tensor")
        state[i] = {"step": pieces[0]["step"],
                    **{k: torch.cat([e[k] for e in pieces]) for k in ("exp_avg", "exp_avg_sq")}}
    return {"format": "full", "param_groups": copy.deepcopy(sds[0]["param_groups"]), "state": state}


def shard_state_dict(full, rank, world_size):
    """The sharded state dict that `rank` of a `world_size`-rank run holds, cut from a 'full' state dict."""
    state = {}
    for group in full["param_groups"]:
        ids = group["params"]
        if group["kind"] == "adamw":
            for i in ids:
                if i not in full["state"]:
                    continue
                e = full["state"][i]
                shape = tuple(e["exp_avg"].shape)
                if _adamw_is_sharded(shape, world_size):
                    lo, hi = _adamw_rows(shape, rank, world_size)
                    state[i] = {"step": e["step"], "exp_avg": e["exp_avg"][lo:hi].clone(),
                                "exp_avg_sq": e["exp_avg_sq"][lo:hi].clone(), "rows": (lo, hi, shape[0])}
                else:
                    state[i] = dict(e)
        else:
            lo, hi = _muon_owned(len(ids), rank, world_size)
            state.update({i: dict(full["state"][i]) for i in ids[lo:hi] if i in full["state"]})
    return {"format": "sharded", "rank": rank, "world_size": world_size,
            "param_groups": copy.deepcopy(full["param_groups"]), "state": state}
