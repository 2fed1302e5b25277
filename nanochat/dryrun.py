"""
A dry run of a preset's GPU steps on a fake CUDA device (nanochat.fake_cuda): one real step of every stage, on
tensors of the real sizes, in seconds on a CPU, with no GPU and no memory allocated.

    python -m nanochat.dryrun --preset d20 [--depth N] [--device-batch-size auto|N] [--gpu-memory-gb 80]
        [--gpus 8] [--mfu 40]

Each stage runs its own code (the training step with MuonAdamW and gradient accumulation, the Engine's prefill and
decode, the RL update, the serving scheduler over the paged KV cache, the evaluators, the dataloader's copy to the
device) and reports its FLOPs per step, the time per step at the stated MFU, and its peak memory per device.
A shape, device or dtype error, or a host sync on a line not marked "host sync", fails the stage, naming the line.
Not covered: torch.compile and FlexAttention kernels (a fake device cannot run compiled code; the masked path has
the same shapes), NCCL buffers, the caching allocator's fragmentation (the margin of --device-batch-size auto is
for those).
"""
from nanochat import cuda_stub  # (first: on a CPU-only torch it must load before torch)

import argparse
import sys
import time
from dataclasses import replace

import tiktoken
import torch

from nanochat import cuda_runtime
from nanochat.base_train import BaseTrainConfig, batch_hyperparameters, model_config
from nanochat.chat_rl import RLConfig, backprop_group, rollout_batch
from nanochat.chat_train import MidTrainConfig, SFTConfig
from nanochat.common import get_peak_flops
from nanochat.core_eval import evaluate_example
from nanochat.dataloader import rows_to_device
from nanochat.engine import Engine
from nanochat.flags import int_or_auto
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory_plan import MARGIN, StageFailed, StagePlan, cuda_model, largest_fitting, measure, planned_peak, \
    tensor_bytes, token_rows, training_step, usable_bytes
from nanochat.paged_cache import block_bytes
from nanochat.presets import PRESETS, to_argv
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer
from serve.scheduler import SamplingParams, Scheduler, default_kv_bytes

GPUS = {"h100": cuda_runtime.GPUSpec("NVIDIA H100 80GB HBM3", 80 * 10**9),
        "h200": cuda_runtime.GPUSpec("NVIDIA H200", 141 * 10**9)}
DECODE_STEPS = 8  # decode steps actually run per generation (the rest are the same step again)


def dryrun_tokenizer():
    """A byte-level tokenizer with nanochat's special tokens: the Engine and the evaluators need real special token
    ids and decoding, not a trained vocabulary (the model's vocabulary size comes from the preset)."""
    ranks = {bytes([i]): i for i in range(256)}
    special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    return RustBPETokenizer(tiktoken.Encoding("dryrun", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                              special_tokens=special), "<|bos|>")


def stage_config(config_cls, flags):
    """A stage's config from a preset's flags (flags of other layers, such as Ray's, are left out)."""
    args, _ = config_cls.parser().parse_known_args(to_argv(flags))
    return config_cls.from_args(args)


def generation(stage, config, tokenizer, prompt_len, num_samples, max_new_tokens, gpu, backprop_batch=0):
    """Engine prefill + decode (DECODE_STEPS run, FLOPs scaled to max_new_tokens); with backprop_batch, the RL update
    on the rollout (policy-gradient backward in passes of backprop_batch rows, then the optimizer)."""
    def run(meter, flops):
        model = cuda_model(config)
        model.eval()
        prompt = [tokenizer.get_bos_token_id()] + [1] * (prompt_len - 1)
        counted = []
        for steps in (DECODE_STEPS, 2 * DECODE_STEPS):  # the difference is DECODE_STEPS decode steps
            seqs, masks = Engine(model, tokenizer).generate_batch(prompt, num_samples=num_samples, max_tokens=steps,
                                                                  temperature=1.0, top_k=50)
            counted.append(flops.get_total_flops() - sum(counted))
        per_decode_step = (counted[1] - counted[0]) / DECODE_STEPS
        total = counted[0] - DECODE_STEPS * per_decode_step + max_new_tokens * per_decode_step
        what = f"prefill {prompt_len} + {max_new_tokens} decode steps x {num_samples} rows"
        if backprop_batch:
            model.train()
            optimizer = model.setup_optimizer()
            pad = [s + [tokenizer.get_bos_token_id()] * (max_new_tokens - len(s) + prompt_len) for s in seqs]
            inputs, targets = rollout_batch(pad, [m + [1] * (max_new_tokens - len(m) + prompt_len) for m in masks],
                                            tokenizer.get_bos_token_id())
            before = flops.get_total_flops()
            backprop_group(model, inputs, targets, torch.zeros(num_samples), backprop_batch, 1)
            optimizer.step()
            total += flops.get_total_flops() - before
            what += f"; update {num_samples} x {inputs.size(1)} in passes of {backprop_batch}"
        return StagePlan(stage, what, total, 0)
    return measure(stage, gpu, run)


def serving(config, tokenizer, rows, prompt_len, gpu):
    """The serving scheduler on the paged KV cache: `rows` requests of prompt_len tokens, prefilled in chunks and
    packed into one forward with the decoding rows, DECODE_STEPS tokens each. Runs the scheduler's loop on this
    thread (a fake device lives in this thread's dispatch modes). Its pool holds what the rows need; the plan's peak
    counts the pool a replica takes by default (half the GPU's free memory) instead."""
    def run(meter, flops):
        model = cuda_model(config)
        model.eval()
        block = 16
        need = rows * -(-(prompt_len + 1 + DECODE_STEPS) // block) + 1
        per_block = block_bytes(config.n_layer, block, config.n_kv_head, config.n_embd // config.n_head,
                                model.cos.dtype)
        scheduler = Scheduler(model, tokenizer, max_batch=rows, kv_cache_bytes=need * per_block, block_size=block,
                              prefill_slowdown=0)  # (no timing-driven prefill budget: a fake step takes no time)
        finished = []

        def sink(event):
            if event.get("done"):
                finished.append(event)
                if len(finished) == rows:
                    scheduler.stop()

        def submit():
            prompt = [tokenizer.get_bos_token_id()] + [1] * (prompt_len - 1)
            scheduler.submit_many([(prompt + [i], SamplingParams(max_tokens=DECODE_STEPS, top_k=50, seed=i), sink)
                                   for i in range(rows)])
        scheduler.run(on_ready=submit)
        failed = [e["error"] for e in finished if e.get("error")]
        if failed:
            raise StageFailed(f"dry run: stage serve failed: {failed[0]} (the scheduler's log above has the line)")
        used = tensor_bytes([scheduler.pool.k, scheduler.pool.v])
        default = default_kv_bytes(model, rows, config.sequence_len, block)
        return StagePlan("serve", f"{rows} requests: prefill {prompt_len + 1} + {DECODE_STEPS} decode steps",
                         flops.get_total_flops(), meter.peak - used + default, memory=dict(kv_cache=default))
    return measure("serve", gpu, run)


def bpb_evaluation(config, B, T, gpu):
    """One batch of the bits-per-byte evaluator."""
    def run(meter, flops):
        model = cuda_model(config)
        model.eval()
        x, y = rows_to_device(token_rows(B, T, config.vocab_size), "cuda")
        token_bytes = torch.ones(config.vocab_size, dtype=torch.int64, device="cuda")
        with torch.no_grad():
            evaluate_bpb(model, [(x, y)], 1, token_bytes)
        return StagePlan("base_eval (bpb)", f"{B} x {T} tokens, forward", flops.get_total_flops(), 0)
    return measure("base_eval (bpb)", gpu, run)


def core_evaluation(config, tokenizer, choices, words, gpu):
    """One multiple-choice CORE example: a query and `choices` answers of about `words` words each."""
    item = {"query": "q " * words, "choices": [f"answer {i} " * (words // 2) for i in range(choices)], "gold": 0}
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}

    def run(meter, flops):
        model = cuda_model(config)
        model.eval()
        evaluate_example(model, tokenizer, [item], 0, meta, torch.device("cuda"))
        return StagePlan("core_eval", f"one example: {choices} choices of ~{2 * words} tokens, forward",
                         flops.get_total_flops(), 0)
    return measure("core_eval", gpu, run)


def base_setup(flags, depth, vocab, world, device_batch_size):
    cfg = stage_config(BaseTrainConfig, flags)
    cfg = replace(cfg, depth=depth or cfg.depth)
    hp = batch_hyperparameters(cfg, vocab, world)
    B = int_or_auto(device_batch_size)
    return cfg, model_config(cfg, vocab), hp, B


def plan_preset(preset, depth=0, device_batch_size="auto", gpu=GPUS["h100"], world=8, log=print):
    """Every stage's StagePlan for the preset on `world` GPUs like `gpu`; auto device batches (base and mid
    training) are picked as the training stages pick them at start-up."""
    flags = PRESETS[preset]
    vocab = int(flags.get("tok_train", {}).get("vocab-size", 32768))
    tokenizer = dryrun_tokenizer()
    base, config, hp, B = base_setup(flags.get("base_train", {}), depth, vocab, world, device_batch_size)
    T, total = base.max_seq_len, hp["total_batch_size"]

    def auto(stage, T, total):
        peak = planned_peak(config, T, world, gpu)
        rows = largest_fitting(peak, total // (T * world), gpu)
        if not rows:
            raise StageFailed(f"dry run: {stage}: not even one row of {T} tokens fits {gpu.name} "
                              f"({gpu.memory_bytes / 1e9:.0f} GB): planned peak {peak(1) / 1e9:.1f} GB")
        log(f"{stage} --device-batch-size auto: {rows} rows on {gpu.name} ({gpu.memory_bytes / 1e9:.0f} GB, "
            f"{MARGIN:.0%} kept free)")
        return rows

    B = B or auto("base_train", T, total)
    plans = [training_step("base_train", config, B, T, total, world, hp["num_iterations"], gpu)]
    mid = stage_config(MidTrainConfig, flags.get("mid_train", {}))
    Tm = min(mid.max_seq_len, T)
    Bm = mid.device_batch_size or auto("mid_train", Tm, mid.total_batch_size)
    plans.append(training_step("mid_train", config, Bm, Tm, mid.total_batch_size, world, 0, gpu))
    sft = stage_config(SFTConfig, flags.get("chat_sft", {}))
    Ts = min(sft.max_seq_len, T)
    Bs = sft.device_batch_size or auto("chat_sft", Ts, sft.target_examples_per_step * Ts)
    plans.append(training_step("chat_sft", config, Bs, Ts, 0, world, 0, gpu, padded=True))
    rl = stage_config(RLConfig, flags.get("chat_rl", {}))
    prompt = min(256, T // 2)  # (GSM8K prompts are ~100-200 tokens)
    plans.append(generation("chat_rl", config, tokenizer, prompt, rl.num_samples, rl.max_new_tokens, gpu,
                            backprop_batch=rl.device_batch_size))
    plans.append(generation("engine", config, tokenizer, T // 2, 8, 256, gpu))
    plans.append(serving(config, tokenizer, 8, prompt, gpu))
    plans.append(bpb_evaluation(config, B, T, gpu))
    plans.append(core_evaluation(config, tokenizer, 4, 200, gpu))
    return plans, dict(device_batch_size=B, total_batch_size=total, num_iterations=hp["num_iterations"],
                       model=config)


def report(plans, info, gpu, peak_flops, world, mfu):
    peak = peak_flops * mfu
    budget = usable_bytes(gpu)
    measured = any(p.measured_bytes for p in plans)
    lines = [f"{'stage':<16} {'step':<58} {'TFLOP/step':>10} {'s/step':>8} {'steps':>6} {'hours':>6} "
             f"{'peak GB':>8} fits" + ("  measured GB" if measured else "")]
    for p in plans:
        seconds = p.flops / peak
        hours = f"{p.steps * seconds / 3600:.2f}" if p.steps else "-"
        lines.append(f"{p.stage:<16} {p.what[:58]:<58} {p.flops / 1e12:>10.1f} {seconds:>8.3f} "
                     f"{p.steps or '-':>6} {hours:>6} {p.peak_bytes / 1e9:>8.1f} "
                     f"{'yes' if p.peak_bytes <= budget else 'NO ':<4}"
                     + (f" {p.measured_bytes / 1e9:>12.1f}" if measured else ""))
    for p in plans:
        if p.peak_bytes > budget:
            lines.append(f"warning: {p.stage} plans {p.peak_bytes / 1e9:.1f} GB per GPU, over the "
                         f"{budget / 1e9:.0f} GB usable on {gpu.name} (eager mode; lower its device batch)")
    base = plans[0]
    mem = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in base.memory.items())
    lines.append(f"base_train memory per GPU: {mem}; peak {base.peak_bytes / 1e9:.1f} GB")
    lines.append(f"base training on {world} GPUs at {mfu:.0%} MFU: {base.steps} steps of "
                 f"{info['total_batch_size']:,} tokens, device batch {info['device_batch_size']}: "
                 f"{base.steps * base.flops / peak / 3600:.2f} hours")
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(description="plan a preset's GPU steps on a fake CUDA device (no GPU needed)")
    p.add_argument("--preset", default="d20", choices=sorted(PRESETS), help="the speedrun preset to plan")
    p.add_argument("--depth", type=int, default=0, help="model depth (0: the preset's)")
    p.add_argument("--device-batch-size", default="auto",
                   help="base training rows per GPU, or auto: the largest that fits (default: auto)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU to plan for (default: h100)")
    p.add_argument("--gpu-memory-gb", type=float, default=0, help="its memory in GB (0: the GPU's own)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs training together (default: 8)")
    p.add_argument("--mfu", type=float, default=40.0, help="assumed model FLOPs utilization, percent (default: 40)")
    p.add_argument("--device", default="fake", choices=["fake", "cuda"],
                   help="fake: plan on a fake GPU (default); cuda: run the same steps on this machine's GPU and print "
                        "the allocator's measured peak beside the plan's")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    gpu = GPUS[args.gpu]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("dry run: --device cuda needs a CUDA GPU; this machine has none", file=sys.stderr)
            return 2
        gpu = cuda_runtime.GPUSpec.of(torch.device("cuda"), real=True)
    if args.gpu_memory_gb:
        gpu = replace(gpu, memory_bytes=int(args.gpu_memory_gb * 1e9))
    t0 = time.time()
    where = "the real GPU" if gpu.real else "a fake GPU (" + (
        "the stand-in CUDA runtime)" if cuda_stub.needed() else "torch's CUDA build)")
    print(f"planning {args.preset} for {args.gpus} x {gpu.name} on {where}")
    try:
        plans, info = plan_preset(args.preset, args.depth, args.device_batch_size, gpu, args.gpus)
    except StageFailed as e:
        print(e, file=sys.stderr)
        return 1
    print(report(plans, info, gpu, get_peak_flops(gpu.name), args.gpus, args.mfu / 100))
    print(f"dry run of {len(plans)} stages in {time.time() - t0:.1f}s; intended host syncs: "
          + ", ".join(sorted({s for p in plans for s in p.syncs})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
