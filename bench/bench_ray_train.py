"""
Ray Train overhead: steady-state step time of base training on Ray with N workers vs one plain process with the
same global batch (depth 4 by default), plus Ray's fixed start-up cost (fit wall time minus the steps).

    python bench/bench_ray_train.py [--depth 4] [--steps 20] [--num-workers 2]
Last line: one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir  # noqa: E402
from nanochat.dataset import resolve_source  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402
from nanochat.train import WorkerContext  # noqa: E402


def step_times(ckpt, skip):
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    return [r["dt_ms"] for r in rows if "dt_ms" in r][skip:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device-batch-size", type=int, default=4)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench_ray_train_")
    os.environ["NANOCHAT_BASE_DIR"] = root
    src = resolve_source("fallback")
    tokenizer = RustBPETokenizer.train_from_iterator((d for u in src.units("train")[:40] for d in src.read_unit(u)),
                                                     4096)
    tokenizer.save(os.path.join(root, "tokenizer"))
    W, B, T = args.num_workers, args.device_batch_size, args.seq_len
    cfg = BaseTrainConfig(depth=args.depth, max_seq_len=T, window_pattern="L", device_batch_size=B,
                          total_batch_size=B * T * W, num_iterations=args.steps, eval_every=-1, sample_every=-1,
                          core_metric_every=-1, save_every=-1, data="fallback", buffer_size=200)
    skip = 3  # warm-up steps

    plain_cfg = replace(cfg, model_tag="plain")
    ckpt = checkpoint_dir(plain_cfg, root)
    os.makedirs(ckpt, exist_ok=True)
    t0 = time.perf_counter()
    base_train_worker(plain_cfg, WorkerContext(checkpoint_dir=ckpt, metrics_path=ckpt + "/metrics.jsonl"))
    plain_wall = time.perf_counter() - t0
    plain_ms = statistics.median(step_times(ckpt, skip))

    from ray_jobs.common import init_ray
    from ray_jobs.ray_train import run_trainer
    t0 = time.perf_counter()
    init_ray()
    ray_init_s = time.perf_counter() - t0
    ray_cfg = replace(cfg, model_tag="ray")
    ckpt = checkpoint_dir(ray_cfg, root)
    os.makedirs(ckpt, exist_ok=True)
    t0 = time.perf_counter()
    run_trainer(base_train_worker, ray_cfg, name="bench", checkpoint_dir=ckpt, storage=root, num_workers=W,
                use_gpu=False, max_failures=0, metrics_path=ckpt + "/metrics.jsonl")
    ray_wall = time.perf_counter() - t0
    ray_steps = step_times(ckpt, skip)
    ray_ms = statistics.median(ray_steps)
    startup = ray_wall - sum(step_times(ckpt, 0)) / 1000 - (plain_wall - sum(step_times(
        checkpoint_dir(plain_cfg, root), 0)) / 1000)
    result = dict(bench="ray_train_overhead", depth=args.depth, workers=W, global_batch_tokens=B * T * W,
                  plain_step_ms=round(plain_ms, 1), ray_step_ms=round(ray_ms, 1),
                  overhead_pct=round(100 * (ray_ms / plain_ms - 1), 1), ray_init_s=round(ray_init_s, 1),
                  ray_fit_fixed_cost_s=round(startup, 1), plain_wall_s=round(plain_wall, 1),
                  ray_wall_s=round(ray_wall, 1))
    print(f"plain {plain_ms:.0f} ms/step vs Ray x{W} {ray_ms:.0f} ms/step ({result['overhead_pct']:+.1f}%); "
          f"Ray start-up: init {ray_init_s:.1f}s + fit fixed cost {startup:.1f}s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
