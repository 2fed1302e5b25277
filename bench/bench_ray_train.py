"""
Ray Train overhead: steady-state time per step of base training on Ray with N workers vs one plain process with the
same global batch and the same cores (depth 4 by default), plus Ray's fixed start-up cost.

    python bench/bench_ray_train.py [--depth 4] [--steps 40] [--num-workers 1] [--cpus-per-worker C]
Steady state is measured by the wall clock between steps (after warm-up), so it includes whatever the loop does
between steps, not just the step itself. The plain process runs twice, the second time beside an idle Ray, to
separate what Ray's own processes take from a small CPU box from what the Ray path adds. Last line: one JSON object.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import torch


from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir
from nanochat.dataset import resolve_source
from nanochat.tokenizer import RustBPETokenizer
from nanochat.train import WorkerContext

WARMUP = 5


def wall_per_step(ckpt):
    """ms per step by the wall clock from the end of warm-up to the last step (rank 0's metrics.jsonl)."""
    walls = [json.loads(line)["wall"] for line in open(os.path.join(ckpt, "metrics.jsonl")) if '"wall"' in line]
    return 1000 * (walls[-1] - walls[WARMUP]) / (len(walls) - 1 - WARMUP)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device-batch-size", type=int, default=4)
    parser.add_argument("--cpus-per-worker", type=int, default=None,
                        help="CPUs (torch threads) per Ray worker, the plain process gets workers x this; default: "
                             "this box's cores split evenly. Fewer leaves Ray's own processes a core of their own.")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench_ray_train_")
    src = resolve_source("fallback")
    tokenizer = RustBPETokenizer.train_from_iterator((d for u in src.units("train")[:40] for d in src.read_unit(u)),
                                                     4096)
    tokenizer.save(os.path.join(root, "tokenizer"))
    W, B, T = args.num_workers, args.device_batch_size, args.seq_len
    cfg = BaseTrainConfig(depth=args.depth, max_seq_len=T, window_pattern="L", device_batch_size=B,
                          total_batch_size=B * T * W, num_iterations=args.steps, eval_every=-1, sample_every=-1,
                          core_metric_every=-1, save_every=-1, data="fallback", buffer_size=200)

    def run(tag, launch):
        ckpt = checkpoint_dir(replace(cfg, model_tag=tag), root)
        os.makedirs(ckpt, exist_ok=True)
        t0 = time.perf_counter()
        launch(replace(cfg, model_tag=tag), ckpt)
        return time.perf_counter() - t0, wall_per_step(ckpt)

    def plain(c, ckpt):
        base_train_worker(c, WorkerContext(checkpoint_dir=ckpt, base_dir=root, metrics_path=ckpt + "/metrics.jsonl"))

    cpus = args.cpus_per_worker or max(1, (os.cpu_count() or 1) // W)
    torch.set_num_threads(cpus * W)  # the plain process gets the cores the Ray workers get, no more
    plain_wall, plain_ms = run("plain", plain)
    from ray_jobs.common import init_ray
    from ray_jobs.ray_train import run_trainer
    t0 = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - t0
    _, idle_ms = run("plain_ray_idle", plain)
    ray_wall, ray_ms = run("ray", lambda c, ckpt: run_trainer(
        base_train_worker, c, name="bench", checkpoint_dir=ckpt, storage=root, num_workers=W, use_gpu=False,
        cpus_per_worker=cpus, max_failures=0, metrics_path=ckpt + "/metrics.jsonl"))
    # fixed cost: Ray's wall time beyond what its steps took at steady state, minus the plain run's equivalent
    startup = (ray_wall - args.steps * ray_ms / 1000) - (plain_wall - args.steps * plain_ms / 1000)
    result = dict(bench="ray_train_overhead", depth=args.depth, workers=W, cpus_per_worker=cpus,
                  plain_threads=torch.get_num_threads(), global_batch_tokens=B * T * W, steps=args.steps,
                  plain_ms_per_step=round(plain_ms, 1), plain_beside_idle_ray_ms_per_step=round(idle_ms, 1),
                  ray_ms_per_step=round(ray_ms, 1), overhead_pct=round(100 * (ray_ms / plain_ms - 1), 1),
                  overhead_vs_idle_ray_pct=round(100 * (ray_ms / idle_ms - 1), 1), ray_init_s=round(ray_init_s, 1),
                  ray_fit_fixed_cost_s=round(startup, 1))
    print(f"plain {plain_ms:.0f} ms/step (beside an idle Ray: {idle_ms:.0f}) vs Ray x{W} {ray_ms:.0f} ms/step: "
          f"{result['overhead_pct']:+.1f}% ({result['overhead_vs_idle_ray_pct']:+.1f}% vs the plain run beside "
          f"idle Ray); Ray start-up: init {ray_init_s:.1f}s + fit fixed cost {startup:.1f}s")
    print(json.dumps(result))

if __name__ == "__main__":
    main()
