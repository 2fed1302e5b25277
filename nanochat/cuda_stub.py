"""
A stand-in CUDA runtime for CPU-only torch builds, so a dry run (nanochat.dryrun) can put fake tensors on "cuda".

A CPU-only torch has no CUDA device guard and reports no CUDA hooks, so copies, in-place random fills and the
autograd engine refuse a "cuda" tensor even when it is fake. install() builds (once, with the system C++ compiler;
a few seconds) and loads a small library that registers c10's no-op FakeGuardImpl as the CUDA guard and hooks that
say CUDA is built. torch reads its hooks once, when first asked, so this must run before torch is imported: import
this module first. It imports no torch itself. A CUDA build of torch has the real ones and is left alone.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
struct CUDAHooks : at::CUDAHooksInterface {  // the registry key must be "CUDAHooks"
  explicit CUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  // random ops on fake tensors draw nothing: any generator will do
  at::Generator getNewGenerator(c10::DeviceIndex) const override { return at::make_generator<at::CPUGeneratorImpl>(); }
};
}  // namespace
namespace at { REGISTER_CUDA_HOOKS(CUDAHooks); }
"""
installed = False


def torch_dir():
    return list(importlib.util.find_spec("torch").submodule_search_locations)[0]


def needed():
    """True on a CPU-only torch build (a CUDA build ships libtorch_cuda)."""
    return not os.path.exists(os.path.join(torch_dir(), "lib", "libtorch_cuda.so"))


def library_path():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    version = importlib.metadata.version("torch")
    return os.path.join(cache, "nanochat", f"cuda_stub-torch{version}-py{sys.version_info[0]}{sys.version_info[1]}.so")


def build(path):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("the dry run's fake CUDA device needs a C++ compiler (g++) on a CPU-only torch build "
                           "(or use a CUDA build of torch, which needs no GPU for this)")
    tdir = torch_dir()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, "cuda_stub.cpp"), os.path.join(tmp, "cuda_stub.so")
        with open(source, "w") as f:
            f.write(SOURCE)
        cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-I", os.path.join(tdir, "include"), source,
               "-L", os.path.join(tdir, "lib"), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{os.path.join(tdir, 'lib')}",
               "-o", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the fake CUDA runtime failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
        os.replace(out, path)  # atomic: a concurrent build never loads half a file


def install():
    """Load the stand-in (building it first if needed). Must run before torch is imported on a CPU-only build."""
    global installed
    if installed or not needed():
        return
    if "torch" in sys.modules:
        raise RuntimeError("nanochat.cuda_stub must be imported before torch (torch reads its CUDA hooks once)")
    path = library_path()
    if not os.path.exists(path):
        build(path)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # its static initializers register the guard and the hooks
    installed = True


if "torch" not in sys.modules:  # imported first, as it must be: install now
    install()
