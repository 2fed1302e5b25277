"""
Shared glue for the Ray entry points: connecting to (or starting) Ray, the storage root, common flags.

Every job connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`) and starts a local
Ray otherwise. The storage root (--storage, else $NANOCHAT_BASE_DIR, else ~/.cache/nanochat) is exported as
NANOCHAT_BASE_DIR to every worker, so nanochat code on any node resolves the same paths.
"""
import logging
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_common_args(parser):
    parser.add_argument("--storage", default=None,
                        help="storage root (local path, NFS mount, or s3:// / gs:// URI); "
                             "default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray workers (default: all GPUs, or 1 on CPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl, bf16)")
    return parser


def storage_root(storage=None):
    """Resolve the storage root and export it so every process (driver and workers) sees the same one."""
    from nanochat.common import get_base_dir
    if storage:
        os.environ["NANOCHAT_BASE_DIR"] = storage if "://" in storage else os.path.abspath(storage)
    return get_base_dir() if not storage or "://" not in storage else storage


def init_ray(num_cpus=None, **kwargs):
    """Connect to the cluster named by RAY_ADDRESS, or start a local one. Idempotent."""
    import ray
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # otherwise every worker print appears twice
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_DTYPE", "NANOCHAT_TASK_DATA"):
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
