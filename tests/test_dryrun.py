"""The dry run on a fake CUDA device (nanochat.dryrun, nanochat.fake_cuda, nanochat.cuda_stub). Each check runs in a
fresh interpreter, as the CLI does: the stand-in CUDA runtime must load before torch."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Several checks in one interpreter (torch imported once): prints one JSON object.
PROBE = r"""
from nanochat import cuda_stub  # noqa: F401 (before torch)
import json
import torch
from nanochat import cuda_runtime, dryrun, memory_plan
from nanochat.base_train import BaseTrainConfig, batch_hyperparameters, model_config
from nanochat.common import get_peak_flops
from nanochat.gpt import GPT

out = {}
gpu = dryrun.GPUS["h100"]
# d20's stages at depth 2 and 256 tokens (the dry run's time goes with the number of ops, not their sizes)
dryrun.PRESETS["probe"] = {"base_train": {"depth": 2, "max-seq-len": 256}, "mid_train": {"max-seq-len": 256},
                           "chat_sft": {"max-seq-len": 256}, "chat_rl": {"num-samples": 4, "device-batch-size": 4}}
plans, info = dryrun.plan_preset("probe", device_batch_size="4", gpu=gpu, world=8, log=lambda *a: None)
out["plans"] = [dict(stage=p.stage, flops=p.flops, peak=p.peak_bytes, steps=p.steps, syncs=p.syncs,
                     memory=p.memory) for p in plans]
out["info"] = {k: v for k, v in info.items() if k != "model"}
out["report"] = dryrun.report(plans, info, gpu, get_peak_flops(gpu.name), 8, 0.4)
cfg = BaseTrainConfig(depth=2, max_seq_len=256)
config = model_config(cfg, 32768)
with torch.device("meta"):
    out["flops_per_token"] = GPT(config).estimate_flops()
total = batch_hyperparameters(cfg, 32768, 8)["total_batch_size"]
auto = {}
peak = memory_plan.planned_peak(config, cfg.max_seq_len, 8, gpu)
rows = total // (cfg.max_seq_len * 8)
for gb in (0.05, 2, 8):
    best = memory_plan.largest_fitting(peak, rows, cuda_runtime.GPUSpec("test", int(gb * 1e9)))
    auto[str(gb)] = dict(batch=best, fits={b: peak(b) <= gb * 1e9 * 0.9 for b in range(1, rows + 1) if rows % b == 0})
out["auto"] = auto

# base training's start-up on a (pretended) 0.5 GB GPU: auto, an explicit size that does not fit (eager, compiled)
T, small = cfg.max_seq_len, cuda_runtime.GPUSpec("test", int(0.5e9))
too_big = min(b for b in range(1, rows + 1) if rows % b == 0 and peak(b) > 0.45e9)
resolve = {"cpu_auto": memory_plan.resolve_device_batch(0, config, T, total, 8, torch.device("cpu"), False),
           "fitting": memory_plan.largest_fitting(peak, rows, small), "too_big": too_big}
with cuda_runtime.pretend(small):
    cuda = torch.device("cuda")
    resolve["gpu_auto"] = memory_plan.resolve_device_batch(0, config, T, total, 8, cuda, False)
    try:
        resolve["gpu_too_big"] = memory_plan.resolve_device_batch(too_big, config, T, total, 8, cuda, False)
    except ValueError as e:
        resolve["gpu_too_big"] = str(e)
    resolve["gpu_too_big_compiled"] = memory_plan.resolve_device_batch(too_big, config, T, total, 8, cuda, True)
# auto's choice fits a plan of the step at that size made afresh (not from the planner's cache)
resolve["auto_replanned"] = memory_plan.training_step("check", config, resolve["gpu_auto"], T,
                                                      resolve["gpu_auto"] * T * 8, 8, 0, small).peak_bytes
out["resolve"] = resolve


def stray_sync(meter, flops):
    x = torch.ones(4, device="cuda")
    if x.sum().item() > 0:
        pass
    return memory_plan.StagePlan("probe", "", 0, 0)


def wrong_device(meter, flops):
    host = torch.ones(4, device="cpu")
    return host + torch.ones(4, device="cuda")


def mixed_dtypes(meter, flops):
    a = torch.ones(4, 4, device="cuda", dtype=torch.bfloat16)
    return a @ torch.ones(4, 4, device="cuda")


def marked_sync(meter, flops):
    x = torch.ones(4, device="cuda")
    x.sum().item()  # host sync: on purpose
    return memory_plan.StagePlan("probe", "", 0, 0)


for name, fn in [("stray_sync", stray_sync), ("wrong_device", wrong_device), ("mixed_dtypes", mixed_dtypes),
                 ("marked_sync", marked_sync)]:
    try:
        out[name] = {"syncs": memory_plan.measure("probe", gpu, fn).syncs}
    except memory_plan.StageFailed as e:
        out[name] = {"error": str(e)}
print(json.dumps(out))
"""

# The memory accounting on real CPU tensors against the process's measured peak resident memory. Large allocations
# go straight to mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set, as on a GPU allocator.
MEASURE = r"""
import json
import torch
from nanochat.fake_cuda import MemoryMeter
from nanochat.gpt import GPTConfig, build_model
from nanochat.train import LoopState, WorkerContext, supervised_step

torch.manual_seed(0)
B, T, V = 4, 512, 32768


def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


batches = iter([(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T)), None) for _ in range(4)])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size restarts from now
before = rss("VmRSS")
model = build_model(GPTConfig.from_depth(2, sequence_len=T, vocab_size=V, window_pattern="L"))
optimizer = model.setup_optimizer()
meter = MemoryMeter()
with meter:
    meter.track_module(model, optimizer)
    step = supervised_step(model, optimizer, batches, grad_accum_steps=2, schedule=lambda s: (1.0, None, None),
                           ctx=WorkerContext(), tokens_per_step=2 * B * T, flops_per_token=1)
    step(0, LoopState())
    step(1, LoopState())
print(json.dumps({"planned": meter.peak, "measured": rss("VmHWM") - before}))
"""


def run_python(path, code, env=None, timeout=600):
    """Run `code` as the script `path` (a file, so failures can name its lines); -> its last line as JSON."""
    path.write_text(code)
    done = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return run_python(tmp_path_factory.mktemp("dryrun") / "probe.py", PROBE)


def test_every_stage_runs_one_real_step_on_the_fake_gpu(probe):
    plans = {p["stage"]: p for p in probe["plans"]}
    assert set(plans) == {"base_train", "mid_train", "chat_sft", "chat_rl", "engine", "serve", "base_eval (bpb)",
                          "core_eval"}
    assert all(p["flops"] > 0 and p["peak"] > 0 for p in plans.values())
    base = plans["base_train"]
    assert base["steps"] == probe["info"]["num_iterations"] > 0
    # the counted FLOPs of a step agree with the model's own estimate per token (within the optimizer's share and the
    # attention counted at full length)
    tokens = probe["info"]["total_batch_size"] / 8
    assert 0.9 < base["flops"] / (probe["flops_per_token"] * tokens) < 1.5
    # params, gradients, 1/8 of the optimizer state and activations make up the peak
    assert sum(base["memory"].values()) == base["peak"]
    # the intended host syncs are the ones marked in the code: the step's loss, the sampled tokens, eval results
    syncs = {s.split(":")[0] for p in plans.values() for s in p["syncs"]}
    assert {"nanochat/train.py", "nanochat/engine.py", "serve/scheduler.py", "nanochat/loss_eval.py",
            "nanochat/core_eval.py"} <= syncs
    assert plans["serve"]["memory"]["kv_cache"] > 0.4 * 80e9  # the paged pool: half the (fake) GPU's free memory
    # the printed table: a row per stage, then base training's memory split and total time
    lines = probe["report"].splitlines()
    assert [line.split()[0] for line in lines[1:9]] == ["base_train", "mid_train", "chat_sft", "chat_rl", "engine",
                                                         "serve", "base_eval", "core_eval"]
    assert "base training on 8 GPUs at 40% MFU" in probe["report"]


def test_a_host_sync_or_a_device_or_dtype_mismatch_fails_naming_the_line(probe):
    assert "reads a device value on the host at " in probe["stray_sync"]["error"]
    assert "probe.py:" in probe["stray_sync"]["error"]
    assert "x.sum().item() > 0" in probe["stray_sync"]["error"]
    assert "stage probe failed at" in probe["wrong_device"]["error"]
    assert "host + torch.ones(4, device=\"cuda\")" in probe["wrong_device"]["error"]
    assert "a @ torch.ones(4, 4, device=\"cuda\")" in probe["mixed_dtypes"]["error"]
    assert "mixed dtypes ['torch.bfloat16', 'torch.float32']" in probe["mixed_dtypes"]["error"]
    assert probe["marked_sync"]["syncs"] and "error" not in probe["marked_sync"]


def test_auto_device_batch_is_the_largest_that_fits_and_divides_the_batch(probe):
    small, mid, large = (probe["auto"][k] for k in ("0.05", "2", "8"))
    assert small["batch"] == 0 and not any(small["fits"].values())  # not even one row fits 50 MB
    assert 0 < mid["batch"] < large["batch"]  # (at depth 2: 2 GB holds a few rows, 8 GB more)
    for case in (mid, large):  # the divisors of the rows per worker that fit: auto took the largest
        assert case["batch"] == max(int(b) for b, ok in case["fits"].items() if ok)


def test_base_training_resolves_its_device_batch_at_start_up(probe):
    resolve, rows = probe["resolve"], probe["auto"]["2"]["fits"]
    assert resolve["cpu_auto"] == max(int(b) for b in rows if int(b) <= 32)  # CPU: the largest divisor up to 32
    assert resolve["gpu_auto"] == resolve["fitting"] > 0  # GPU: the largest that fits
    assert resolve["auto_replanned"] <= 0.5e9 * (1 - 0.10)  # and a fresh plan at that size agrees
    too_big, fitting = resolve["too_big"], resolve["fitting"]
    assert f"--device-batch-size {too_big} plans a peak of" in resolve["gpu_too_big"]
    assert f"{fitting} rows fit" in resolve["gpu_too_big"]
    assert resolve["gpu_too_big_compiled"] == too_big  # compiled: a warning, the plan is for eager mode


def test_memory_accounting_agrees_with_the_measured_peak_on_cpu(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to read the peak resident memory")
    result = run_python(tmp_path / "measure.py", MEASURE, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert abs(result["planned"] - result["measured"]) / result["measured"] < 0.15, result
