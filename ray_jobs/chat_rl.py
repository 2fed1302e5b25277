"""
RL on GSM8K on Ray Train: on-policy REINFORCE from the SFT model, rollouts and updates on the same workers.

    python -m ray_jobs.chat_rl [--storage ROOT] [--num-workers N] [--use-gpu] [--source sft|mid|DIR|owner/name]
        [--model-tag TAG] [--model-step S] [--task-data DIR] [--num-iterations K] [--examples-per-step E]
        [--num-samples S] [--max-new-tokens T] [--temperature X] [--top-k K] [--init-lr-frac F]
        [--eval-every N] [--eval-examples N] [--save-every N] [--resume] ...

Reads ROOT/chatsft_checkpoints/<tag> (or mid with --source mid), writes ROOT/chatrl_checkpoints/<tag>/ (nanochat
layout) with metrics.jsonl, and the report card's "Chat RL" section (final pass@k; GSM8K = pass@1). --source may
also be a model directory or a Hugging Face Hub repo (nanochat.hub); the output's tag is then --model-tag, else the
directory's or repo's name.
Every flag of nanochat.chat_rl.RLConfig is accepted.
"""
from nanochat.chat_rl import RLConfig, chat_rl_worker, log_report, output_dir, world_size_error
from ray_jobs.chat_stream import render_kwargs
from ray_jobs.ray_train import launch, stage_parser


def parser():
    return stage_parser(RLConfig, __doc__)


def main(argv=None):
    return launch(argv, parser=parser(), stage="rl", config_cls=RLConfig, worker_fn=chat_rl_worker,
                  output_dir=output_dir, worker_kwargs=render_kwargs, after=log_report,
                  world_size_error=lambda cfg, root, size, max_size: world_size_error(cfg, size))


if __name__ == "__main__":
    main()
