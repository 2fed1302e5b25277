"""
Chat SFT on Ray Train: supervised finetuning on conversations, loss on the assistant's tokens only (SPEC §10).

    python ray_jobs/chat_sft.py [--storage ROOT] [--num-workers N] [--use-gpu] [--source mid|base]
        [--model-tag TAG] [--model-step S] [--task-data DIR] [--num-iterations K] [--resume] ...

Reads ROOT/mid_checkpoints/<tag> (or base with --source base), writes ROOT/chatsft_checkpoints/<tag>/.
Same flags as mid_train.py (nanochat.chat_train.ChatTrainConfig).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from ray_jobs.mid_train import main as launch  # noqa: E402


def main(argv=None):
    return launch(argv, stage="sft")


if __name__ == "__main__":
    main()
