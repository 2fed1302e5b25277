"""
Data pipeline speed on the shipped fallback corpus:
1. tokenization throughput (tokens/s): tiktoken's raw encode_ordinary_batch on one core, vs the Ray Data stream
   (read tasks -> tokenizer actor pool -> in-order chunks on the consumer) with 1 and 2 CPU actors;
2. the fraction of a training step a worker spends waiting for data: a plain-process training loop (depth 4,
   MuonAdamW) fed by the Ray Data loader, time blocked in next(loader) over total step time, after warm-up.
   The plain (no Ray) loader is measured the same way for reference.

    python bench/bench_data.py [--storage ROOT] [--depth 4] [--seq-len 512] [--device-batch-size 4] [--steps 10]
Uses ROOT's tokenizer if there is one, else trains a --vocab-size one on the fallback corpus (about a second).
Ray: connects to RAY_ADDRESS if set, else starts a local Ray. Last line printed: one JSON object with the numbers.
"""
import argparse
import json
import os
import time

import torch

from nanochat import cuda_runtime
from nanochat.common import autodetect_device_type, get_base_dir
from nanochat.dataloader import StreamCursor
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as plain_loader
from nanochat.dataset import resolve_source
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
from ray_jobs.common import init_ray
from ray_jobs.data_stream import ray_data_loader_with_state, ray_document_batches


def load_or_train_tokenizer(root, vocab_size, source):
    try:
        return get_tokenizer(root), "storage root"
    except FileNotFoundError:
        docs = (d[:10_000] for u in source.units("train") for d in source.read_unit(u))
        return RustBPETokenizer.train_from_iterator(docs, vocab_size), "trained on the fallback corpus"


def raw_tiktoken(enc, docs, repeats=3):
    """Best of `repeats` single-thread batch encodes of all docs (+1 BOS per doc, as the pipeline counts)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(t) + 1 for t in enc.encode_ordinary_batch(docs, num_threads=1))
        best = min(best, time.perf_counter() - t0)
    return n / best


def ray_stream(tokenizer, source, num_actors, epochs):
    """(tokens/s after the first chunk arrived, tokens/s including the job start, tokens, startup s)."""
    units = source.units("train")
    cursor = StreamCursor(len(units), fingerprint=source.fingerprint("train"))
    t0 = time.perf_counter()
    t_first, n = None, 0
    for docs, unit, unit_done in ray_document_batches(tokenizer, source, units, cursor, 128, num_epochs=epochs,
                                                      num_actors=num_actors):
        if t_first is None:
            t_first = time.perf_counter()
        n += sum(map(len, docs))
        cursor.record(len(docs), unit_done, unit)
    t1 = time.perf_counter()
    return n / (t1 - t_first), n / (t1 - t0), n, t_first - t0


def data_wait(loader, model, opt, steps, warmup, device):
    """Fraction of step time spent blocked in next(loader), and the mean step time."""
    def sync():
        cuda_runtime.synchronize(device)
    waited = total = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y, _ = next(loader)
        t1 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            waited += t1 - t0
            total += t2 - t0
    loader.close()
    return waited / total, total / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=None)
    parser.add_argument("--vocab-size", type=int, default=32768, help="when a tokenizer has to be trained")
    parser.add_argument("--epochs", type=int, default=10, help="fallback epochs per throughput run (~0.7 M tokens each)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=autodetect_device_type())
    args = parser.parse_args()

    root = get_base_dir(args.storage)
    source = resolve_source("fallback")
    tokenizer, tok_origin = load_or_train_tokenizer(root, args.vocab_size, source)
    docs = [d for u in source.units("train") for d in source.read_unit(u)]
    result = {"bench": "data", "cpus": os.cpu_count(), "vocab_size": tokenizer.get_vocab_size(),
              "tokenizer": tok_origin, "corpus_docs": len(docs)}

    result["tiktoken_1core_tok_s"] = round(raw_tiktoken(tokenizer.enc, docs))
    print(f"tiktoken encode_ordinary_batch, 1 thread: {result['tiktoken_1core_tok_s']:,} tok/s")

    ray = init_ray()
    result["ray_cpus"] = ray.cluster_resources().get("CPU")
    for n_actors in (1, 2):
        steady, overall, n, startup = ray_stream(tokenizer, source, n_actors, args.epochs)
        result[f"ray_{n_actors}actor_tok_s"] = round(steady)
        result[f"ray_{n_actors}actor_tok_s_incl_startup"] = round(overall)
        result[f"ray_{n_actors}actor_startup_s"] = round(startup, 2)
        print(f"Ray Data stream, {n_actors} actor(s): {steady:,.0f} tok/s once running "
              f"({overall:,.0f} including {startup:.1f}s job start; {n:,} tokens)")

    device = torch.device(args.device)
    B, T = args.device_batch_size, args.seq_len
    config = GPTConfig.from_depth(args.depth, sequence_len=T, vocab_size=tokenizer.get_vocab_size())
    model = build_model(config, device)
    opt = model.setup_optimizer()
    common = dict(split="train", device=device, source=source, rank=0, world_size=1)
    for name, loader in [("ray", ray_data_loader_with_state(tokenizer, B, T, num_actors=1, **common)),
                         ("plain", plain_loader(tokenizer, B, T, **common))]:
        frac, step = data_wait(loader, model, opt, args.steps, args.warmup, device)
        result[f"{name}_data_wait_pct"] = round(100 * frac, 3)
        result[f"{name}_step_ms"] = round(1000 * step, 1)
        print(f"depth {args.depth}, B={B}, T={T} on {device}, {name} loader: {1000 * step:.0f} ms/step, "
              f"{100 * frac:.3f}% of it waiting for data")
    result.update(device=str(device), depth=args.depth, batch=B, seq_len=T, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
