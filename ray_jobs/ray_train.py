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
import functools
import json
import os
import tempfile
import time
import uuid

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, ValidationConfig,
                       ValidationTaskConfig)

from nanochat import cuda_runtime, storage
from nanochat.checkpoint_manager import find_resume_step, read_meta
from nanochat.common import get_base_dir
from nanochat.storage import join, pyarrow_filesystem
from nanochat.train import WorkerContext, all_reduce_max
from ray_jobs import common
from ray_jobs.elastic import ElasticPolicy, ElasticTorchTrainer, parse_num_workers, world_sizes
from ray_jobs.elastic_actors import start_handover

HANDOVER_POLL_S = 1.0  # how often rank 0 asks whether the scaling policy wants a checkpoint for a resize
HANDOVER_WAIT_S = 900.0  # a group that handed over and was not replaced in this time fails (and is restarted)
OFFLOADED_POLL_S = 5.0  # how often rank 0 looks for the results of evaluations running off the training workers
OFFLOADED_WAIT_S = 3600.0  # at the end, how long rank 0 waits for the ones still running


class RayWorkerContext(WorkerContext):
    """Reports to Ray Train only with a checkpoint. ray.train.report puts into a one-slot queue that the controller
    drains once per poll (2 s by default), so a loop reporting more often than that stalls: per-step metric reports
    every 10 steps more than doubled the step time of a 72 ms/step loop (bench/bench_ray_train.py). Metrics go to
    the console, metrics.jsonl and wandb instead; checkpoints are far apart and slow to write anyway."""

    def __init__(self, run_id, handover=None, **kwargs):
        super().__init__(**kwargs)
        self.run_id, self.handover = run_id, handover
        self.requested, self.polled_at = "", 0.0
        self.offloaded_polled_at = 0.0

    def interruption(self):
        """A preemption notice (Ray marks every worker of a group with a draining node) or, on rank 0, the
        scaling policy's request for a checkpoint before a resize; every rank gets the same answer."""
        code = 2 if ray.train.get_preemption_info() is not None else 0
        if self.rank == 0 and self.handover is not None and time.monotonic() - self.polled_at > HANDOVER_POLL_S:
            self.requested, self.polled_at = ray.get(self.handover.get_request.remote()), time.monotonic()
        code = all_reduce_max(max(code, int(bool(self.requested))), self.device)
        return ["", self.requested or "resize", "preempted"][code]

    def hand_over(self, step, reason):
        """Tell the policy the checkpoint is written, then wait for Ray Train to replace this group."""
        if self.rank == 0 and self.handover is not None:
            ray.get(self.handover.hand_over.remote(step, reason))
        time.sleep(HANDOVER_WAIT_S)
        raise RuntimeError(f"handed over at step {step} ({reason}) but the worker group was not replaced within "
                           f"{HANDOVER_WAIT_S:.0f} s")

    def on_checkpoint(self, step, metrics, evaluate=()):
        """Report the checkpoint; evaluate: the offloaded evals Ray Train's validation runs on it (a Ray task
        on spare resources, see validate_checkpoint)."""
        validation = ValidationTaskConfig(fn_kwargs={"evals": list(evaluate)}) if evaluate else False
        if self.rank != 0:
            ray.train.report(_floats(metrics), checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "pointer.json"), "w") as f:
                json.dump({"step": step, "run_id": self.run_id, "checkpoint_dir": self.checkpoint_dir}, f)
            ray.train.report(_floats(metrics), checkpoint=ray.train.Checkpoint.from_directory(d),
                             validation=validation)

    def offloaded_results(self, steps, wait=False):
        """The result files validate_checkpoint wrote for `steps` (also those a replaced group submitted: Ray
        Train's controller runs them on); a failed eval is logged and yields {}."""
        deadline = time.monotonic() + OFFLOADED_WAIT_S
        steps = set(steps)
        while steps:
            if wait or time.monotonic() - self.offloaded_polled_at > OFFLOADED_POLL_S:
                self.offloaded_polled_at = time.monotonic()
                for step in sorted(steps):
                    path = offloaded_result_path(self.checkpoint_dir, step)
                    if storage.exists(path):
                        steps.discard(step)
                        result = json.loads(storage.read_text(path))
                        if "error" in result:
                            print(f"offloaded eval of step {step} failed: {result['error']}", flush=True)
                        yield step, result.get("metrics", {})
            if not wait or not steps:
                return
            if time.monotonic() > deadline:
                print(f"offloaded evals of steps {sorted(steps)} did not finish in {OFFLOADED_WAIT_S:.0f} s",
                      flush=True)
                return
            time.sleep(1.0)


def offloaded_result_path(checkpoint_dir, step):
    return join(checkpoint_dir, "offloaded_evals", f"step_{step:06d}.json")


def validate_checkpoint(checkpoint, evals, evaluate_fn, cfg, base_dir, use_gpu, worker_kwargs):
    """Ray Train's validation task: evaluate_fn(cfg, checkpoint_dir, step, evals, device, base_dir=, **worker_kwargs)
    on the checkpoint the pointer names, its result (or error) written beside the checkpoint for the training loop."""
    with checkpoint.as_directory() as d, open(os.path.join(d, "pointer.json")) as f:
        pointer = json.load(f)
    step, ckpt_dir = pointer["step"], pointer["checkpoint_dir"]
    device = torch.device("cuda" if use_gpu else "cpu")
    try:
        result = {"metrics": evaluate_fn(cfg, ckpt_dir, step, evals, device, base_dir=base_dir, **worker_kwargs)}
    except Exception as e:  # the loop must hear of it, or it would wait for this result at the end
        result = {"error": f"{type(e).__name__}: {e}"}
    storage.write_text(offloaded_result_path(ckpt_dir, step), json.dumps(result))
    return result.get("metrics", {})


def _floats(metrics):
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def worker_entry(train_config):
    """Runs in every Ray Train worker: build the context, work out where to resume, call the nanochat worker."""
    from nanochat.common import device_peak_flops
    tc = dict(train_config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if tc["use_gpu"]:
        device = ray.train.torch.get_device()
        cuda_runtime.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, tc.get("threads_per_worker") or torch.get_num_threads()))
    ckpt_dir = tc["checkpoint_dir"]
    run_id, resume_step, handover = tc["run_id"], tc["resume_step"], tc.get("handover")
    newest = find_resume_step(ckpt_dir, run_id)
    restart_reason = ""
    if newest is not None:  # a restarted worker group: continue this run from its newest complete step
        resume_step = newest
        if rank == 0:
            # a group replaced after a handover knows why; one restarted without a handover lost a worker or node
            restart_reason = (handover is not None and ray.get(handover.take.remote())) or "node lost"
            print(f"restarted with {world} workers: resuming run {run_id[:8]} from step {resume_step}", flush=True)
    # the storage root comes in the config, whatever this node's environment says
    ctx = RayWorkerContext(run_id, handover, rank=rank, world_size=world, device=device, checkpoint_dir=ckpt_dir,
                           base_dir=tc["base_dir"], metrics_path=tc.get("metrics_path") if rank == 0 else None,
                           peak_flops=device_peak_flops(device), batch_world_size=tc["batch_world_size"],
                           restart_reason=restart_reason, offload_evals=tc["offload_evals"])
    return tc["worker_fn"](tc["cfg"], ctx, run_id=run_id, resume_step=resume_step, **tc.get("worker_kwargs", {}))


def run_trainer(worker_fn, cfg, *, name, checkpoint_dir, storage, num_workers, use_gpu, resume_step=None,
                cpus_per_worker=1, max_failures=3, worker_kwargs=None, metrics_path=None, world_sizes=None,
                resize_check_s=60.0, evaluate_fn=None):
    """Launch `worker_fn(cfg, ctx, run_id=, resume_step=, **worker_kwargs)` on Ray Train workers and return the
    final checkpoint's meta (step, loop_state, ...) merged with its reported metrics. num_workers: N, or (MIN, MAX)
    for an elastic group that runs at the sizes in world_sizes (default: all of MIN..MAX) and checks for room to
    grow every resize_check_s. Each call is a new Ray run (fresh name); resuming a previous run is explicit
    (resume_step), restarts after failures (max_failures) and preemptions (unlimited) are automatic. Rank 0 logs to
    metrics_path (default: metrics.jsonl in the checkpoint dir). evaluate_fn(cfg, checkpoint_dir, step, names, device,
    base_dir=, **worker_kwargs) -> metrics: run the offloadable evals on their step's checkpoint in a Ray task of
    their own (one worker's resources) while training goes on; None: every eval on the training workers. storage: the
    run's root, handed to every worker and evaluation (their own environments are not consulted)."""
    lo, hi = (num_workers, num_workers) if isinstance(num_workers, int) else num_workers
    run_id = uuid.uuid4().hex
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    # Ray Train's own records live under the same root, through the same filesystem (and endpoint) as ours
    ray_fs, ray_storage = pyarrow_filesystem(join(storage, "ray_runs"))
    handover = start_handover()
    scaling = ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=use_gpu, resources_per_worker=resources,
                            elastic_resize_monitor_interval_s=resize_check_s)
    policy = ElasticPolicy(scaling, world_sizes or range(lo, hi + 1), handover) if hi > lo else None
    validation = None
    if evaluate_fn is not None:
        validation = ValidationConfig(
            functools.partial(validate_checkpoint, evaluate_fn=evaluate_fn, cfg=cfg, base_dir=storage, use_gpu=use_gpu,
                              worker_kwargs=worker_kwargs or {}),
            ray_remote_kwargs={"num_cpus": cpus_per_worker, "num_gpus": int(use_gpu)})
    trainer = ElasticTorchTrainer(
        worker_entry, scaling_policy=policy, validation_config=validation,
        train_loop_config=dict(worker_fn=worker_fn, cfg=cfg, run_id=run_id, resume_step=resume_step,
                               checkpoint_dir=checkpoint_dir, base_dir=storage, use_gpu=use_gpu,
                               metrics_path=metrics_path or join(checkpoint_dir, "metrics.jsonl"),
                               threads_per_worker=cpus_per_worker, worker_kwargs=worker_kwargs or {},
                               handover=handover, batch_world_size=lo, offload_evals=evaluate_fn is not None),
        scaling_config=scaling,
        run_config=RunConfig(
            name=f"{name}-{run_id[:8]}", storage_path=ray_storage, storage_filesystem=ray_fs,
            # finite limits: a lost node must not hang the job forever; preemptions are not failures
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=max_failures,
                                         max_preemption_failures=-1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own console lines at INFO (process group set up, each report, each checkpoint) repeat
            # what the stage logs itself; its warnings and errors still show
            logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    last = find_resume_step(checkpoint_dir, run_id)
    if last is None:
        return {}
    return {**read_meta(checkpoint_dir, last).get("loop_state", {}), **(result.metrics or {})}


def check_world_sizes(lo, hi, error):
    """The sizes in lo..hi that keep the global batch exact; the others are named with the reason (a ValueError if
    none is left)."""
    sizes, skipped = world_sizes(lo, hi, error)
    for size, reason in skipped.items():
        print(f"world size {size} is never used: {reason}", flush=True)
    if hi > lo:
        print(f"elastic worker group: {lo}-{hi} workers, running at sizes {sizes}", flush=True)
    return sizes


def pick_eval_mode(run, num_workers, ray_data):
    """'async' or 'inline', logged. async needs one worker's resources beyond the training workers (and their Ray
    Data streams): without them an evaluation would wait for the training workers, which wait for it at the end."""
    if run.eval_mode == "inline":
        return "inline"
    total = ray.cluster_resources()
    if run.use_gpu:
        spare, need, unit = total.get("GPU", 0) - num_workers, 1, "GPUs"
    else:
        reserved = num_workers * (run.cpus_per_worker + (common.RAY_DATA_CPUS_PER_WORKER if ray_data else 0))
        spare, need, unit = total.get("CPU", 0) - reserved, run.cpus_per_worker, "CPUs"
    spare = max(spare, 0)
    mode = "async" if spare >= need else "inline"
    print(f"--eval-mode {run.eval_mode}: {mode} (evaluations {'off' if mode == 'async' else 'on'} the training "
          f"workers; {spare:g} {unit} spare, {need:g} needed)", flush=True)
    return mode


def stage_parser(config_cls, description):
    """A training stage's command line: the launcher's flags (LaunchConfig) and the stage config's."""
    return config_cls.add_args(common.LaunchConfig.parser(description))


def launch(argv, *, parser, stage, config_cls, worker_fn, output_dir, world_size_error, worker_kwargs=None,
           after=None, evaluate_fn=None):
    """One training stage from the command line (parser: stage_parser's): the storage root, the world sizes that keep
    the global batch, Ray, the resume lookup, the worker group.
    world_size_error(cfg, root, world_size, batch_world_size) -> "" or why that size cannot train cfg's global batch;
    worker_kwargs(launch_cfg, cfg, root, num_workers) -> extra worker arguments (e.g. a Ray Data source);
    after(cfg, final, root) runs once training is done; evaluate_fn (see run_trainer): the stage's evals can run off
    the training workers (--eval-mode). Returns the final metrics."""
    args = parser.parse_args(argv)
    run = common.LaunchConfig.from_args(args)
    root = get_base_dir(run.storage)
    cfg = config_cls.from_args(args).resolved()
    def usable_sizes(lo, hi):
        return check_world_sizes(lo, hi, lambda w: world_size_error(cfg, root, w, lo))
    if run.num_workers:  # a bad size fails here, before Ray starts; the default (all GPUs) needs the cluster
        lo, hi = parse_num_workers(run.num_workers)
        sizes = usable_sizes(lo, hi)
    common.init_ray()
    if not run.num_workers:
        lo = hi = common.default_num_workers(run.use_gpu)
        sizes = usable_sizes(lo, hi)
    ckpt_dir = output_dir(cfg, root)
    storage.makedirs(ckpt_dir)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    if cfg.resume and resume_step is None:
        print(f"--resume: no checkpoint in {ckpt_dir} yet, starting fresh")
    kwargs = worker_kwargs(run, cfg, root, hi) if worker_kwargs else {}
    offload = evaluate_fn is not None and pick_eval_mode(run, hi, ray_data=bool(kwargs)) == "async"
    final = run_trainer(
        worker_fn, cfg, name=f"{stage}-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=(lo, hi), world_sizes=sizes, resize_check_s=run.resize_check_s, use_gpu=run.use_gpu,
        resume_step=resume_step, cpus_per_worker=run.cpus_per_worker, max_failures=run.max_failures,
        worker_kwargs=kwargs, evaluate_fn=evaluate_fn if offload else None)
    if after:
        after(cfg, final, root)
    print(f"{stage} finished: {final}")
    return final
