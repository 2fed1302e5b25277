"""
Midtraining on Ray Train: the base model learns the chat format, tool use and multiple choice.

    python -m ray_jobs.mid_train [--storage ROOT] [--num-workers N] [--use-gpu] [--model-tag TAG]
        [--source base|DIR|owner/name] [--model-step S] [--task-data DIR] [--num-iterations K]
        [--device-batch-size B] [--resume] ...

Reads ROOT/base_checkpoints/<tag>, writes ROOT/mid_checkpoints/<tag>/ (nanochat layout) with metrics.jsonl.
--source may also be a model directory or a Hugging Face Hub repo (nanochat.hub); the output's tag is then
--model-tag, else the directory's or repo's name.
Every flag of nanochat.chat_train.MidTrainConfig is accepted, with its defaults (nanochat's).
"""
from nanochat.chat_train import MidTrainConfig, chat_train_worker, output_dir, world_size_error
from ray_jobs.chat_stream import render_kwargs
from ray_jobs.ray_train import launch, stage_parser


def parser():
    return stage_parser(MidTrainConfig, __doc__)


def main(argv=None):
    return launch(argv, parser=parser(), stage="mid", config_cls=MidTrainConfig, worker_fn=chat_train_worker,
                  output_dir=output_dir, worker_kwargs=render_kwargs,
                  world_size_error=lambda cfg, root, size, max_size: world_size_error(cfg, size))


if __name__ == "__main__":
    main()
