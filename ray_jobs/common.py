"""
Shared glue for the Ray entry points: connecting to (or starting) Ray, the storage root, common flags.

Every job connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`) and starts a local
Ray otherwise. The storage root (--storage, else $NANOCHAT_BASE_DIR, else ~/.cache/nanochat) is exported as
NANOCHAT_BASE_DIR to every worker, so nanochat code on any node resolves the same paths.
"""
import logging
import os

from nanochat.common import get_base_dir
from nanochat.storage import is_uri

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# environment that every worker must see as the driver does: the storage root and run settings, and the object
# store's endpoint and credentials when they come from the environment (as with an S3-compatible store)
PROPAGATED_ENV = ("NANOCHAT_BASE_DIR", "NANOCHAT_DTYPE", "NANOCHAT_TASK_DATA", "NANOCHAT_DATA_URL",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS")


def add_storage_arg(parser):
    parser.add_argument("--storage", default=None,
                        help="storage root (local path, NFS mount, or s3:// / gs:// URI); "
                             "default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    return parser


def add_common_args(parser):
    add_storage_arg(parser)
    parser.add_argument("--num-workers", type=int, default=None, help="Ray workers (default: all GPUs, or 1 on CPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl, bf16)")
    return parser


def storage_root(storage=None):
    """Resolve the storage root and export it so every process (driver and workers) sees the same one. A URI root
    whose filesystem package is missing fails here, naming the extra to install."""
    if storage:
        os.environ["NANOCHAT_BASE_DIR"] = storage if is_uri(storage) else os.path.abspath(storage)
    return get_base_dir()


# logical CPUs one worker's Ray Data stream reserves (tokenizer / render actors and read tasks, fractional)
RAY_DATA_CPUS_PER_WORKER = 1.5


def add_train_args(parser):
    """Flags every Ray Train stage launcher shares."""
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs reserved per training worker")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    parser.add_argument("--loader", choices=["auto", "plain", "ray"], default="auto",
                        help="ray: tokenize (render) the training data in a Ray Data actor pool per worker; plain: "
                             "in the training process; auto: ray when the cluster has CPUs to spare for it")
    parser.add_argument("--data-actors", type=int, default=2, help="Ray Data actors per worker with --loader ray")
    return parser


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
        ray.init(runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING, **kwargs)
    else:
        # address="local": a fresh Ray of our own, never some other cluster that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars},
                 logging_level=logging.WARNING, include_dashboard=False, **kwargs)
    return ray


def cluster_gpus():
    import ray
    return int(ray.cluster_resources().get("GPU", 0))


def default_num_workers(num_workers, use_gpu):
    """Explicit flag, else one worker per GPU in the cluster, else 1."""
    if num_workers:
        return num_workers
    return max(cluster_gpus(), 1) if use_gpu else 1
