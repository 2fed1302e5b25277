"""The core library stays Ray-agnostic: importing every nanochat module loads no Ray (a fresh interpreter, so
nothing the test session imported counts)."""
import subprocess
import sys

from conftest import REPO_ROOT

CHECK = """
import pkgutil, importlib, sys
import nanochat
names = sorted(m.name for m in pkgutil.iter_modules(nanochat.__path__, "nanochat."))
for name in names:
    importlib.import_module(name)
print(len(names), [m for m in sys.modules if m == "ray" or m.startswith("ray.")][:5])
"""


def test_no_nanochat_module_imports_ray():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, ray_modules = out.stdout.strip().split(" ", 1)
    assert int(count) >= 15 and ray_modules == "[]", out.stdout
