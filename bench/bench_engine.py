"""
Decode speed: Engine (prefill once, KV cache) vs naive GPT.generate (full re-forward per token), same model,
same prompt, greedy, exactly --new-tokens tokens each (special-token logits are zeroed so neither stops early).

    python bench/bench_engine.py --depth 4 --new-tokens 256
The model has nanochat's real vocabulary size (--vocab-size 32768) and the depth dial's shape. The tokenizer (only
used for the prompt and the special tokens) is trained on the fly on Python's bundled documentation (offline,
~0.5 MB of prose, --tokenizer-vocab 4096); the random model may emit ids beyond it, which are just ints here.
Last line: one JSON object.
"""
import argparse
import json
import time

import pydoc_data.topics
import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import RustBPETokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768, help="model vocabulary")
    parser.add_argument("--tokenizer-vocab", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=1, help="rows decoded in parallel by the engine")
    parser.add_argument("--device", default=autodetect_device_type())
    args = parser.parse_args()

    device = torch.device(args.device)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(pydoc_data.topics.topics.values()), args.tokenizer_vocab)
    config = GPTConfig.from_depth(args.depth, sequence_len=512, vocab_size=max(args.vocab_size,
                                                                              tokenizer.get_vocab_size()))
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    with torch.no_grad():  # random weights: give projections some signal, and never sample a special token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for s in tokenizer.get_special_tokens():
            model.lm_head.weight[tokenizer.encode_special(s)] = 0
    prompt = tokenizer.encode("The capital of France is", prepend="<|bos|>")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    engine = Engine(model, tokenizer)
    engine_tokens, engine_dt = timed(lambda: [col[0] for col, _ in engine.generate(
        prompt, num_samples=args.num_samples, max_tokens=args.new_tokens, temperature=0.0)])
    naive_tokens, naive_dt = timed(lambda: list(model.generate(prompt, args.new_tokens, temperature=0.0)))
    assert len(engine_tokens) == len(naive_tokens) == args.new_tokens
    result = dict(bench="decode", device=str(device), depth=args.depth, vocab=config.vocab_size,
                  prompt_tokens=len(prompt), new_tokens=args.new_tokens, num_samples=args.num_samples,
                  engine_tok_per_sec=round(args.new_tokens * args.num_samples / engine_dt, 1),
                  naive_tok_per_sec=round(args.new_tokens / naive_dt, 1),
                  speedup=round(naive_dt / engine_dt * args.num_samples, 2),
                  outputs_identical=engine_tokens == naive_tokens)
    print(f"engine {result['engine_tok_per_sec']} tok/s vs naive {result['naive_tok_per_sec']} tok/s "
          f"-> {result['speedup']}x (identical greedy outputs: {result['outputs_identical']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
