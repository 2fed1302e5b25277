"""
Running a nanochat worker function under Ray Train: `launch` is the whole entry point of each training stage
(base_train, mid_train, chat_sft, chat_rl name their worker, config and output directory, and nothing else).

Ray Train starts the process group, places the workers, restarts them after a failure and keeps a record of the
checkpoints. The checkpoints themselves are written by nanochat.checkpoint_manager straight into the storage root
in nanochat's layout; what we report to Ray is a tiny pointer ({"step", "run_id"}). Workers of a restarted group
resume from the newest *complete* step of their run (its run id is in every meta file) on storage, whether or not
Ray registered it: the controller takes reports from a one-slot queue it drains every couple of seconds, so a
worker killed right after a checkpoint is often restarted before Ray knows that checkpoint exists.
"""
import argparse
import json
import os
import tempfile
import uuid

import torch

from nanochat import storage
from nanochat.checkpoint_manager import find_resume_step, read_meta
from nanochat.storage import join, pyarrow_filesystem
from nanochat.train import WorkerContext
from ray_jobs import common


class RayWorkerContext(WorkerContext):
    """Reports to Ray Train only with a checkpoint. ray.train.report puts into a one-slot queue that the controller
    drains once per poll (2 s by default), so a loop reporting more often than that stalls: per-step metric reports
    every 10 steps more than doubled the step time of a 72 ms/step loop (bench/bench_ray_train.py). Metrics go to
    the console, metrics.jsonl and wandb instead; checkpoints are far apart and slow to write anyway."""

    def __init__(self, run_id, **kwargs):
        super().__init__(**kwargs)
        self.run_id = run_id

    def on_checkpoint(self, step, metrics):
        import ray.train
        if self.rank != 0:
            ray.train.report(_floats(metrics), checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "pointer.json"), "w") as f:
                json.dump({"step": step, "run_id": self.run_id, "checkpoint_dir": self.checkpoint_dir}, f)
            ray.train.report(_floats(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))


def _floats(metrics):
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def worker_entry(train_config):
    """Runs in every Ray Train worker: build the context, work out where to resume, call the nanochat worker."""
    import ray.train
    from nanochat.common import device_peak_flops
    tc = dict(train_config)
    os.environ["NANOCHAT_BASE_DIR"] = tc["base_dir"]  # the storage root, whatever this node's environment says
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if tc["use_gpu"]:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, tc.get("threads_per_worker") or torch.get_num_threads()))
    ckpt_dir = tc["checkpoint_dir"]
    run_id, resume_step = tc["run_id"], tc["resume_step"]
    newest = find_resume_step(ckpt_dir, run_id)
    if newest is not None:  # a restarted worker group: continue this run from its newest complete step
        resume_step = newest
        if rank == 0:
            print(f"restarted: resuming run {run_id[:8]} from step {resume_step}", flush=True)
    ctx = RayWorkerContext(run_id, rank=rank, world_size=world, device=device, checkpoint_dir=ckpt_dir,
                           metrics_path=tc.get("metrics_path") if rank == 0 else None,
                           peak_flops=device_peak_flops(device))
    return tc["worker_fn"](tc["cfg"], ctx, run_id=run_id, resume_step=resume_step, **tc.get("worker_kwargs", {}))


def run_trainer(worker_fn, cfg, *, name, checkpoint_dir, storage, num_workers, use_gpu, resume_step=None,
                cpus_per_worker=1, max_failures=3, worker_kwargs=None, metrics_path=None):
    """Launch `worker_fn(cfg, ctx, run_id=, resume_step=, **worker_kwargs)` on num_workers Ray Train workers and
    return the final checkpoint's meta (step, loop_state, ...) merged with its reported metrics. Each call is a new
    Ray run (fresh name); resuming a previous run is explicit (resume_step), restarts after failures are automatic
    (max_failures). Rank 0 logs to metrics_path (default: metrics.jsonl in the checkpoint dir)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    run_id = uuid.uuid4().hex
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    # Ray Train's own records live under the same root, through the same filesystem (and endpoint) as ours
    ray_fs, ray_storage = pyarrow_filesystem(join(storage, "ray_runs"))
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config=dict(worker_fn=worker_fn, cfg=cfg, run_id=run_id, resume_step=resume_step,
                               checkpoint_dir=checkpoint_dir, base_dir=storage, use_gpu=use_gpu,
                               metrics_path=metrics_path or join(checkpoint_dir, "metrics.jsonl"),
                               threads_per_worker=cpus_per_worker, worker_kwargs=worker_kwargs or {}),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{name}-{run_id[:8]}", storage_path=ray_storage, storage_filesystem=ray_fs,
            # finite limits: a lost node must not hang the job forever
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    last = find_resume_step(checkpoint_dir, run_id)
    if last is None:
        return {}
    return {**read_meta(checkpoint_dir, last).get("loop_state", {}), **(result.metrics or {})}


def launch(argv, *, description, stage, config_cls, worker_fn, output_dir, worker_kwargs=None, after=None,
           defaults=None):
    """One training stage from the command line: the launcher's flags (LaunchConfig) and the stage config's, the
    storage root, Ray, the resume lookup, the worker group. worker_kwargs(launch_cfg, cfg, root, num_workers) ->
    extra worker arguments (e.g. a Ray Data source); after(cfg, final, root) runs once training is done. Returns
    the final metrics."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.LaunchConfig.add_args(parser)
    config_cls.add_args(parser)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    run = common.LaunchConfig.from_args(args)
    root = common.storage_root(run.storage)
    cfg = config_cls.from_args(args).resolved()
    common.init_ray()
    ckpt_dir = output_dir(cfg, root)
    storage.makedirs(ckpt_dir)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    if cfg.resume and resume_step is None:
        print(f"--resume: no checkpoint in {ckpt_dir} yet, starting fresh")
    num_workers = common.default_num_workers(run.num_workers, run.use_gpu)
    final = run_trainer(
        worker_fn, cfg, name=f"{stage}-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=num_workers, use_gpu=run.use_gpu, resume_step=resume_step, cpus_per_worker=run.cpus_per_worker,
        max_failures=run.max_failures,
        worker_kwargs=worker_kwargs(run, cfg, root, num_workers) if worker_kwargs else {})
    if after:
        after(cfg, final, root)
    print(f"{stage} finished: {final}")
    return final
