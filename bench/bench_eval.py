"""
Evaluation fan-out: chat eval (ARC-Easy categorical + GSM8K generative, the shipped offline task pack) in one plain
process vs an EvalPool of 1..N Ray actors (one model replica each), same checkpoint, same problems. Checks that
every configuration gives the same per-problem results, and prints problems/s and the speedup over one process.

    python bench/bench_eval.py [--depth 4] [--max-problems 32] [--max-new-tokens 32] [--actors 1,2]
The model is the depth dial's shape with random weights (a trained one decodes the same number of tokens here:
greedy, special tokens can stop it early either way). Last line: one JSON object.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict

import pydoc_data.topics
import torch


from nanochat.chat_eval import build_task, evaluate_problems, num_problems
from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.dataset import PACKAGE_TASK_DATA
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import RustBPETokenizer

TASKS = ("ARC-Easy", "GSM8K")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-problems", type=int, default=32, help="first N problems of each task")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--actors", default="1,2", help="comma-separated pool sizes")
    args = parser.parse_args()
    opts = dict(batch_size=8, num_samples=1, max_new_tokens=args.max_new_tokens, temperature=0.0, top_k=50)

    root = tempfile.mkdtemp(prefix="bench_eval_")  # passed to the loads and the pool
    text = list(pydoc_data.topics.topics.values())
    tokenizer = RustBPETokenizer.train_from_iterator(iter(text), 4096)
    tokenizer.save(os.path.join(root, "tokenizer"))
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, aspect_ratio=32, head_dim=64, sequence_len=1024,
                                  vocab_size=tokenizer.get_vocab_size(), window_pattern="L")
    model = build_model(config, "cpu")
    save_checkpoint(os.path.join(root, "chatsft_checkpoints", "bench"), 1, model.state_dict(), None,
                    {"step": 1, "model_config": asdict(config)})

    # one plain process, all cores: what evaluation costs without Ray
    model, tokenizer, _ = load_model("sft", "cpu", "eval", "bench", 1, base_dir=root)
    tasks = {n: build_task(n, PACKAGE_TASK_DATA) for n in TASKS}
    n_problems = {n: num_problems(t, args.max_problems) for n, t in tasks.items()}
    t0 = time.perf_counter()
    baseline = {n: evaluate_problems(t, model, tokenizer, list(range(n_problems[n])), **opts) for n, t in tasks.items()}
    plain_s = time.perf_counter() - t0
    total = sum(n_problems.values())
    print(f"plain process ({torch.get_num_threads()} threads): {total} problems in {plain_s:.1f}s "
          f"({total / plain_s:.2f} problems/s)")

    from ray_jobs.chat_eval import evaluate_on_pool
    from ray_jobs.common import init_ray
    from ray_jobs.eval_pool import EvalPool
    init_ray()
    rows = []
    for n in [int(a) for a in args.actors.split(",")]:
        t0 = time.perf_counter()
        pool = EvalPool("sft", "bench", 1, num_actors=n, base_dir=root, use_gpu=False)
        pool.ready()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        records = evaluate_on_pool(pool, list(TASKS), PACKAGE_TASK_DATA, args.max_problems, opts, progress=False)
        eval_s = time.perf_counter() - t0
        pool.shutdown()
        same = records == baseline
        rows.append(dict(actors=n, start_s=round(start_s, 1), eval_s=round(eval_s, 1),
                         problems_per_s=round(total / eval_s, 2), speedup_vs_plain=round(plain_s / eval_s, 2),
                         identical_to_plain=same))
        print(f"{n} actor(s): replicas ready in {start_s:.1f}s, {total} problems in {eval_s:.1f}s "
              f"({total / eval_s:.2f} problems/s, {plain_s / eval_s:.2f}x the plain process), "
              f"results {'identical' if same else 'DIFFERENT'}")
    print(json.dumps({"bench": "eval_fanout", "depth": args.depth, "problems": total, "tasks": list(TASKS),
                      "plain_s": round(plain_s, 1), "plain_threads": torch.get_num_threads(), "pools": rows}))


if __name__ == "__main__":
    main()
