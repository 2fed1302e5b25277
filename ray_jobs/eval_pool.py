"""
A pool of Ray actors, each holding one model replica, that evaluation work is fanned out to.

Each actor loads the checkpoint itself (one GPU per actor on GPU clusters, CPU otherwise), so only small work items
and results travel. Work is a list of jobs (fn, args, n_problems); `EvalPool.map` keeps every actor busy with one
job at a time, shows a progress bar of problems done across all actors, and returns results in job order.
`fn(ctx, *args)` runs inside an actor with ctx.model / ctx.tokenizer / ctx.device / ctx.cache; ObjectRefs passed as
top-level args arrive resolved.

Failures: if an actor dies mid-job (node lost, OOM kill), a replacement actor is started and the job is redone
elsewhere; a job that still cannot complete after `max_attempts`, or that raises inside `fn` (a bug or bad data:
retrying would fail the same way), stops the run with an EvalJobError naming the job and the cause.

The *_work functions at the bottom are the jobs of base_eval and chat_eval; they live here (an importable module) so
actors can unpickle them by reference even when the job script runs as __main__.
"""
import logging
import math
import os
from collections import deque
from contextlib import contextmanager

import ray
from ray.exceptions import RayActorError, RayTaskError

from nanochat import cuda_runtime

logger = logging.getLogger("nanochat")


class EvalJobError(RuntimeError):
    """A job of the pool could not be completed. `job` is its name, `cause` what went wrong."""

    def __init__(self, job, cause):
        super().__init__(f"eval job {job} failed: {cause}")
        self.job, self.cause = job, cause


class ActorContext:
    """What a job function sees inside an actor."""

    def __init__(self, model, tokenizer, meta, device, base_dir):
        self.model, self.tokenizer, self.meta, self.device, self.base_dir = model, tokenizer, meta, device, base_dir
        self.cache = {}  # per-actor memo (e.g. task objects), so each replica loads a task's data once


@ray.remote
class EvalActor:
    def __init__(self, source, model_tag, step, base_dir, use_gpu):
        import torch
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        if use_gpu:
            cuda_runtime.set_device(self.device)
        self.load(source, model_tag, step, base_dir)

    def load(self, source, model_tag, step, base_dir):
        """(Re)load the replica from a checkpoint: a warm pool can move on to the next stage's model."""
        from nanochat.checkpoint_manager import load_model
        self.ctx = None  # free the old replica first
        model, tokenizer, meta = load_model(source, self.device, "eval", model_tag, step, base_dir=base_dir)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer under {base_dir}/tokenizer")
        self.ctx = ActorContext(model, tokenizer, meta, self.device, base_dir)
        return True

    def info(self):
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "checkpoint": self.ctx.meta.get("step")}

    def run(self, fn, *args):
        return fn(self.ctx, *args)


def default_num_actors(use_gpu):
    """All GPUs of the cluster, else a few CPU replicas (half the CPUs, at most 4: each runs its own torch)."""
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, min(4, int(resources.get("CPU", 1)) // 2))


class EvalPool:
    """EvalPool(source, model_tag, step, num_actors=None, base_dir=None, use_gpu=None). Resolve the tag and step
    before creating the pool (resolve_checkpoint) so every replica loads the same checkpoint."""

    def __init__(self, source, model_tag, step, num_actors=None, base_dir=None, use_gpu=None, max_attempts=3,
                 cpus_per_actor=1, max_replacements=None):
        from nanochat.common import get_base_dir
        self.use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if use_gpu is None else use_gpu
        self.num_actors = num_actors or default_num_actors(self.use_gpu)
        self.args = (source, model_tag, step, base_dir or get_base_dir(), self.use_gpu)
        self.options = {"num_cpus": cpus_per_actor, "num_gpus": 1 if self.use_gpu else 0}
        self.max_attempts = max_attempts
        self.replacements_left = self.num_actors if max_replacements is None else max_replacements
        self.actors = [self._start_actor() for _ in range(self.num_actors)]

    def _start_actor(self):
        return EvalActor.options(**self.options).remote(*self.args)

    def load(self, source, model_tag, step, base_dir=None):
        """Point every replica (and future replacements) at another checkpoint, keeping the actors warm."""
        self.args = (source, model_tag, step, base_dir or self.args[3], self.use_gpu)
        ray.get([a.load.remote(*self.args[:4]) for a in self.actors])

    def ready(self):
        """Block until every replica has loaded its model; -> their info dicts. A replica that cannot load the
        checkpoint fails here with the cause (rather than as a dead actor mid-run)."""
        try:
            return ray.get([a.info.remote() for a in self.actors])
        except RayActorError as e:
            raise RuntimeError(f"eval pool: a model replica failed to start: {e}") from e

    def map(self, jobs, desc="eval", progress=True):
        """jobs: list of (name, fn, args, n_problems). -> list of fn results, in job order."""
        from tqdm import tqdm
        pending = deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        results = [None] * len(jobs)
        idle = deque(self.actors)
        running = {}  # ObjectRef -> (job index, actor)
        bar = tqdm(total=sum(j[3] for j in jobs), desc=desc, unit="problem", disable=not progress, mininterval=1.0)
        try:
            while pending or running:
                while pending and idle:
                    i, actor = pending.popleft(), idle.popleft()
                    _, fn, args, _ = jobs[i]
                    attempts[i] += 1
                    running[actor.run.remote(fn, *args)] = (i, actor)
                if not running:
                    raise EvalJobError(jobs[pending[0]][0], "no live actors left in the pool")
                done, _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except RayActorError as e:  # the replica died (node lost, OOM, crash): redo the job elsewhere
                    replacement = self._replace(actor, e)
                    if replacement is not None:
                        idle.append(replacement)
                    if attempts[i] >= self.max_attempts:
                        raise EvalJobError(jobs[i][0], f"its actor died {attempts[i]} times; last: {e}") from e
                    logger.warning(f"eval job {jobs[i][0]}: actor died ({type(e).__name__}); redoing the job")
                    pending.appendleft(i)
                    continue
                except RayTaskError as e:  # fn raised: deterministic, so retrying would not help
                    raise EvalJobError(jobs[i][0], e.cause if e.cause is not None else e) from e
                idle.append(actor)
                bar.update(jobs[i][3])
        finally:
            bar.close()
        return results

    def _replace(self, actor, error):
        """Drop a dead actor; start a fresh one while the replacement budget lasts (-> it, or None)."""
        if actor in self.actors:
            self.actors.remove(actor)
        if self.replacements_left <= 0:
            logger.warning(f"eval pool: actor lost and no replacements left ({len(self.actors)} live): {error}")
            return None
        self.replacements_left -= 1
        new = self._start_actor()
        self.actors.append(new)
        return new

    def shutdown(self):
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


@contextmanager
def open_pool(pool, source, model_tag, step, num_actors=None, base_dir=None):
    """A ready pool on this checkpoint: the warm `pool` given, re-pointed and left open, else a new one that is
    shut down on exit."""
    own_pool = pool is None
    if own_pool:
        pool = EvalPool(source, model_tag, step, num_actors, base_dir)
    else:
        pool.load(source, model_tag, step, base_dir)
    try:
        pool.ready()
        print(f"evaluating {source}/{model_tag} step {step} on {pool.num_actors} replica(s)"
              f" ({'GPU' if pool.use_gpu else 'CPU'})", flush=True)
        yield pool
    finally:
        if own_pool:
            pool.shutdown()


def resolve_checkpoint(source, model_tag=None, step=None, base_dir=None):
    """(source, tag, step) that load_model would pick, resolved once in the driver so every replica loads the same
    model: a stage's largest d<N> tag and newest step; for a directory or Hub repo its name and step, the repo pinned
    to its current commit and downloaded here (a bad repo fails before any replica starts; on this node the replicas
    then find it in the cache)."""
    from nanochat import hub
    from nanochat.checkpoint_manager import (SOURCE_DIRS, directory_step, find_largest_model, find_last_step,
                                             pin_source, source_tag)
    from nanochat.common import get_base_dir
    from nanochat.storage import join
    if source not in SOURCE_DIRS:
        source = pin_source(source)
        return source, source_tag(source), directory_step(hub.locate(source, step), step)
    checkpoints_dir = join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    step = step if step is not None else find_last_step(join(checkpoints_dir, model_tag))
    return source, model_tag, step


def shards_for(n, num_actors, align=1, per_actor=4):
    """Index shards of range(n): ~per_actor shards per actor (load balance, progress), aligned to `align`."""
    from nanochat.chat_eval import shard_indices
    return shard_indices(n, max(1, num_actors * per_actor), align)


# -----------------------------------------------------------------------------
# Jobs (run inside EvalActor)

def core_work(ctx, data, task_meta, indices):
    """CORE: correctness (bool) of each example index of one task."""
    from nanochat.core_eval import evaluate_example
    return [evaluate_example(ctx.model, ctx.tokenizer, data, i, task_meta, ctx.device) for i in indices]


def chat_work(ctx, task_name, task_data, indices, opts):
    """Chat eval: per-problem records of one task's indices (the task object is built once per actor)."""
    from nanochat.chat_eval import build_task, evaluate_problems
    key = ("task", task_name, task_data)
    if key not in ctx.cache:
        ctx.cache[key] = build_task(task_name, task_data)
    return evaluate_problems(ctx.cache[key], ctx.model, ctx.tokenizer, indices, **opts)


def bpb_work(ctx, split, source, batch_size, split_tokens, rank, world_size):
    """(nats, bytes) over this worker's stripe of the split: split_tokens // (B*T*W) batches of B rows of T tokens,
    T = the model's sequence_len. Sums, not a ratio, so the driver can combine the stripes exactly like nanochat's
    all-reduce does (bpb = total nats / (ln 2 * total bytes))."""
    import itertools
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.dataset import resolve_source
    from nanochat.loss_eval import evaluate_bpb
    source = resolve_source(source, base_dir=ctx.base_dir)  # 'auto' / 'hub': the shards under the pool's root
    T = ctx.model.config.sequence_len
    steps = split_tokens // (batch_size * T * world_size)
    token_bytes = ctx.tokenizer.compute_token_bytes().to(ctx.device)  # the model's own (not the storage root's)
    loader = tokenizing_distributed_data_loader_bos_bestfit(ctx.tokenizer, batch_size, T, split, ctx.device,
                                                            source=source, rank=rank, world_size=world_size)
    nats, nbytes = 0.0, 0
    for x, y in itertools.islice(loader, steps):  # the val split may hold fewer batches: then take them all
        b = int(token_bytes[y.clamp(min=0)].masked_fill(y < 0, 0).sum().item())
        if b:  # per-batch bpb back to nats: evaluate_bpb keeps the masking rules in one place
            nats += evaluate_bpb(ctx.model, [(x, y)], 1, token_bytes) * math.log(2) * b
            nbytes += b
    return nats, nbytes


def sample_work(ctx, prompts, max_tokens=16, num_unconditioned=0, unconditioned_tokens=128):
    """Greedy completions of the prompts, plus unconditioned samples (temperature 1) from <|bos|>."""
    from nanochat.engine import Engine
    engine, tok = Engine(ctx.model, ctx.tokenizer), ctx.tokenizer
    bos = tok.get_bos_token_id()
    samples = []
    for p in prompts:
        ids = tok.encode(p, prepend=bos)
        seqs, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(tok.decode(seqs[0][1:]))
    unconditioned = []
    if num_unconditioned > 0:
        seqs, _ = engine.generate_batch([bos], num_samples=num_unconditioned, max_tokens=unconditioned_tokens,
                                        temperature=1.0)
        unconditioned = [tok.decode(s[1:]) for s in seqs]
    return samples, unconditioned

