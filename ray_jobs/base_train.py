"""
Base-model pretraining on Ray Train.

    python -m ray_jobs.base_train --depth 20 [--data SOURCE] [--storage ROOT] [--num-workers N] [--use-gpu]
        [--num-iterations K] [--device-batch-size B] [--total-batch-size TB] [--max-seq-len T]
        [--save-every S] [--eval-every E] [--resume] [--run WANDB_NAME]

Writes ROOT/base_checkpoints/d{D}/ in nanochat's layout with metrics.jsonl beside it. Every flag of
nanochat.base_train.BaseTrainConfig is accepted (nanochat's names and defaults).
"""
from nanochat.base_train import BaseTrainConfig, BatchSource, base_train_worker, checkpoint_dir, evaluate_checkpoint, \
    world_size_error
from nanochat.tokenizer import get_tokenizer
from ray_jobs.common import pick_loader
from ray_jobs.ray_train import launch, stage_parser


class RayDataBatches(BatchSource):
    """Training batches from a Ray Data pipeline per worker (read -> tokenize in an actor pool -> pack on the
    worker): the same batches and loader states as the plain loader, with tokenization off the training process."""

    def __init__(self, cfg, tokenizer, base_dir=None, num_actors=2):
        super().__init__(cfg, tokenizer, base_dir)
        self.num_actors = num_actors

    def train(self, rank, world_size, device, resume_state):
        from ray_jobs.data_stream import ray_data_loader_with_state
        return ray_data_loader_with_state(self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, "train",
                                          device=device, resume_state_dict=resume_state, source=self.source,
                                          rank=rank, world_size=world_size, buffer_size=self.cfg.buffer_size,
                                          num_actors=self.num_actors)


def data_source(run, cfg, root, num_workers):
    if pick_loader(run.loader, num_workers, run.cpus_per_worker) != "ray":
        return {}
    return {"batch_source": RayDataBatches(cfg, get_tokenizer(root), root, run.data_actors)}


def base_world_size_error(cfg, root, world_size, batch_world_size):
    return world_size_error(cfg, world_size, batch_world_size, get_tokenizer(root).get_vocab_size())


def parser():
    return stage_parser(BaseTrainConfig, __doc__)


def main(argv=None):
    return launch(argv, parser=parser(), stage="base", config_cls=BaseTrainConfig, worker_fn=base_train_worker,
                  output_dir=checkpoint_dir, worker_kwargs=data_source, world_size_error=base_world_size_error,
                  evaluate_fn=evaluate_checkpoint)


if __name__ == "__main__":
    main()
