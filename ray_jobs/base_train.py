"""
Base-model pretraining on Ray Train.

    python ray_jobs/base_train.py --depth 20 [--data SOURCE] [--storage ROOT] [--num-workers N] [--use-gpu]
        [--num-iterations K] [--device-batch-size B] [--total-batch-size TB] [--max-seq-len T]
        [--save-every S] [--eval-every E] [--resume] [--run WANDB_NAME]

Writes ROOT/base_checkpoints/d{D}/ in nanochat's layout with metrics.jsonl beside it. Every flag of
nanochat.base_train.BaseTrainConfig is accepted (nanochat's names and defaults).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir, find_resume_step  # noqa: E402
from ray_jobs import common  # noqa: E402
from ray_jobs.ray_train import run_trainer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    BaseTrainConfig.add_args(parser)
    args = parser.parse_args(argv)
    cfg = BaseTrainConfig.from_args(args)
    root = common.storage_root(args.storage)
    common.init_ray()
    ckpt_dir = checkpoint_dir(cfg, root)
    if "://" not in ckpt_dir:
        os.makedirs(ckpt_dir, exist_ok=True)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    if cfg.resume and resume_step is None:
        print(f"--resume: no checkpoint in {ckpt_dir} yet, starting fresh")
    final = run_trainer(
        base_train_worker, cfg, name=f"base-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=common.default_num_workers(args.num_workers, args.use_gpu), use_gpu=args.use_gpu,
        resume_step=resume_step, cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
        metrics_path=ckpt_dir + "/metrics.jsonl" if "://" not in ckpt_dir else None)
    print(f"base training finished: {final}")
    return final


if __name__ == "__main__":
    main()
