"""
Shared glue for the Ray entry points: connecting to (or starting) Ray, the launchers' flags.

Every job connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`) and starts a local
Ray otherwise. The storage root (--storage, else $NANOCHAT_BASE_DIR, else ~/.cache/nanochat: nanochat.common.
get_base_dir) is resolved once by the entry point and handed to every worker as an argument (the train loop's
config, an actor's constructor), so a worker uses the run's root whatever its own node's environment says.
"""
import logging
import os
from dataclasses import dataclass

from nanochat.flags import ArgsMixin, flag, storage_flag

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# environment that every worker must see as the driver does: run settings, and the object store's endpoint and
# credentials when they come from the environment (as with an S3-compatible store). The storage root and the task
# files are not among them: they travel as arguments.
PROPAGATED_ENV = ("NANOCHAT_DTYPE", "NANOCHAT_DATA_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                  "GOOGLE_APPLICATION_CREDENTIALS")


# logical CPUs one worker's Ray Data stream reserves (tokenizer / render actors and read tasks, fractional)
RAY_DATA_CPUS_PER_WORKER = 1.5


@dataclass
class LaunchConfig(ArgsMixin):
    """Flags every Ray Train stage launcher shares (the stage's own config adds the rest)."""
    storage: str | None = storage_flag()
    num_workers: str | None = flag(None, "Ray Train workers: N, or MIN-MAX for an elastic group that goes on at a "
                                         "smaller size after losing a node and grows when room appears (default: "
                                         "all GPUs, or 1 on CPU)", metavar="N|MIN-MAX")
    resize_check_s: float = flag(60.0, "seconds between an elastic group's checks for room to grow")
    use_gpu: bool = flag(False, "one GPU per worker (nccl, bf16)")
    cpus_per_worker: int = flag(1, "CPUs reserved per training worker")
    max_failures: int = flag(3, "worker-group restarts after failures before giving up (preemptions do not count)")
    loader: str = flag("auto", "ray: tokenize (render) the training data in a Ray Data actor pool per worker; plain: "
                               "in the training process; auto: ray when the cluster has CPUs to spare for it",
                       choices=["auto", "plain", "ray"])
    data_actors: int = flag(2, "Ray Data actors per worker with --loader ray")
    eval_mode: str = flag("auto", "base training's periodic evals (val bpb, CORE): async runs them on their step's "
                                  "checkpoint in a Ray task beside training; inline on the training workers; auto: "
                                  "async when the cluster has a worker's resources to spare",
                          choices=["auto", "async", "inline"])


def pick_loader(loader, num_workers, cpus_per_worker):
    """'ray' or 'plain'. auto: Ray Data when the cluster has CPUs beyond what the training workers reserve (Ray Data
    next to trainers that took every CPU would starve, and hang)."""
    if loader != "auto":
        return loader
    import ray
    total = ray.cluster_resources().get("CPU", 0)
    spare = total - num_workers * cpus_per_worker
    choice = "ray" if spare >= RAY_DATA_CPUS_PER_WORKER * num_workers else "plain"
    print(f"--loader auto: {choice} ({total:g} CPUs in the cluster, {num_workers} x {cpus_per_worker} reserved by "
          f"training workers, {spare:g} spare; Ray Data wants {RAY_DATA_CPUS_PER_WORKER:g} per worker)", flush=True)
    return choice


def init_ray(num_cpus=None, **kwargs):
    """Connect to the cluster named by RAY_ADDRESS, or start a local one. Idempotent."""
    import ray
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # otherwise every worker print appears twice
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    for key in PROPAGATED_ENV:
        if key in os.environ:
            env_vars[key] = os.environ[key]
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": "ray_jobs.common.quiet_ray_workers"},
                 logging_level=logging.WARNING, **kwargs)
    else:
        # address="local": a fresh Ray of our own, never some other cluster that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING, include_dashboard=False,
                 runtime_env={"env_vars": env_vars,
                              "worker_process_setup_hook": "ray_jobs.common.quiet_local_ray_workers"}, **kwargs)
    return ray


def quiet_ray_workers():
    """Set up each Ray worker process: Ray Train's per-report INFO line ("Reporting training result N: ...", under a
    logger named by its file, which Ray Train's LoggingConfig does not reach) repeats what the stage logs."""
    import ray
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def quiet_local_ray_workers():
    """quiet_ray_workers, and: a local Ray has no autoscaler, yet Ray Train's controller sends it resource requests;
    on a busy box one times out and logs a warning with a traceback that says nothing about the run."""
    quiet_ray_workers()
    # a filter, not a level: Ray Train's logging setup resets the levels of the ray.train loggers after this runs
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").addFilter(
        lambda record: record.levelno >= logging.ERROR)


def cluster_gpus():
    import ray
    return int(ray.cluster_resources().get("GPU", 0))


def default_num_workers(use_gpu):
    """Without --num-workers: one worker per GPU in the cluster, else 1."""
    return max(cluster_gpus(), 1) if use_gpu else 1
