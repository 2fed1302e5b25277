"""Shared fixtures: a tiny trained tokenizer, small models, and the session's Ray instance."""
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core box (Ray workers of other tests, other
# jobs) oversubscribed threads make them tens of times slower.
torch.set_num_threads(1)

TOY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! Hello there, how are you doing today? I am doing well, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 34))\n",
    "In 2024 the temperature was 21.5 degrees; in 2025 it rose to 23.75 degrees.",
    "What is 12*3? Let me compute 12*3 = 36. The answer is 36.",
    "the theory of the thing is that there is nothing other than the other thing",
] * 20

TINY_VOCAB = 256 + 9 + 55  # 320: a multiple of 64, so no vocab padding


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(TOY_CORPUS), TINY_VOCAB)


def perturbed(model, scale=0.05, seed=0):
    """Zero-initialised projections make a fresh model nearly trivial; add noise so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


# -----------------------------------------------------------------------------
# Ray: one local instance shared by the whole session (started on first use, shut down at the end).
# Tests that need a simulated multi-node cluster use `ray_cluster`, which shuts the shared instance down first;
# the next `ray_local` user starts it again.

REPO_ROOT = str(Path(__file__).resolve().parents[1])
# workers import the package and, for objects defined in test modules (e.g. batch sources), the tests themselves
WORKER_PYTHONPATH = os.pathsep.join([REPO_ROOT, str(Path(__file__).resolve().parent)])
RAY_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # reports are drained every 2 s by default (RAY.md P2)
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_DEDUP_LOGS": "0",
}


def reference_rms(x):
    """Parameter-free RMSNorm, written out (for the independent reference forwards in the tests)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def reference_rope(T, D, base=10000):
    """Rotary embedding over (B, T, H, D) tensors, split halves, rotation by -theta, written out."""
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(x):
        a, b = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)
    return rope


def _ray_init(**kwargs):
    import ray
    os.environ.update(RAY_TEST_ENV)
    # address="local": always our own instance, never a cluster someone else started on this machine
    ray.init(address="local", include_dashboard=False, object_store_memory=512 * 2**20, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": WORKER_PYTHONPATH, **RAY_TEST_ENV}}, **kwargs)
    return ray


@pytest.fixture(scope="session")
def _ray_session_guard():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session_guard):
    """A local Ray with 8 logical CPUs (oversubscribed on purpose: trainers and Ray Data must not starve, RAY.md P1)."""
    import ray
    if not ray.is_initialized():
        _ray_init(num_cpus=8)
    return ray


@pytest.fixture
def ray_cluster(_ray_session_guard):
    """A fresh simulated multi-node cluster: head with 0 CPUs; tests add nodes with cluster.add_node(num_cpus=...)."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(RAY_TEST_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": WORKER_PYTHONPATH, **RAY_TEST_ENV}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()
