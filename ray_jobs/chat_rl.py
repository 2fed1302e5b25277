"""
RL on GSM8K on Ray Train: on-policy REINFORCE from the SFT model, rollouts and updates on the same workers
(SPEC §11).

    python ray_jobs/chat_rl.py [--storage ROOT] [--num-workers N] [--use-gpu] [--source sft|mid]
        [--model-tag TAG] [--model-step S] [--task-data DIR] [--num-iterations K] [--examples-per-step E]
        [--num-samples S] [--max-new-tokens T] [--temperature X] [--top-k K] [--init-lr-frac F]
        [--eval-every N] [--eval-examples N] [--save-every N] [--resume] ...

Reads ROOT/chatsft_checkpoints/<tag> (or mid with --source mid), writes ROOT/chatrl_checkpoints/<tag>/ (nanochat
layout) with metrics.jsonl, and the report card's "Chat RL" section (final pass@k; GSM8K = pass@1).
Every flag of nanochat.chat_rl.RLConfig is accepted.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from nanochat import storage  # noqa: E402
from nanochat.base_train import find_resume_step  # noqa: E402
from nanochat.chat_rl import RLConfig, chat_rl_worker, log_report, output_dir  # noqa: E402
from ray_jobs import common  # noqa: E402
from ray_jobs.chat_stream import render_kwargs  # noqa: E402
from ray_jobs.ray_train import run_trainer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_train_args(parser)
    RLConfig.add_args(parser)
    args = parser.parse_args(argv)
    root = common.storage_root(args.storage)
    cfg = RLConfig.from_args(args).resolved()
    common.init_ray()
    ckpt_dir = output_dir(cfg, root)
    storage.makedirs(ckpt_dir)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    num_workers = common.default_num_workers(args.num_workers, args.use_gpu)
    final = run_trainer(
        chat_rl_worker, cfg, name=f"rl-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=num_workers, use_gpu=args.use_gpu, resume_step=resume_step, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, worker_kwargs=render_kwargs(args, num_workers))
    log_report(cfg, final, root)
    print(f"rl finished: {final}")
    return final


if __name__ == "__main__":
    main()
