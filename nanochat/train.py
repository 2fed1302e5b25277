"""
The per-worker training loop every training stage shares (base, mid, SFT, RL).

`run_loop` is a plain function: it takes the model, the optimizer, a step function (one optimizer step: for
next-token training `supervised_step`'s, over an iterator of (inputs, targets, loader_state) micro-batches and the
schedules; RL brings its own), the evals and a `WorkerContext`. Launchers differ only in the context they pass:
a plain process (tests, GPU benchmarks, torchrun) uses WorkerContext as is; Ray Train passes one whose
`on_checkpoint` calls `ray.train.report` (see ray_jobs/ray_train.py). Nothing here imports Ray.

Loop: it runs num_iterations + 1 iterations so the final eval and save see step N; per iteration:
evals (all ranks), samples (rank 0), save, stop if last, then one optimizer step (step_fn).
"""
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from nanochat import storage
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.common import is_distributed, print0


@dataclass
class LoopState:
    """What the loop needs to continue exactly where it stopped (saved in the checkpoint meta)."""
    step: int = 0
    smooth_train_loss: float = 0.0
    total_training_time: float = 0.0
    total_data_wait: float = 0.0
    best_eval: dict = field(default_factory=dict)
    world_size: int = 0  # of the group that wrote the checkpoint (0: written before this was recorded)
    resizes: list = field(default_factory=list)  # "step N: 2 -> 1 (node lost)", one per change of world size
    offloaded: list = field(default_factory=list)  # steps whose offloaded evals have not reported back yet


@dataclass
class Eval:
    """A periodic evaluation run by all ranks: fn(step) -> dict of metrics (floats). every <= 0: last step only.
    at_start: also at step 0 (cheap evals give the starting point; expensive ones skip it). offload: may run on a
    checkpoint outside the training workers while training goes on (when ctx.offload_evals; the first and last
    steps' stay inline)."""
    name: str
    every: int
    fn: object
    at_start: bool = True
    offload: bool = False


@dataclass
class WorkerContext:
    """Where this worker is and where its outputs go. Subclassed by launchers (Ray Train) to report upstream."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    checkpoint_dir: str = None  # nanochat layout: model_*.pt, optim_*_rank*.pt, meta_*.json
    base_dir: str = None  # the run's storage root (tokenizer, source checkpoints, data, report); None: user default
    metrics_path: str = None  # JSONL written by rank 0
    peak_flops: float = float("inf")  # per worker, for MFU
    wandb: object = None  # rank 0's wandb run (or None): gets every logged line
    # elastic groups: the smallest world size the run may have; hyperparameters that depend on the world size are
    # derived from it, so every size trains the same global batch (0: this group's size)
    batch_world_size: int = 0
    restart_reason: str = ""  # why this group continues a checkpoint of its own run ("": a fresh start or --resume)
    offload_evals: bool = False  # evals marked offload run elsewhere, on the checkpoint of their step

    def __post_init__(self):
        self.batch_world_size = self.batch_world_size or self.world_size

    def on_checkpoint(self, step, metrics, evaluate=()):
        """Called on every rank right after a checkpoint of `step` is complete on storage. The only upstream
        report: metrics go to the console, metrics.jsonl and wandb (see ray_jobs/ray_train.py for why).
        evaluate: names of the offloaded evals to run on this checkpoint."""

    def offloaded_results(self, steps, wait=False):
        """Rank 0: [(step, {metric: value})] for those of `steps` whose offloaded evals have finished (a failed one
        with {}); wait: until all have."""
        return []

    def interruption(self):
        """Collective, at every step boundary: why the group must checkpoint here and hand over to a group of
        another size (e.g. "grown", "preempted"), the same on every rank; "" to go on. A plain process never is."""
        return ""

    def hand_over(self, step, reason):
        """After the checkpoint of `step`: wait to be replaced by the next group (returning means training goes
        on)."""


def local_context(checkpoint_dir, device_type="", seed=42, base_dir=None):
    """WorkerContext for a plain process or one torchrun rank, writing into checkpoint_dir (created), reading from
    the storage root base_dir."""
    from nanochat.common import autodetect_device_type, compute_init, device_peak_flops
    _, rank, _, world, device = compute_init(device_type or autodetect_device_type(), seed=seed)
    storage.makedirs(checkpoint_dir)
    return WorkerContext(rank=rank, world_size=world, device=device, checkpoint_dir=checkpoint_dir, base_dir=base_dir,
                         metrics_path=storage.join(checkpoint_dir, "metrics.jsonl"),
                         peak_flops=device_peak_flops(device))


def gather_loader_states(state):
    """Every rank's loader state, on every rank (the checkpoint needs all of them to resume on any world size)."""
    if not is_distributed():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def all_reduce_max(value, device):
    """The largest of every rank's small int (e.g. 1 when one rank's data ran out)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def save_training_checkpoint(ctx, step, model, optimizer, loader_state, loop_state, meta):
    """Collective: model (rank 0) + each rank's optimizer shard + meta with every rank's loader state."""
    loader_states = gather_loader_states(loader_state)
    meta = {**meta, "step": step, "loader_states": loader_states, "loop_state": asdict(loop_state)}
    model_data = model.state_dict() if ctx.rank == 0 else None
    save_checkpoint(ctx.checkpoint_dir, step, model_data, optimizer.state_dict(), meta, rank=ctx.rank)


def _is_due(step, every, last_step):
    return last_step or (every > 0 and step % every == 0)


def _record_eval(state, result):
    for k, v in result.items():
        state.best_eval[k] = min(v, state.best_eval.get(k, math.inf)) if "loss" in k or "bpb" in k \
            else max(v, state.best_eval.get(k, -math.inf))


@dataclass
class StepResult:
    """What one optimizer step reports to the loop: its metrics line (metrics.jsonl, and wandb under train/), the
    console text, the data state to checkpoint after it, and whether the data ran out before it could run."""
    line: dict = field(default_factory=dict)
    text: str = ""
    loader_state: object = None
    exhausted: bool = False


def restore(ctx, resume_step, model, optimizer):
    """Load checkpoint `resume_step` of ctx.checkpoint_dir into model and optimizer (this rank's shard): returns
    (LoopState, every rank's loader states); (a fresh LoopState, None) when resume_step is None."""
    if resume_step is None:
        return LoopState(), None
    model_data, optim_data, meta = load_checkpoint(ctx.checkpoint_dir, resume_step, ctx.device, load_optimizer=True,
                                                   rank=ctx.rank, world_size=ctx.world_size)
    model.load_state_dict(model_data)
    optimizer.load_state_dict(optim_data)
    print0(f"resumed from step {resume_step} ({ctx.checkpoint_dir})")
    return LoopState(**meta["loop_state"]), meta["loader_states"]


def run_loop(model, optimizer, step_fn, *, num_iterations, ctx, evals=(), sample_fn=None, sample_every=-1,
             save_every=-1, meta=None, loop_state=None, loader_state=None):
    """The loop every stage shares: evals, samples, checkpoints (reported through ctx.on_checkpoint), metrics.jsonl,
    wandb, the stop at num_iterations; `step_fn(step, state)` runs one optimizer step and returns a StepResult.
    `loader_state` is the state to checkpoint before any step ran (on resume: the restored one). Returns the final
    LoopState."""
    state = loop_state or LoopState()
    start_step = step = state.step
    meta = meta or {}
    metrics_file = storage.AppendLog(ctx.metrics_path) if (ctx.rank == 0 and ctx.metrics_path) else None
    if metrics_file is not None and start_step > 0:  # which checkpoint this run (or restarted group) continued from
        metrics_file.write(json.dumps({"step": start_step, "resumed_from": start_step, "wall": time.time()}))
    if start_step > 0 and state.world_size and state.world_size != ctx.world_size:
        resized = {"from": state.world_size, "to": ctx.world_size, "reason": ctx.restart_reason or "resume"}
        state.resizes.append(f"step {start_step}: {resized['from']} -> {resized['to']} ({resized['reason']})")
        print0(f"step {start_step:05d} | world size {state.resizes[-1].split(': ', 1)[1]}")
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": start_step, "resized": resized, "wall": time.time()}))
    state.world_size = ctx.world_size

    def log_offloaded(wait=False):
        if ctx.rank != 0:
            return
        for eval_step, result in ctx.offloaded_results(list(state.offloaded), wait):
            state.offloaded.remove(eval_step)
            if not result:
                continue
            _record_eval(state, result)
            print0(f"step {eval_step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in result.items()) +
                   " (evaluated off the training workers)")
            if metrics_file is not None:
                metrics_file.write(json.dumps({"step": eval_step, **result, "offloaded": True}))
            if ctx.wandb is not None:
                ctx.wandb.log({"step": eval_step, **result})
    try:
        while True:
            last_step = step == num_iterations
            metrics, offloaded = {}, []
            for ev in evals:
                if _is_due(step, ev.every, last_step) and (step > 0 or ev.at_start or last_step):
                    if ev.offload and ctx.offload_evals and start_step < step and not last_step:
                        offloaded.append(ev.name)
                        continue
                    model.eval()
                    result = ev.fn(step)
                    model.train()
                    metrics.update(result)
                    _record_eval(state, result)
            if metrics:
                print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
            log_offloaded(wait=last_step)
            if sample_fn is not None and ctx.rank == 0 and sample_every > 0 and (step % sample_every == 0 or last_step):
                model.eval()
                sample_fn(step)
                model.train()
            if step > start_step and (last_step or offloaded or (save_every > 0 and step % save_every == 0)):
                state.step = step
                save_training_checkpoint(ctx, step, model, optimizer, loader_state, state, meta)
                if metrics_file is not None:  # what led up to the checkpoint is stored with it
                    metrics_file.flush()
                ctx.on_checkpoint(step, {"step": step, **metrics}, evaluate=offloaded)
                if offloaded and ctx.rank == 0:  # after the save: a group restored from it runs these evals itself
                    state.offloaded.append(step)
            if metrics_file is not None and metrics:
                metrics_file.write(json.dumps({"step": step, **metrics}))
            if ctx.wandb is not None and metrics:
                ctx.wandb.log({"step": step, **metrics})
            if last_step:
                break
            reason = ctx.interruption() if step > start_step else ""
            if reason:  # a step boundary: checkpoint (unless just saved) and hand over, so no step is trained twice
                if state.step != step:
                    state.step = step
                    save_training_checkpoint(ctx, step, model, optimizer, loader_state, state, meta)
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": step, "handover": reason, "wall": time.time()}))
                    metrics_file.flush()
                print0(f"step {step:05d} | {reason}: checkpoint written, handing over to the next worker group")
                ctx.hand_over(step, reason)

            result = step_fn(step, state)
            if result.exhausted:
                print0(f"data exhausted at step {step}: stopping")
                num_iterations = step  # the next iteration is the last: eval + save
                continue
            loader_state = result.loader_state
            step += 1
            line = {"step": step, **result.line, "world_size": ctx.world_size, "wall": time.time()}
            eta = (num_iterations - step) * result.line.get("dt_ms", 0.0) / 60e3
            print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | {result.text} | "
                   f"workers: {ctx.world_size} | eta: {eta:.1f}m")
            if ctx.wandb is not None:
                ctx.wandb.log({f"train/{k}": v for k, v in line.items()})
            if metrics_file is not None:
                metrics_file.write(json.dumps(line))
    finally:
        if metrics_file is not None:
            metrics_file.close()
    state.step = step
    return state


def supervised_step(model, optimizer, batches, *, grad_accum_steps, schedule, ctx, tokens_per_step, flops_per_token,
                    compiled_model=None):
    """step_fn for next-token training (base, mid, SFT): grad_accum_steps micro-batches from `batches` (which yields
    (x, y, loader_state) until the data is exhausted), then one optimizer step at schedule(step) = (lr multiplier,
    muon momentum or None, muon weight decay or None). tokens_per_step None counts the tokens actually trained on
    (variable lengths)."""
    from nanochat.schedules import apply_schedule
    fwd = model if compiled_model is None else compiled_model  # (a compiled module has no truth value)
    count_tokens = tokens_per_step is None

    def step_fn(step, state):
        t0 = time.perf_counter()
        data_wait, exhausted, loss_sum, step_tokens, loader_state = 0.0, False, 0.0, 0, None
        for _ in range(grad_accum_steps):
            td = time.perf_counter()
            try:
                x, y, loader_state = next(batches)
            except StopIteration:
                exhausted = True
                break
            data_wait += time.perf_counter() - td
            loss = fwd(x, y)
            (loss / grad_accum_steps).backward()
            loss_sum += loss.detach()
            step_tokens += x.numel() * ctx.world_size
        if all_reduce_max(exhausted, ctx.device):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(exhausted=True)
        lrm, momentum, wd = schedule(step)
        apply_schedule(optimizer, lrm, momentum, wd)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum_steps
        if is_distributed():  # log the global batch's loss, not rank 0's share of it
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = train_loss.item()  # the host sync that makes dt honest
        dt = time.perf_counter() - t0
        # debiased EMA of the loss (beta 0.9), as nanochat prints
        state.smooth_train_loss = 0.9 * state.smooth_train_loss + 0.1 * train_loss
        debiased = state.smooth_train_loss / (1 - 0.9 ** (step + 1))
        if step + 1 > 10:  # the first steps include compilation / warm-up
            state.total_training_time += dt
        state.total_data_wait += data_wait
        step_tokens = step_tokens if count_tokens else tokens_per_step
        tok_per_sec = step_tokens / dt
        mfu = 100 * flops_per_token * step_tokens / dt / (ctx.peak_flops * ctx.world_size)
        line = dict(loss=debiased, raw_loss=train_loss, lrm=lrm, dt_ms=dt * 1000, tok_per_sec=tok_per_sec, mfu=mfu,
                    data_wait_pct=100 * data_wait / dt, total_time=state.total_training_time)
        text = (f"loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | "
                f"mfu: {mfu:.2f} | data wait: {100 * data_wait / dt:.1f}% | "
                f"total time: {state.total_training_time / 60:.2f}m")
        return StepResult(line, text, loader_state)
    return step_fn

