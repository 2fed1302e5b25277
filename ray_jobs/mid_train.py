"""
Midtraining on Ray Train: the base model learns the chat format, tool use and multiple choice (SPEC §9).

    python ray_jobs/mid_train.py [--storage ROOT] [--num-workers N] [--use-gpu] [--model-tag TAG]
        [--model-step S] [--task-data DIR] [--num-iterations K] [--device-batch-size B] [--resume] ...

Reads ROOT/base_checkpoints/<tag>, writes ROOT/mid_checkpoints/<tag>/ (nanochat layout) with metrics.jsonl.
Every flag of nanochat.chat_train.ChatTrainConfig is accepted.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from nanochat import storage  # noqa: E402
from nanochat.base_train import find_resume_step  # noqa: E402
from nanochat.chat_train import ChatTrainConfig, chat_train_worker, output_dir  # noqa: E402
from ray_jobs import common  # noqa: E402
from ray_jobs.chat_stream import render_kwargs  # noqa: E402
from ray_jobs.ray_train import run_trainer  # noqa: E402


def main(argv=None, stage="mid"):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_train_args(parser)
    ChatTrainConfig.add_args(parser)
    parser.set_defaults(stage=stage)
    args = parser.parse_args(argv)
    root = common.storage_root(args.storage)
    cfg = ChatTrainConfig.from_args(args).resolved()
    common.init_ray()
    ckpt_dir = output_dir(cfg, root)
    storage.makedirs(ckpt_dir)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    num_workers = common.default_num_workers(args.num_workers, args.use_gpu)
    final = run_trainer(
        chat_train_worker, cfg, name=f"{stage}-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=num_workers, use_gpu=args.use_gpu, resume_step=resume_step, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, worker_kwargs=render_kwargs(args, num_workers))
    print(f"{stage} finished: {final}")
    return final


if __name__ == "__main__":
    main()
