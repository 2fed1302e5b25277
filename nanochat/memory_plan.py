"""
Memory and FLOPs of a training step planned on a fake CUDA device (nanochat.fake_cuda), and what training stages
make of it at start-up: `--device-batch-size auto` takes the largest device batch whose planned peak fits the GPU.
The dry run (nanochat.dryrun) plans every stage with the same measure().
"""
import random
import traceback
from dataclasses import astuple, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from nanochat import cuda_runtime
from nanochat.common import print0
from nanochat.dataloader import rows_to_device
from nanochat.fake_cuda import MemoryMeter, fake_cuda, ours, where
from nanochat.flags import AUTO
from nanochat.gpt import GPT
from nanochat.schedules import grad_accum_steps
from nanochat.train import LoopState, WorkerContext, supervised_step

MARGIN = 0.10  # of the device's memory kept free by --device-batch-size auto (allocator, NCCL, CUDA context)


class StageFailed(RuntimeError):
    pass


@dataclass
class StagePlan:
    stage: str
    what: str  # the step, in words
    flops: float  # per step on one GPU
    peak_bytes: int  # per GPU
    steps: int = 0  # in the preset (0: set by the data)
    memory: dict = field(default_factory=dict)  # a breakdown, bytes
    syncs: list = field(default_factory=list)  # intended host syncs, "file:line"
    measured_bytes: int = 0  # on a real GPU: the allocator's peak (the plan is peak_bytes)


def cuda_model(config):
    """A GPT of `config` on the (fake or real) CUDA device, initialized as training initializes it."""
    with torch.device("cuda"):  # (fake tensors are made in place: no meta-device round trip)
        model = GPT(config)
    model.init_weights()
    return model


def token_rows(B, T, vocab):
    """B rows of T + 1 token ids, as the packer hands them over (host lists: no device value is read)."""
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(T + 1)] for _ in range(B)]


def tensor_bytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def failure(stage, exc):
    """StageFailed naming the innermost line of our code in the traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if ours(f.filename)]
    at = f" at {where(frames[-1].filename, frames[-1].lineno)} ({frames[-1].line})" if frames else ""
    return StageFailed(f"dry run: stage {stage} failed{at}: {type(exc).__name__}: {exc}")


def measure(stage, gpu, fn):
    """Run fn(meter, flops) -> StagePlan on the fake GPU (or on the real one, gpu.real: then the allocator's peak is
    recorded beside the plan's); counts FLOPs and host syncs, turns errors into StageFailed."""
    device = torch.device("cuda")
    try:
        if gpu.real:
            cuda_runtime.synchronize(device)
            cuda_runtime.reset_peak_memory(device)
            base = cuda_runtime.allocated_memory(device)
        with fake_cuda(gpu) as fake, MemoryMeter() as meter:
            with FlopCounterMode(display=False) as flops:
                plan = fn(meter, flops)
    except StageFailed:
        raise
    except Exception as e:
        raise failure(stage, e) from e
    stray = fake.syncs.unintended()
    if stray:
        raise StageFailed(f"dry run: stage {stage} reads a device value on the host at {stray[0].where} "
                          f"({stray[0].code}): a GPU would stall there (mark a sync that is meant with a "
                          f"'host sync' comment)")
    plan.syncs = sorted({s.where for s in fake.syncs.syncs})
    plan.peak_bytes = plan.peak_bytes or meter.peak
    if gpu.real:
        plan.measured_bytes = cuda_runtime.peak_memory(device) - base
    return plan


def training_step(stage, config, B, T, total_batch, world, steps, gpu, padded=False):
    """Two optimizer steps of supervised_step (the second at steady state, with optimizer state) of 2 micro-batches
    each; FLOPs scaled to the real accumulation. Memory for one of `world` GPUs (optimizer state sharded)."""
    accum = grad_accum_steps(total_batch, B, T, world) if total_batch else 1

    def run(meter, flops):
        model = cuda_model(config)
        optimizer = model.setup_optimizer()
        rows = token_rows(B, T, config.vocab_size)

        def batches():
            while True:
                x, y = rows_to_device(rows, "cuda")
                if padded:  # SFT rows: the tail of each row is padding, masked out of the loss
                    y[:, T // 2:] = -1
                yield x, y, None
        ctx = WorkerContext(device=torch.device("cuda"))
        step_fn = supervised_step(model, optimizer, batches(), grad_accum_steps=2, schedule=lambda s: (1.0, None, None),
                                  ctx=ctx, tokens_per_step=2 * B * T, flops_per_token=model.estimate_flops())
        step_fn(0, LoopState())
        first = flops.get_total_flops()
        model_flops = sum(flops.get_flop_counts().get("GPT", {}).values())
        meter.reset_peak()
        step_fn(1, LoopState())
        params = tensor_bytes(model.parameters())  # (gradients: the same again, in the same dtypes)
        optim = tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        peak = int(meter.peak - optim * (1 - 1 / world))  # ZeRO-2: each of `world` GPUs holds 1/world of the state
        optimizer_flops = first - model_flops
        step_flops = model_flops / 2 * accum + optimizer_flops
        memory = dict(params=params, grads=params, optimizer=int(optim / world),
                      activations=peak - 2 * params - int(optim / world))
        return StagePlan(stage, f"{accum} x {B} x {T} tokens + optimizer", step_flops, peak, steps, memory)
    return measure(stage, gpu, run)


_peaks = {}  # (model config, T, world) -> {rows: planned peak}: a plan does not depend on the GPU's size


def planned_peak(config, T, world, gpu):
    """peak(rows) -> planned bytes per GPU of a training step of `rows` x T tokens, each size planned once (a fake
    step costs the same at any size). Not extrapolated from small sizes: the peak is the largest of several phases'
    (a chunk of the fused loss at a few rows, the backward's activations at many), so it is not linear in the rows."""
    sizes = _peaks.setdefault((astuple(config), T, world), {})

    def peak(rows):
        if rows not in sizes:
            sizes[rows] = training_step("plan", config, rows, T, rows * T * world, world, 0, gpu).peak_bytes
        return sizes[rows]
    return peak


def usable_bytes(gpu):
    """What a training step may plan to use of the GPU: all but MARGIN."""
    return gpu.memory_bytes * (1 - MARGIN)


def largest_fitting(peak, rows_per_worker, gpu):
    """The largest divisor of rows_per_worker (so gradient accumulation keeps the global batch) whose planned peak
    fits the GPU with MARGIN to spare; 0 when not even one row fits."""
    budget = usable_bytes(gpu)
    sizes = [b for b in range(rows_per_worker, 0, -1) if rows_per_worker % b == 0]
    return next((b for b in sizes if peak(b) <= budget), 0)  # largest first: the peak grows with the rows


def resolve_device_batch(B, config, T, total_batch, world_size, device, compiled):
    """The device batch a training stage trains with, B being its --device-batch-size (AUTO or rows). auto: on a
    GPU the largest that fits (largest_fitting), elsewhere the largest divisor up to 32. An explicit size is checked
    against the plan on a GPU: one that cannot fit fails now, before any work (a warning only when the model is
    compiled: the plan is for eager mode, and compiled graphs keep fewer activations)."""
    rows = total_batch // (T * world_size)
    if device.type != "cuda":
        return B or max(b for b in range(1, 33) if rows % b == 0)
    gpu = cuda_runtime.GPUSpec.of(device)
    peak = planned_peak(config, T, world_size, gpu)
    best = largest_fitting(peak, rows, gpu)
    usable = f"{usable_bytes(gpu) / 1e9:.1f} GB usable on {gpu.name}"
    if B == AUTO:
        if not best:
            raise ValueError(f"--device-batch-size auto: not even one row of {T} tokens fits "
                             f"({peak(1) / 1e9:.1f} GB planned, {usable})")
        print0(f"--device-batch-size auto: {best} rows per worker ({peak(best) / 1e9:.1f} GB planned, {usable})")
        return best
    if peak(B) > usable_bytes(gpu):
        fitting = f"{best} rows fit" if best else "not even one row fits"
        problem = f"--device-batch-size {B} plans a peak of {peak(B) / 1e9:.1f} GB per GPU ({usable}); {fitting}"
        if not compiled:
            raise ValueError(problem)
        print0(f"warning: {problem} (planned for eager mode; the compiled model usually needs less)")
    return B
