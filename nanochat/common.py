"""Shared utilities: device and dtype, base dir, rank info and rank-0 printing, peak FLOPs, logging."""
import logging
import os
import time

import torch
import torch.distributed as dist

from nanochat import cuda_runtime, storage

logger = logging.getLogger("nanochat")


def setup_default_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -----------------------------------------------------------------------------
# Rank / world

def get_dist_info():
    """(ddp, rank, local_rank, world_size). Prefers an initialized process group, else torchrun-style env vars."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_distributed():
    """True when collectives must actually run (an initialized process group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs):
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Device and dtype

def autodetect_device_type():
    if cuda_runtime.cuda_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def get_compute_dtype(device_type=None):
    """bf16 on CUDA with compute capability >= 8 (Ampere+), fp32 elsewhere; NANOCHAT_DTYPE overrides."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[override]
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and cuda_runtime.capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def compute_init(device_type=None, seed=42):
    """Seed, enable TF32, and pick the device for this rank. The process group (if any) is created by the launcher
    (Ray Train, torchrun, or a test) -- here we only init it ourselves for torchrun on CUDA."""
    device_type = device_type or autodetect_device_type()
    ddp, rank, local_rank, world = get_dist_info()
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type)
    cuda_runtime.manual_seed(seed, device)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cuda_runtime.set_device(device)
        if ddp and not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    return ddp, rank, local_rank, world, device


# -----------------------------------------------------------------------------
# Paths

def get_base_dir(root=None):
    """The storage root of all artifacts: `root` (a --storage flag) when given, else the user's default,
    $NANOCHAT_BASE_DIR or ~/.cache/nanochat. Entry points call this once and pass the result down (configs,
    arguments, worker contexts), never through the environment. A local root comes back absolute (workers run in
    other directories) and created; a URI root (s3://, gs://, ...) as given, checked to be usable (nanochat.storage:
    a missing filesystem package fails here, naming the extra to install)."""
    root = root or os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    if not storage.is_uri(root):
        root = storage.local_path(root)
    storage.check_root(root)
    storage.makedirs(root)
    return root


# -----------------------------------------------------------------------------
# Peak FLOPs for MFU

# bf16 dense peak FLOP/s by (lower-cased) device-name substring; first match wins, so specific names go first.
_PEAK_FLOPS = [
    ("gh200", 989e12), ("h200", 989e12), ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800", 989e12), ("b200", 2.25e15), ("b100", 1.75e15), ("a100", 312e12), ("a800", 312e12),
    ("l40s", 362e12), ("l4", 121e12), ("a10g", 70e12), ("a10", 125e12), ("rtx 4090", 165e12),
    ("rtx 3090", 71e12), ("v100", 125e12), ("t4", 65e12),
]


def get_peak_flops(device_name):
    """Peak dense FLOP/s of a named accelerator; unknown names give inf (so MFU reads 0 rather than lying)."""
    name = device_name.lower()
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return float("inf")


def measure_matmul_peak_flops(device="cpu", dtype=torch.float32, n=1024, iters=10):
    """Measured square-matmul FLOP/s on this device: the honest MFU denominator for CPUs, which have no spec table."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    cuda_runtime.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    cuda_runtime.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def device_peak_flops(device):
    """Peak FLOP/s for MFU: the spec table on CUDA, a measured matmul peak on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return get_peak_flops(cuda_runtime.device_name(device))
    return measure_matmul_peak_flops(device)


class DummyWandb:
    """Stand-in for wandb when logging is off (non-zero ranks, or --run dummy)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name, project, config, rank=0):
    """A wandb run on rank 0 when run_name is set (not 'dummy'), else a no-op logger."""
    if rank != 0 or not run_name or run_name == "dummy":
        return DummyWandb()
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"--run {run_name} asks for wandb logging, but wandb is not installed: pip install wandb "
                          f"(or leave --run at 'dummy')") from e
    return wandb.init(project=project, name=run_name, config=config)
