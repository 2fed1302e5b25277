"""
Rebuild the offline fallback corpus shipped in this folder (gutenberg_train.jsonl.gz, gutenberg_val.jsonl.gz).

Input: the NLTK "Project Gutenberg Selections" corpus as JSON lines ({"id", "text"} per book), e.g. the copy
staged at shared/data/pretrain/gutenberg_nltk.jsonl.gz. The texts are public domain. Usage:

    python -m nanochat.data.build_fallback_corpus path/to/gutenberg_nltk.jsonl.gz

Each book is cut into documents at paragraph boundaries (never inside a paragraph), with target lengths drawn
from a seeded RNG so documents vary in length like web pages do (which is what best-fit packing is built for).
The last ~8% of each book's documents go to the validation file, so val is held-out text of every author.
Output is deterministic (fixed seed, gzip mtime 0).
"""
import gzip
import json
import os
import random
import re
from dataclasses import dataclass

from nanochat.flags import ArgsMixin, flag

# A subset of the 12 books, chosen so the two gzipped files stay under ~1.3 MB together.
BOOKS = [
    "austen-emma", "austen-persuasion", "chesterton-brown", "melville-moby_dick",
    "shakespeare-hamlet", "shakespeare-macbeth", "blake-poems",
]
MIN_CHARS, MAX_CHARS = 300, 6000  # range of target document lengths
VAL_FRACTION = 0.08
SEED = 1234


def split_book(text, rng):
    text = text.replace("\r\n", "\n")
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs, current, target = [], [], rng.randint(MIN_CHARS, MAX_CHARS)
    for p in paragraphs:
        current.append(p)
        if sum(len(x) for x in current) >= target:
            docs.append("\n\n".join(current))
            current, target = [], rng.randint(MIN_CHARS, MAX_CHARS)
    if current:
        docs.append("\n\n".join(current))
    return docs


def write_jsonl_gz(path, rows):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


@dataclass
class BuildConfig(ArgsMixin):
    src: str = flag(None, "the NLTK Gutenberg corpus as JSON lines (gutenberg_nltk.jsonl.gz)", positional=True,
                    required=True)
    out_dir: str = flag(os.path.dirname(os.path.abspath(__file__)), "where the two files are written")


def main(argv=None):
    args = BuildConfig.parse(argv, __doc__)
    books = {}
    with gzip.open(args.src, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            books[row["id"].split("/")[-1]] = row["text"]
    rng = random.Random(SEED)
    train, val = [], []
    for name in BOOKS:
        docs = split_book(books[name], rng)
        n_val = max(1, round(len(docs) * VAL_FRACTION))
        for i, doc in enumerate(docs):
            row = {"id": f"gutenberg/{name}/{i:04d}", "text": doc}
            (val if i >= len(docs) - n_val else train).append(row)
    write_jsonl_gz(os.path.join(args.out_dir, "gutenberg_train.jsonl.gz"), train)
    write_jsonl_gz(os.path.join(args.out_dir, "gutenberg_val.jsonl.gz"), val)
    for split, rows in (("train", train), ("val", val)):
        print(f"{split}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")


if __name__ == "__main__":
    main()
