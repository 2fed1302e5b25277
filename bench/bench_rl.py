"""
RL step anatomy at a tiny size: rollout tokens/s (KV-cache engine sampling the groups) and the time of a whole RL
step (rollouts + policy-gradient passes + optimizer step), in one plain process.

    python bench/bench_rl.py [--depth 2] [--n-embd 64] [--steps 5] [--examples-per-step 2] [--num-samples 16]
        [--device-batch-size 8] [--max-new-tokens 64] [--task-data DIR] [--device cpu|cuda] [--threads N]

A throwaway storage root gets a tokenizer (trained on Python's bundled docs, --vocab-size), a random 'sft'
checkpoint (weights perturbed so the samples vary) and GSM8K from --task-data (default $NANOCHAT_TASK_DATA, else
../shared/data next to the repo, else a few synthetic problems). The first step is warm-up and not counted.
Last line: one JSON object.
"""
import argparse
import gzip
import json
import os
import statistics
import tempfile
from dataclasses import asdict

import pydoc_data.topics
import torch

from nanochat.chat_rl import RLConfig, chat_rl_worker
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import autodetect_device_type
from nanochat.flags import task_data_dir
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import RustBPETokenizer
from nanochat.train import WorkerContext

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gsm8k_task_data(task_data, root):
    """task_data (--task-data, else $NANOCHAT_TASK_DATA) if it holds GSM8K, else ../shared/data next to the repo, else
    a few synthetic problems written under root."""
    for d in (task_data, os.path.join(REPO_ROOT, "..", "shared", "data")):
        if d and os.path.exists(os.path.join(d, "gsm8k")):
            return d
    d = os.path.join(root, "task_data")  # offline and no copies: a few problems in the same layout
    os.makedirs(os.path.join(d, "gsm8k"))
    rows = [{"question": f"Tom has {i} apples and buys 3 more. How many apples does he have?",
             "answer": f"He has {i}+3 = <<{i}+3={i + 3}>>{i + 3} apples.\n#### {i + 3}"} for i in range(32)]
    for split in ("train", "test"):
        with gzip.open(os.path.join(d, "gsm8k", f"{split}.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=320)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--examples-per-step", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--device-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--task-data", default=None)
    parser.add_argument("--device", default=autodetect_device_type())
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is "
                        "steadier on a shared machine, where spinning thread pools lose badly")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as root:
        tokenizer = RustBPETokenizer.train_from_iterator(iter(pydoc_data.topics.topics.values()), args.vocab_size)
        tokenizer.save(os.path.join(root, "tokenizer"))
        config = GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth,
                           n_head=max(1, args.n_embd // 32), n_kv_head=max(1, args.n_embd // 32), n_embd=args.n_embd)
        torch.manual_seed(0)
        model = build_model(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_checkpoint(os.path.join(root, "chatsft_checkpoints", "bench"), 0, model.state_dict(), None,
                        {"model_config": asdict(config), "step": 0})
        cfg = RLConfig(model_tag="bench", num_iterations=args.steps, device_batch_size=args.device_batch_size,
                       examples_per_step=args.examples_per_step, num_samples=args.num_samples,
                       max_new_tokens=args.max_new_tokens, eval_every=-1, eval_examples=0, save_every=-1,
                       task_data=gsm8k_task_data(task_data_dir(args.task_data), root))
        ckpt = os.path.join(root, "chatrl_checkpoints", "bench")
        os.makedirs(ckpt)
        ctx = WorkerContext(device=device, checkpoint_dir=ckpt, base_dir=root,
                            metrics_path=os.path.join(ckpt, "metrics.jsonl"))
        chat_rl_worker(cfg, ctx, run_id="bench", tokenizer=tokenizer)
        steps = [json.loads(line) for line in open(ctx.metrics_path)]
        steps = [s for s in steps if "reward" in s][1:] or steps[-1:]  # drop the warm-up step

    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    result = dict(bench="rl_step", device=str(device), depth=args.depth, n_embd=args.n_embd,
                  vocab=config.vocab_size, examples_per_step=args.examples_per_step, num_samples=args.num_samples,
                  device_batch_size=args.device_batch_size, max_new_tokens=args.max_new_tokens,
                  steps_measured=len(steps), rollout_tok_per_sec=round(med("rollout_tok_per_sec"), 1),
                  step_time_ms=round(med("dt_ms"), 1), rollout_pct=round(med("rollout_pct"), 1),
                  gen_len=round(statistics.mean(s["gen_len"] for s in steps), 1),
                  seq_len=round(statistics.mean(s["seq_len"] for s in steps), 1), threads=torch.get_num_threads())
    print(f"rollout {result['rollout_tok_per_sec']} tok/s, step {result['step_time_ms']} ms "
          f"({result['rollout_pct']}% rollouts), {result['gen_len']} sampled tokens per completion")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
