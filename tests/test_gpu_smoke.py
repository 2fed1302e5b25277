"""bench/gpu_smoke.sh, as far as a CPU box goes: it refuses clearly without a GPU (the whole run on CPU,
SMOKE_DEVICE=cpu, takes a few minutes and is checked by hand: see the README)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_smoke.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "SMOKE_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert "gpu_smoke: no CUDA GPU here" in done.stderr and "SMOKE_DEVICE=cpu" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing ran
