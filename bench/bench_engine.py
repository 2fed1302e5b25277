"""
Decode speed, same model and prompt, greedy, exactly --new-tokens tokens per row (special-token logits are zeroed
so nothing stops early):

- Engine.generate_batch (prefill once, KV cache, --num-samples rows decoded together) vs naive GPT.generate (full
  re-forward per token, batch 1);
- the serving scheduler decoding --num-samples requests of the same prompt at once: the same batch as the Engine,
  through continuous batching's per-row positions (its step should cost no more per token than the Engine's);
- with --compare-nanochat DIR (a checkout of karpathy/nanochat): nanochat's own Engine and ours on the same weights,
  each in a worker process of the same make (one script, only the import path differs: both packages are called
  `nanochat`), rounds alternated and their order flipped each round, so both see the same machine; the greedy
  tokens must be identical.

    python bench/bench_engine.py --depth 4 --new-tokens 256
    python bench/bench_engine.py --seq-len 128 --num-samples 4 --new-tokens 200 --compare-nanochat ~/nanochat
The model has nanochat's real vocabulary size (--vocab-size 32768) and the depth dial's shape. The tokenizer (only
used for the prompt and the special tokens) is trained on the fly on Python's bundled documentation (offline,
~0.5 MB of prose, --tokenizer-vocab 4096); the random model may emit ids beyond it, which are just ints here.
Last line: one JSON object.
"""
import argparse
import json
import statistics
import tempfile
import time

import pydoc_data.topics
import torch

from nanochat import cuda_runtime
from nanochat.common import autodetect_device_type
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import RustBPETokenizer
from side_by_side import REPO, CheckoutWorker, alternate, write_spec

# The worker's body (after side_by_side.WORKER_PRELUDE): each request is one timed Engine.generate_batch.
ENGINE_WORKER = r"""
from nanochat.engine import Engine
model.eval()
class Tokenizer:  # what the Engines ask of a tokenizer when no tool is used
    def encode_special(self, s): return spec["specials"][s]
    def get_special_tokens(self): return list(spec["specials"])
    def get_bos_token_id(self): return spec["specials"]["<|bos|>"]
    def turn_end_ids(self): return {spec["specials"][s] for s in spec["turn_end"]}
engine = Engine(model, Tokenizer())
for line in sys.stdin:
    t0 = time.perf_counter()
    rows, _ = engine.generate_batch(spec["prompt"], num_samples=spec["num_samples"], max_tokens=spec["new_tokens"],
                                    temperature=0.0)
    sync()
    reply({"seconds": time.perf_counter() - t0, "rows": rows})
"""


def engine_workers(checkouts, model, tokenizer, prompt, args, workdir):
    """One Engine worker per checkout, all on the bench's weights; each returns a run() -> (rows, seconds)."""
    specials = {s: tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    spec = write_spec(model.config, workdir, args.device, model.state_dict(), specials=specials, prompt=prompt,
                      turn_end=["<|bos|>", "<|assistant_end|>", "<|user_start|>", "<|user_end|>",
                                "<|assistant_start|>"],
                      num_samples=args.num_samples, new_tokens=args.new_tokens)
    return [CheckoutWorker(ENGINE_WORKER, checkout, spec) for checkout in checkouts]


class AnyIdTokenizer:
    """The tokenizer, but any id of the (larger) model vocabulary decodes to some bytes: the scheduler streams text,
    and the random model samples ids the small prompt tokenizer does not have."""

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab = tokenizer, tokenizer.get_vocab_size()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode_single_token_bytes(self, token):
        return self.tokenizer.decode_single_token_bytes(token % self.vocab)


def scheduler_decode(model, tokenizer, prompt, args):
    """num_samples requests of the prompt through the serving scheduler at once: (seconds, rows of tokens). The loop
    runs on this thread, which built the model, as a replica runs it (see Scheduler.run)."""
    from serve.scheduler import SamplingParams, Scheduler
    scheduler = Scheduler(model, AnyIdTokenizer(tokenizer), max_batch=args.num_samples, max_waiting=args.num_samples,
                          seq_len=len(prompt) + args.new_tokens + 1)
    done = []
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, top_k=0)

    def sink(ev):
        if ev.get("done"):
            done.append(ev)
            if len(done) == args.num_samples:
                scheduler.stop()  # the loop returns after this step
    scheduler.running = True  # accepts the requests before its loop starts
    requests = scheduler.submit_many([(prompt, params, sink)] * args.num_samples)
    t0 = time.perf_counter()
    scheduler.run()
    return time.perf_counter() - t0, [list(prompt) + r.generated for r in requests]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="model depth (the depth dial sets the width)")
    parser.add_argument("--seq-len", type=int, default=512, help="the model's sequence_len (its L-layer window)")
    parser.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern of the layers")
    parser.add_argument("--vocab-size", type=int, default=32768, help="model vocabulary")
    parser.add_argument("--tokenizer-vocab", type=int, default=4096, help="vocabulary of the prompt's tokenizer")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per row")
    parser.add_argument("--num-samples", type=int, default=1, help="rows decoded in parallel (Engine, scheduler)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each contender (median reported)")
    parser.add_argument("--compare-nanochat", default=None, metavar="DIR",
                        help="a nanochat checkout: also time its Engine on the same weights")
    parser.add_argument("--device", default=autodetect_device_type(), help="cpu | cuda | mps")
    args = parser.parse_args()

    device = torch.device(args.device)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(pydoc_data.topics.topics.values()), args.tokenizer_vocab)
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, window_pattern=args.window_pattern,
                                  vocab_size=max(args.vocab_size, tokenizer.get_vocab_size()))
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    with torch.no_grad():  # random weights: give projections some signal, and never sample a special token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for s in tokenizer.get_special_tokens():
            model.lm_head.weight[tokenizer.encode_special(s)] = 0
    prompt = tokenizer.encode("The capital of France is", prepend="<|bos|>")
    def sync():
        cuda_runtime.synchronize(device)
    new = args.new_tokens * args.num_samples

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    engine = Engine(model, tokenizer)

    def ours():
        return timed(lambda: engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.new_tokens,
                                                   temperature=0.0)[0])
    contenders = {"engine": ours, "scheduler": lambda: scheduler_decode(model, tokenizer, prompt, args)[::-1]}
    with tempfile.TemporaryDirectory() as workdir:
        workers = []
        if args.compare_nanochat:
            workers = engine_workers((REPO, args.compare_nanochat), model, tokenizer, prompt, args, workdir)
            for name, worker in zip(("ours_worker", "nanochat_worker"), workers):
                contenders[name] = lambda worker=worker: tuple(worker.run()[k] for k in ("rows", "seconds"))
        try:
            outputs, seconds = alternate(contenders, args.rounds)
        finally:
            for worker in workers:
                worker.close()
    naive_tokens, naive_dt = timed(lambda: list(model.generate(prompt, args.new_tokens, temperature=0.0)))
    assert all(len(r) == len(prompt) + args.new_tokens for r in outputs["engine"])

    tok_per_s = {name: round(new / statistics.median(s), 1) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name}: tok/s per round {[round(new / x) for x in s]}")
    result = dict(bench="decode", device=str(device), depth=args.depth, vocab=config.vocab_size,
                  seq_len=args.seq_len, window_pattern=args.window_pattern, prompt_tokens=len(prompt),
                  new_tokens=args.new_tokens, num_samples=args.num_samples, rounds=args.rounds,
                  engine_tok_per_sec=tok_per_s["engine"], scheduler_tok_per_sec=tok_per_s["scheduler"],
                  naive_tok_per_sec=round(args.new_tokens / naive_dt, 1),
                  speedup=round(naive_dt / statistics.median(seconds["engine"]) * args.num_samples, 2),
                  outputs_identical=outputs["engine"][0][len(prompt):] == naive_tokens,
                  scheduler_identical=outputs["scheduler"] == outputs["engine"])
    print(f"engine {result['engine_tok_per_sec']} tok/s, scheduler {result['scheduler_tok_per_sec']} tok/s "
          f"({args.num_samples} rows); naive {result['naive_tok_per_sec']} tok/s -> engine {result['speedup']}x "
          f"(identical greedy outputs: engine/naive {result['outputs_identical']}, "
          f"scheduler/engine {result['scheduler_identical']})")
    if workers:
        result.update(ours_worker_tok_per_sec=tok_per_s["ours_worker"],
                      nanochat_worker_tok_per_sec=tok_per_s["nanochat_worker"],
                      vs_nanochat=round(tok_per_s["ours_worker"] / tok_per_s["nanochat_worker"], 3),
                      nanochat_identical=outputs["nanochat_worker"] == outputs["ours_worker"] == outputs["engine"])
        print(f"in worker processes: our Engine {result['ours_worker_tok_per_sec']} tok/s, nanochat's "
              f"{result['nanochat_worker_tok_per_sec']} tok/s: ours {result['vs_nanochat']}x "
              f"(identical greedy outputs: {result['nanochat_identical']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
