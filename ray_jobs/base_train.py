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

from nanochat import storage  # noqa: E402
from nanochat.base_train import (BaseTrainConfig, BatchSource, base_train_worker, checkpoint_dir,  # noqa: E402
                                 find_resume_step)
from ray_jobs import common  # noqa: E402
from ray_jobs.ray_train import run_trainer  # noqa: E402


class RayDataBatches(BatchSource):
    """Training batches from a Ray Data pipeline per worker (read -> tokenize in an actor pool -> pack on the
    worker): the same batches and loader states as the plain loader, with tokenization off the training process."""

    def __init__(self, cfg, tokenizer, num_actors=2):
        super().__init__(cfg, tokenizer)
        self.num_actors = num_actors

    def train(self, rank, world_size, device, resume_state):
        from ray_jobs.data_stream import ray_data_loader_with_state
        return ray_data_loader_with_state(self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, "train",
                                          device=device, resume_state_dict=resume_state, source=self.source,
                                          rank=rank, world_size=world_size, buffer_size=self.cfg.buffer_size,
                                          num_actors=self.num_actors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_train_args(parser)
    BaseTrainConfig.add_args(parser)
    args = parser.parse_args(argv)
    cfg = BaseTrainConfig.from_args(args)
    root = common.storage_root(args.storage)
    common.init_ray()
    ckpt_dir = checkpoint_dir(cfg, root)
    storage.makedirs(ckpt_dir)
    resume_step = find_resume_step(ckpt_dir) if cfg.resume else None
    if cfg.resume and resume_step is None:
        print(f"--resume: no checkpoint in {ckpt_dir} yet, starting fresh")
    num_workers = common.default_num_workers(args.num_workers, args.use_gpu)
    worker_kwargs = {}
    if common.pick_loader(args.loader, num_workers, args.cpus_per_worker) == "ray":
        from nanochat.tokenizer import get_tokenizer
        worker_kwargs["batch_source"] = RayDataBatches(cfg, get_tokenizer(root), args.data_actors)
    final = run_trainer(
        base_train_worker, cfg, name=f"base-{os.path.basename(ckpt_dir)}", checkpoint_dir=ckpt_dir, storage=root,
        num_workers=num_workers, use_gpu=args.use_gpu, resume_step=resume_step, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, worker_kwargs=worker_kwargs)
    print(f"base training finished: {final}")
    return final


if __name__ == "__main__":
    main()
