"""Shared fixtures: a tiny trained tokenizer, small models, the session's Ray instance and a local S3 server."""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
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


# Fixtures that start Ray (or need a Ray-started app): tests using them are marked `ray`, so `make test-fast`
# (-m "not ray") runs the rest, the Ray-free unit tests, in a couple of minutes.
RAY_FIXTURES = {"_ray_session_guard", "ray_cluster", "ray_head", "url"}


def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in RAY_MODULES:
            item.add_marker(pytest.mark.ray)
    # `make test` hands whole files to two workers in collection order: the longest files go first, so neither
    # worker is left running one of them alone at the end
    items.sort(key=lambda item: LONGEST_MODULES.index(item.module.__name__)
               if item.module.__name__ in LONGEST_MODULES else len(LONGEST_MODULES))


RAY_MODULES = {"test_speedrun", "test_web_ui"}  # drive Ray or a browser through subprocesses
# the test files over ~100 s each on this box, longest first (pytest --durations)
LONGEST_MODULES = ["test_speedrun", "test_elastic", "test_base_train", "test_chat_rl", "test_serve"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(TOY_CORPUS), TINY_VOCAB)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module of tiny models (as in the 1-CPU actors): they gain nothing from intra-op
    threads, and on a shared box OpenMP's spin-waiting makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # reports are drained every 2 s by default
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
    """A local Ray with 8 logical CPUs (oversubscribed on purpose: trainers and Ray Data must not starve)."""
    return local_ray()


def local_ray():
    """The session's local Ray (8 logical CPUs), started if it is not running; for fixtures of any scope that
    depend on _ray_session_guard."""
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


# -----------------------------------------------------------------------------
# A local S3 server (moto's standalone server) for storage roots like s3://bucket/run. Its endpoint and dummy
# credentials are in the environment from the start, so every Ray process of the session (workers inherit the
# environment of the Ray that the first test starts) talks to it; the server itself starts on first use.

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (test modules also import this file as a plain module: the port is chosen once per process, not per import)
_S3_PORT = os.environ.setdefault("NANOCHAT_TEST_S3_PORT", str(_free_port()))
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server this session owns (ended by its pid)."""
    import requests
    url = S3_ENV["AWS_ENDPOINT_URL"]
    port = url.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, "moto server exited"
        try:
            requests.get(url + "/moto-api/", timeout=2)
            break
        except requests.ConnectionError:
            assert time.time() < deadline, "moto server did not come up in 60 s"
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def s3_root(s3_server):
    """s3://<a fresh bucket>/run on the local S3 server."""
    import fsspec
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/run"
