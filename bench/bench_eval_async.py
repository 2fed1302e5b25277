"""
What evaluation off the training workers saves: base training on Ray (1 worker) with a CORE evaluation every N
steps, the evals inline on the training worker vs async (Ray Train validation tasks on their step's checkpoint),
against the same run without CORE.

    python bench/bench_eval_async.py [--depth 4] [--steps 60] [--core-every 20] [--core-max-per-task 40]
        [--core-bundle DIR]
The CORE bundle is --core-bundle, else the one training uses (downloaded once into the cache). The last step's eval
stays inline in both modes (the run's final numbers), and the async run waits for its last offloaded eval before it
ends, so the times compare like for like. Last line: one JSON object.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir, evaluate_checkpoint
from nanochat.core_eval import download_eval_bundle
from nanochat.dataset import resolve_source
from nanochat.tokenizer import RustBPETokenizer



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="model depth")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--core-every", type=int, default=20, help="steps between CORE evaluations")
    parser.add_argument("--core-max-per-task", type=int, default=40, help="examples per CORE task")
    parser.add_argument("--core-bundle", default="", help="CORE eval bundle directory (default: downloaded)")
    args = parser.parse_args()
    try:
        bundle = os.path.abspath(args.core_bundle) if args.core_bundle else download_eval_bundle()
    except Exception as e:
        raise SystemExit(f"no CORE eval bundle ({e}): pass --core-bundle DIR")

    root = tempfile.mkdtemp(prefix="bench_eval_async_")  # run_trainer hands it to the workers and evaluations
    src = resolve_source("fallback")
    tokenizer = RustBPETokenizer.train_from_iterator((d for u in src.units("train")[:40] for d in src.read_unit(u)),
                                                     4096)
    tokenizer.save(os.path.join(root, "tokenizer"))
    cfg = BaseTrainConfig(depth=args.depth, max_seq_len=256, window_pattern="L", device_batch_size=4,
                          total_batch_size=1024, num_iterations=args.steps, eval_every=-1, sample_every=-1,
                          core_metric_every=args.core_every, core_metric_max_per_task=args.core_max_per_task,
                          core_bundle=bundle, save_every=-1, data="fallback",
                          buffer_size=200)
    from ray_jobs.common import init_ray
    from ray_jobs.ray_train import run_trainer
    init_ray(num_cpus=2)  # one CPU for the training worker, one for an evaluation beside it

    def run(tag, c, evaluate_fn=None):
        c = replace(c, model_tag=tag)
        ckpt = checkpoint_dir(c, root)
        os.makedirs(ckpt, exist_ok=True)
        t0 = time.perf_counter()
        run_trainer(base_train_worker, c, name=tag, checkpoint_dir=ckpt, storage=root, num_workers=1, use_gpu=False,
                    max_failures=0, evaluate_fn=evaluate_fn)
        lines = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
        return time.perf_counter() - t0, [(r["step"], r.get("offloaded", False)) for r in lines if "core_metric" in r]

    none_s, _ = run("no_core", replace(cfg, core_metric_every=-1))
    inline_s, inline_evals = run("core_inline", cfg)
    async_s, async_evals = run("core_async", cfg, evaluate_checkpoint)
    result = dict(bench="eval_async", depth=args.depth, steps=args.steps, core_every=args.core_every,
                  core_max_per_task=args.core_max_per_task, no_core_s=round(none_s, 1),
                  core_inline_s=round(inline_s, 1), core_async_s=round(async_s, 1),
                  core_inline_cost_s=round(inline_s - none_s, 1), core_async_cost_s=round(async_s - none_s, 1),
                  saved_pct=round(100 * (inline_s - async_s) / inline_s, 1),
                  inline_evals=inline_evals, async_evals=async_evals)
    print(f"{args.steps} steps: no CORE {none_s:.1f}s, CORE every {args.core_every} inline {inline_s:.1f}s, async "
          f"{async_s:.1f}s ({result['saved_pct']:+.1f}% of the inline run's time saved)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
