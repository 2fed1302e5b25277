"""
The CUDA runtime calls the code makes, as opposed to tensor ops: synchronize, memory stats, device name and
capability, pinned host memory, seeding. They live here, in one place, because a dry run (nanochat.dryrun) runs every
stage on a fake CUDA device, which has tensors but no runtime: while one is active these helpers answer for the fake
GPU, so everything around them runs exactly as it would on the real one.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GPUSpec:
    """The GPU a dry run pretends to have (an H100 SXM by default), or with real=True the one it runs on."""
    name: str = "NVIDIA H100 80GB HBM3"
    memory_bytes: int = 80 * 10**9
    capability: tuple = (9, 0)
    real: bool = False

    @classmethod
    def of(cls, device, real=False):
        """The spec of a CUDA device (of a dry run's GPU while one is pretended)."""
        return cls(device_name(device), total_memory(device), capability(device), real)


_fake_gpu = None  # a GPUSpec while a dry run is active


@contextmanager
def pretend(gpu):
    """Answer the runtime calls below for `gpu` (nanochat.fake_cuda enters this with its fake tensor mode)."""
    global _fake_gpu
    previous, _fake_gpu = _fake_gpu, gpu
    try:
        yield gpu
    finally:
        _fake_gpu = previous


def faked():
    """The GPUSpec of the active dry run, or None on real hardware."""
    return _fake_gpu


def is_cuda(device):
    return torch.device(device).type == "cuda"


def cuda_available():
    return _fake_gpu is not None or torch.cuda.is_available()


def _real_cuda(device):
    return is_cuda(device) and _fake_gpu is None


def synchronize(device):
    if _real_cuda(device):
        torch.cuda.synchronize(device)


def device_name(device):
    if not is_cuda(device):
        return torch.device(device).type
    return _fake_gpu.name if _fake_gpu else torch.cuda.get_device_name(device)


def capability(device=None):
    """CUDA compute capability (major, minor)."""
    return _fake_gpu.capability if _fake_gpu else torch.cuda.get_device_capability(device)


def total_memory(device):
    """Bytes of memory on a CUDA device."""
    return _fake_gpu.memory_bytes if _fake_gpu else torch.cuda.get_device_properties(device).total_memory


def free_memory(device):
    """Bytes free on a CUDA device now (a fake one is empty: its tensors take no memory)."""
    return _fake_gpu.memory_bytes if _fake_gpu else torch.cuda.mem_get_info(device)[0]


def reset_peak_memory(device):
    if _real_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def allocated_memory(device):
    """Bytes allocated on a CUDA device now (0 elsewhere)."""
    return torch.cuda.memory_allocated(device) if _real_cuda(device) else 0


def peak_memory(device):
    """Peak bytes allocated on a CUDA device since the last reset (0 elsewhere)."""
    return torch.cuda.max_memory_allocated(device) if _real_cuda(device) else 0


def pin_memory(device):
    """Whether host buffers headed for `device` go in pinned memory (so the copy to a GPU is asynchronous)."""
    return _real_cuda(device)


def attention(q, k, v, mask=None, is_causal=False, enable_gqa=False):
    """F.scaled_dot_product_attention. A GPU runs it as a fused kernel that keeps no T x T scores; fake tensors would
    take the math decomposition instead (and plan for the scores), so a dry run calls the fused memory-efficient
    kernel by name: the output, log-sum-exp and the FLOPs a GPU has."""
    if _fake_gpu is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)
    if enable_gqa:
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    bias = None
    if mask is not None:  # a boolean mask becomes an additive bias, as SDPA does for this kernel
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.size(0), q.size(1), q.size(2), k.size(2))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad, 0.0, is_causal)[0]


def set_device(device):
    if _real_cuda(device):
        torch.cuda.set_device(device)


def manual_seed(seed, device):
    torch.manual_seed(seed)
    if _real_cuda(device):
        torch.cuda.manual_seed(seed)
