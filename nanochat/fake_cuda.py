"""
A fake CUDA device on any machine: tensors placed on "cuda" that have shapes, dtypes and a device but no memory
(torch's FakeTensorMode), so the real code of a stage runs at real sizes in seconds on a CPU, taking every
`device.type == "cuda"` branch. Three instruments ride along:

- host syncs: reading a device value on the host (.item(), .tolist(), bool()) is recorded with its source line and
  answered with a placeholder 1; a line that syncs on purpose says so in a comment ("host sync"), any other is a bug
  (a GPU would stall there). Matrix products of mixed dtypes are refused, as CUDA's kernels refuse them.
- MemoryMeter: the bytes of every live tensor storage and their peak, the memory plan's measure.
- flop counts come from torch.utils.flop_counter, which works on fake tensors as is.

On a CPU-only torch build, nanochat.cuda_stub must have been imported before torch (see there).
"""
import linecache
import os
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat import cuda_runtime, cuda_stub

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNC_MARK = "host sync"  # the comment that marks an intended sync on its line
LIBRARY_ROOTS = tuple({os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(torch.__file__))})


@dataclass
class HostSync:
    where: str  # file:line in this repository
    code: str  # that line's source
    intended: bool  # the line (or a comment right above it) carries the "host sync" mark


def ours(path):
    """Whether a frame's file is code of this program (not torch's, a library's, Python's or this module's)."""
    return not (path.startswith(LIBRARY_ROOTS) or os.path.abspath(path) == os.path.abspath(__file__))


def where(path, lineno):
    return f"{os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) else path}:{lineno}"


def caller_in_repo():
    """(file:line, source, intended) of the innermost frame of our code; intended: that line, or a comment line
    right above it, says "host sync"."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if ours(path):
            line, above = (linecache.getline(path, n).strip() for n in (frame.f_lineno, frame.f_lineno - 1))
            intended = SYNC_MARK in line or above.startswith("#") and SYNC_MARK in above
            return where(path, frame.f_lineno), line, intended
        frame = frame.f_back
    return "<unknown>", "", False


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_efficient_attention.default}


class HostSyncs(TorchDispatchMode):
    """Records every read of a device value on the host; on fake tensors (which have no value) answers it with 1,
    on real ones with the value. Also refuses matrix products of mixed dtypes, which fake tensors let through."""

    def __init__(self, fake=True):
        super().__init__()
        self.fake, self.syncs = fake, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            dtypes = {t.dtype for t in args if isinstance(t, torch.Tensor)}
            if len(dtypes) > 1:  # fake tensors' shape functions allow it; CUDA's kernels refuse it
                raise RuntimeError(f"{func} of mixed dtypes {sorted(map(str, dtypes))}")
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(HostSync(*caller_in_repo()))
            if self.fake:
                t = args[0]
                return True if t.dtype == torch.bool else 1.0 if t.dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))

    def unintended(self):
        return [s for s in self.syncs if not s.intended]


class MemoryMeter(TorchDispatchMode):
    """Live bytes of tensor storages, by device, and the peak of their sum: every storage an op makes inside this
    mode, plus those handed to track() (the model, the optimizer state). A storage counts once however many views
    share it, and stops counting when the last one dies."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {}

    def track(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def track_module(self, module, optimizer=None):
        self.track(*module.parameters(), *module.buffers())
        self.track(*(p.grad for p in module.parameters() if p.grad is not None))
        if optimizer is not None:
            self.track(*(v for state in optimizer.state.values() for v in state.values()))

    def reset_peak(self):
        self.peak = self.live

    def _add(self, t):
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
        self.live += n
        self.peak = max(self.peak, self.live)

    def _free(self, key, n):
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


@dataclass
class FakeCuda:
    """What `fake_cuda()` yields: the GPU pretended and the host syncs seen."""
    gpu: cuda_runtime.GPUSpec
    syncs: HostSyncs = field(default_factory=HostSyncs)


@contextmanager
def fake_cuda(gpu=None):
    """Inside: tensors on "cuda" are fake, the runtime helpers (nanochat.cuda_runtime) answer for `gpu`, and host
    syncs are recorded. Real tensors made before may be used (they are converted on first use). A gpu with
    real=True is the real device: only the syncs are recorded (nothing is faked)."""
    if gpu is not None and gpu.real:
        with HostSyncs(fake=False) as syncs:
            yield FakeCuda(gpu, syncs)
        return
    if not torch.backends.cuda.is_built() and not cuda_stub.installed:
        raise RuntimeError("a fake CUDA device on this CPU-only torch needs nanochat.cuda_stub imported before torch")
    fake = FakeCuda(gpu or cuda_runtime.GPUSpec())
    with cuda_runtime.pretend(fake.gpu), FakeTensorMode(allow_non_fake_inputs=True), fake.syncs:
        yield fake
