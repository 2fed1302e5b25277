"""
Train the BPE tokenizer: rustbpe on the first --max-chars characters of the train split, each document
cropped to --doc-cap characters. Writes ROOT/tokenizer/tokenizer.pkl + token_bytes.pt (nanochat's own format).

    python -m ray_jobs.tok_train [--data SOURCE] [--vocab-size 32768] [--max-chars 2e9] [--doc-cap 10000] \
        [--storage ROOT]

SOURCE: 'hub' (the downloaded shards, default), 'auto' (hub shards, else the shipped fallback corpus), 'fallback',
or a file / dir / glob of .parquet, .txt, .jsonl(.gz) files. Training is one Ray task (num_cpus=1) on one node: BPE
training is a single in-memory job (rustbpe counts the text with its own threads, then merges serially), so the task
streams the text straight from the source; nothing is gained by splitting it. The driver gets the trained tokenizer
back and saves it, so ROOT only has to be writable from where the job is launched.
"""
import logging
import sys
import time
from dataclasses import dataclass

from nanochat import storage
from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag
from ray_jobs.common import init_ray

logger = logging.getLogger("tok_train")

ROUND_TRIP_TEXT = "Hello world! 123 + 4567 = 4690. Ünïcödé: 你好世界, 안녕하세요, Привет, 🚀✨ <|bos|> \t tabs\n\nend"


def training_text(source, max_chars, doc_cap, stats):
    """The train split's documents in unit order, each cropped to doc_cap chars, until max_chars are reached."""
    for unit in source.units("train"):
        for doc in source.read_unit(unit):
            doc = doc[:doc_cap]
            stats["docs"] += 1
            stats["chars"] += len(doc)
            yield doc
            if stats["chars"] >= max_chars:
                return


def train_tokenizer(source, vocab_size, max_chars, doc_cap):
    """Runs inside the Ray task: (tokenizer, {"docs", "chars", "train_time"})."""
    from nanochat.tokenizer import RustBPETokenizer
    stats = {"docs": 0, "chars": 0}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(training_text(source, max_chars, doc_cap, stats), vocab_size)
    stats["train_time"] = time.time() - t0
    return tokenizer, stats


@dataclass
class TokTrainConfig(ArgsMixin):
    data: str = flag("hub", "hub | auto | fallback | a file, dir or glob of .parquet, .txt, .jsonl(.gz)")
    vocab_size: int = flag(32768, "including the 9 special tokens")
    max_chars: float = flag(2e9, "characters of text to train on")
    doc_cap: int = flag(10_000, "crop each document to this many characters")
    storage: str | None = storage_flag()


def parser():
    return TokTrainConfig.parser(__doc__)


def main(argv=None):
    args = TokTrainConfig.from_args(parser().parse_args(argv))
    max_chars = int(args.max_chars)

    root = get_base_dir(args.storage)
    from nanochat.dataset import resolve_source
    try:
        source = resolve_source(args.data, base_dir=root)  # 'hub': the shards under this root
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\nhint: or train on the shipped corpus with --data fallback") from None
    logger.info("training a %d-token vocabulary on up to %s chars of %s (docs cropped to %d chars)",
                args.vocab_size, f"{max_chars:,}", source.description, args.doc_cap)

    ray = init_ray()
    task = ray.remote(num_cpus=1)(train_tokenizer)
    try:
        tokenizer, stats = ray.get(task.remote(source, args.vocab_size, max_chars, args.doc_cap))
    except ValueError as e:  # Ray re-raises the task's ValueError as a subclass of it
        cause = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
        raise ValueError(f"{cause}\nhint: lower --vocab-size (now {args.vocab_size}), or train on more text "
                         f"(--max-chars, a bigger --data source)") from None

    encoded = tokenizer.encode(ROUND_TRIP_TEXT)
    assert tokenizer.decode(encoded) == ROUND_TRIP_TEXT, "tokenizer round trip failed"
    path = storage.join(root, "tokenizer")
    tokenizer.save(path)

    token_bytes = tokenizer.compute_token_bytes().float()
    n_special = len(tokenizer.get_special_tokens())
    regular = token_bytes[token_bytes > 0]
    result = {
        "tokenizer_dir": path, "source": source.description, "vocab_size": tokenizer.get_vocab_size(),
        "num_special_tokens": n_special, "train_docs": stats["docs"], "train_chars": stats["chars"],
        "train_time": round(stats["train_time"], 2),
        "token_bytes_min": int(regular.min()), "token_bytes_max": int(regular.max()),
        "token_bytes_mean": round(regular.mean().item(), 3), "token_bytes_std": round(regular.std().item(), 3),
        "round_trip_tokens": len(encoded),
    }
    logger.info("trained in %.1fs on %s chars (%d docs); saved to %s", stats["train_time"],
                f"{stats['chars']:,}", stats["docs"], path)
    logger.info("token bytes over %d regular tokens: min %d, max %d, mean %.2f, std %.2f (%d special tokens)",
                len(regular), result["token_bytes_min"], result["token_bytes_max"], result["token_bytes_mean"],
                result["token_bytes_std"], n_special)
    from nanochat.report import get_report
    get_report(root).log("Tokenizer training", {"max_chars": max_chars, "doc_cap": args.doc_cap, **result})
    print(result)
    return result


if __name__ == "__main__":
    from nanochat.common import setup_default_logging
    setup_default_logging()
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        sys.exit(1)
