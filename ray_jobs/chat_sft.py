"""
Chat SFT on Ray Train: supervised finetuning on conversations, loss on the assistant's tokens only.

    python -m ray_jobs.chat_sft [--storage ROOT] [--num-workers N] [--use-gpu] [--source mid|base|DIR|owner/name]
        [--model-tag TAG] [--model-step S] [--task-data DIR] [--num-iterations K] [--resume] ...

Reads ROOT/mid_checkpoints/<tag> (or base with --source base), writes ROOT/chatsft_checkpoints/<tag>/. --source may
also be a model directory or a Hugging Face Hub repo (nanochat.hub); the output's tag is then --model-tag, else the
directory's or repo's name.
Every flag of nanochat.chat_train.SFTConfig is accepted, with its defaults (nanochat's).
"""
from nanochat.chat_train import SFTConfig, chat_train_worker, output_dir, world_size_error
from ray_jobs.chat_stream import render_kwargs
from ray_jobs.ray_train import launch, stage_parser


def parser():
    return stage_parser(SFTConfig, __doc__)


def main(argv=None):
    return launch(argv, parser=parser(), stage="sft", config_cls=SFTConfig, worker_fn=chat_train_worker,
                  output_dir=output_dir, worker_kwargs=render_kwargs,
                  world_size_error=lambda cfg, root, size, max_size: world_size_error(cfg, size))


if __name__ == "__main__":
    main()
