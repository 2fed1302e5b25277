"""
Rebuild the small offline task pack shipped in nanochat/data/tasks/ (used by the demo when neither the
HuggingFace Hub nor ../shared/data is available). Input: a directory laid out like ../shared/data. Usage:

    python -m nanochat.data.build_task_data path/to/shared/data

It copies the first rows of each file (gzip, mtime 0), keeping the layout, so tasks/ and core_eval read it
exactly like the full copy. Row counts are in ROWS / CORE_TASKS below; licenses are in tasks/README.md.
"""
import gzip
import os
import re
from dataclasses import dataclass

from nanochat.flags import ArgsMixin, flag

ROWS = {  # relative path -> rows kept (None = all)
    "chat/chatterbot_english_conversations.jsonl.gz": None,
    "chat/fastchat_reference_conversations.jsonl.gz": None,
    "gsm8k/train.jsonl.gz": 800,
    "gsm8k/test.jsonl.gz": 200,
    "arc/ARC-Easy/train.jsonl.gz": 500,
    "arc/ARC-Easy/test.jsonl.gz": 200,
    "arc/ARC-Challenge/train.jsonl.gz": 300,
    "arc/ARC-Challenge/test.jsonl.gz": 150,
    "mmlu/dev.jsonl.gz": None,
    "mmlu/test.jsonl.gz": 300,
}
CORE_ROWS = 60
# short prompts only (0-shot, or 10-shot with short items): CORE must stay quick on a CPU
CORE_TASKS = ["arc_easy", "copa", "piqa", "lambada_openai", "winograd", "bigbench_operators", "openbook_qa"]


def copy_rows(src, dst, n):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    with open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write("".join(lines if n is None else lines[:n]).encode("utf-8"))


def core_subset(src_dir, dst_dir):
    """core.yaml entries of CORE_TASKS only (text surgery keeps the original comments and formatting)."""
    text = open(os.path.join(src_dir, "core.yaml"), encoding="utf-8").read()
    head, *entries = text.split("\n-\n")
    keep = [e for e in entries if re.search(r"label: (\S+)", e).group(1) in CORE_TASKS]
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("\n-\n".join([head] + keep).rstrip() + "\n")
    with open(os.path.join(src_dir, "eval_meta_data.csv"), "rb") as f, \
            open(os.path.join(dst_dir, "eval_meta_data.csv"), "wb") as g:
        g.write(f.read())
    for entry in keep:
        uri = re.search(r"dataset_uri: (\S+)", entry).group(1)
        copy_rows(os.path.join(src_dir, "eval_data", uri + ".gz"), os.path.join(dst_dir, "eval_data", uri + ".gz"),
                  CORE_ROWS)


@dataclass
class BuildConfig(ArgsMixin):
    shared_data: str = flag(None, "a directory laid out like nanochat's data dir (the full task files)",
                            positional=True, required=True)
    out: str = flag(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks"), "where the pack is written")


def main(argv=None):
    args = BuildConfig.parse(argv, __doc__)
    for rel, n in ROWS.items():
        copy_rows(os.path.join(args.shared_data, rel), os.path.join(args.out, rel), n)
    core_subset(os.path.join(args.shared_data, "core"), os.path.join(args.out, "core"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
