"""
Serving load test: requests/s, output tokens/s, time to first token and inter-token latency (p50/p99) at several
concurrency levels, and the throughput ratio of the highest level to 1 client (continuous batching at work).

    python -m bench.bench_serve                          # in-process scheduler, random-weight model
    python -m bench.bench_serve --depth 6 --max-tokens 128 --concurrency 1,4,16
    python -m bench.bench_serve --url http://127.0.0.1:8000 [--api-key KEY]   # a running server, over HTTP (SSE)
    python -m bench.bench_serve --mixed 64 [--url URL]   # 64 concurrent streams over SSE, OpenAI SSE and WebSocket,
                                                          # a third disconnecting mid-stream
    python -m bench.bench_serve --workload multi-turn --turns 10 [--request-rate 2] [--max-concurrency 8]
    python -m bench.bench_serve --workload shared-prefix | single [--url URL]   # vLLM's benchmark report
    python -m bench.bench_serve --long-prompt 2000 --seq-len 4096   # ITL of running streams while it prefills
    python -m bench.bench_serve --constrained 4 [--streams 4]   # free streams' ITL beside 4 JSON-schema-constrained
                                                                # streams vs beside 4 free ones (the mask's cost)

--workload (bench/serve_load.py) runs in-process against our scheduler with and without the prefix cache and
against nanochat's way of serving (one request at a time per worker, Engine.generate), and prints the ratios.

Each client sends its requests one after another (streaming) until the level's request count is done, so the
load is bounded; --url must be a loopback address. The in-process model has random weights with special tokens
masked, so every reply runs to --max-tokens. --mixed without --url serves the in-process model over real HTTP (uvicorn,
the app without Ray) and afterwards reports whether every batch row was freed. Last line: one JSON object.
"""
import argparse
import asyncio
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from urllib.parse import urlparse

from bench.serve_load import (Http, InProcess, OneAtATime, free_rows_itl, long_prompt_itl, percentile, run_workload,
                              summarize)


def build_local(args):
    """A random-weight model (special tokens masked, so every reply runs to max_tokens) and a tokenizer (trained on
    enough text for a 65536 vocabulary)."""
    import torch
    from bench.bench_structured import training_text
    from nanochat.common import autodetect_device_type
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import RustBPETokenizer
    device = torch.device(args.device or autodetect_device_type())
    tokenizer = RustBPETokenizer.train_from_iterator(iter(training_text()), args.vocab_size)
    config = GPTConfig.from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                  sequence_len=args.seq_len, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    with torch.no_grad():  # random weights: some signal in the projections, and never a special token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.lm_head.weight[min(tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()):] = 0
    return model, tokenizer, str(device), config


def local_scheduler(args, model, tokenizer, max_batch, prefix_cache=True):
    """The in-process server, not started."""
    from serve.scheduler import Scheduler
    return Scheduler(model, tokenizer, max_batch=max_batch, max_waiting=10**6, prefix_cache=prefix_cache,
                     kv_cache_bytes=int(args.kv_cache_mb * 2**20) or None, prefill_chunk=args.prefill_chunk,
                     prefill_slowdown=args.prefill_slowdown)


# -----------------------------------------------------------------------------
# over HTTP: a running server's OpenAI route, streamed

def check_loopback(url):
    host = urlparse(url).hostname
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"--url must point at this machine (loopback), got {host} -> {sorted(addresses)}")


# -----------------------------------------------------------------------------
# mixed load: every streaming route at once, some clients walking away mid-stream

async def _stream_once(session, url, kind, index, max_tokens, api_key, disconnect_after):
    """One client. Returns {kind, status, ttft, tokens, done, disconnected, error}."""
    import aiohttp
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = dict(kind=kind, status=None, ttft=None, tokens=0, done=False, disconnected=False, error=None)
    message = f"load {index}: {PROMPTS[index % len(PROMPTS)]}"
    start, seen = time.perf_counter(), 0

    def on_text():
        nonlocal seen
        seen += 1
        if out["ttft"] is None:
            out["ttft"] = time.perf_counter() - start
        return disconnect_after is not None and seen >= disconnect_after

    if kind == "ws":
        async with session.ws_connect(url.replace("http", "ws", 1) + "/ws", headers=headers) as ws:
            out["status"] = 101
            await ws.send_json({"message": message, "max_tokens": max_tokens, "temperature": 0})
            async for msg in ws:
                event = json.loads(msg.data)
                if "token" in event and on_text():
                    out["disconnected"] = True
                    break
                if "error" in event:
                    out["status"], out["error"] = event.get("status"), event["error"]
                    break
                if event.get("done"):
                    out["done"], out["tokens"] = True, event["usage"]["completion_tokens"]
                    break
        return out
    if kind == "chat-sse":
        route, body = "/chat", {"message": message, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    else:
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": message}],
                                               "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                               "stream_options": {"include_usage": True}}
    async with session.post(url + route, json=body, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=600)) as r:
        out["status"] = r.status
        if r.status != 200:
            out["error"] = (await r.text())[:200]
            return out
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = str(event["error"])[:200]
                break
            text = event.get("token") or any(c["delta"].get("content") for c in event.get("choices", []))
            if text and on_text():
                out["disconnected"] = True
                break  # leaving the block closes the connection
            if event.get("usage") and (event.get("done") or not event.get("choices")):
                out["done"], out["tokens"] = True, event["usage"]["completion_tokens"]
    return out


async def mixed_load(url, streams=64, max_tokens=32, api_key=None):
    """`streams` clients at once, round-robin over SSE /chat, SSE /v1/chat/completions and WebSocket /ws; one in
    three (of each kind) disconnects after its second text event. Returns the summary (see summarize_mixed)."""
    import aiohttp
    kinds = ("chat-sse", "openai-sse", "ws")
    connector = aiohttp.TCPConnector(limit=0)  # every stream its own connection
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        async def guarded(i):
            disconnect_after = 2 if (i // len(kinds)) % 3 == 0 else None
            try:
                return await _stream_once(session, url, kinds[i % len(kinds)], i, max_tokens, api_key,
                                          disconnect_after)
            except Exception as e:  # a refused or dropped connection is a failure of the server, not of the bench
                return dict(kind=kinds[i % len(kinds)], status=None, ttft=None, tokens=0, done=False,
                            disconnected=False, error=f"{type(e).__name__}: {e}")
        records = await asyncio.gather(*[guarded(i) for i in range(streams)])
    return summarize_mixed(records, time.perf_counter() - t0)


def summarize_mixed(records, wall):
    ttft = [r["ttft"] for r in records if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in records)
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    failed = [r for r in records if not r["done"] and not r["disconnected"]]
    return dict(streams=len(records), completed=sum(r["done"] for r in records),
                disconnected=sum(r["disconnected"] for r in records), failed=len(failed),
                statuses=dict(Counter(str(r["status"]) for r in records)),
                errors=[f"{r['kind']}: {r['status']} {r['error']}" for r in failed][:5],
                seconds=round(wall, 2), completion_tokens=tokens, tok_per_s=round(tokens / wall, 1),
                ttft_ms_p50=ms(percentile(ttft, 50)), ttft_ms_p99=ms(percentile(ttft, 99)))


class LocalServer:
    """The serve app without Ray, on uvicorn in a thread at a free loopback port: real HTTP and WebSocket."""

    def __init__(self, app):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    ws="websockets-sansio", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("local server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_mixed(args, model=None, tokenizer=None):
    if args.url:
        return asyncio.run(mixed_load(args.url, args.mixed, args.max_tokens, args.api_key)), {}
    from serve.api import make_api
    from serve.app import ServeConfig
    from serve.service import ChatService
    cfg = ServeConfig(max_batch=args.max_batch, max_waiting=max(64, args.mixed))
    service = ChatService(cfg, model, tokenizer)
    try:
        with LocalServer(make_api(service)) as server:
            summary = asyncio.run(mixed_load(server.url, args.mixed, args.max_tokens))
        deadline = time.time() + 30  # cancellations of the disconnected streams land within a step or two
        while (service.scheduler.rows or service.scheduler.waiting) and time.time() < deadline:
            time.sleep(0.05)
        stats = service.scheduler.snapshot()
        return summary, dict(active_after=stats["active"], waiting_after=stats["waiting"],
                             cancelled=stats["cancelled"])
    finally:
        service.close()


def run_workloads(args, model=None, tokenizer=None):
    """vLLM-style runs of one workload: over HTTP (--url), or in-process against our scheduler with and without
    the prefix cache and against nanochat's one-request-at-a-time serving; prints a table and the ratios."""
    kwargs = dict(num_prompts=args.num_prompts, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                  turns=args.turns, system_repeats=args.system_repeats, max_tokens=args.max_tokens,
                  temperature=args.temperature)
    if args.url:
        targets = {f"server at {args.url}, X-Session-Id per conversation":
                   lambda: (Http(args.url, args.api_key, sessions=True), None),
                   f"server at {args.url}, no session header": lambda: (Http(args.url, args.api_key, sessions=False),
                                                                          None)}
    else:
        def ours(prefix_cache):
            def make():
                s = local_scheduler(args, model, tokenizer, args.max_batch, prefix_cache).start()
                return InProcess(s, tokenizer), s
            return make

        def one_at_a_time():
            server = OneAtATime(model, tokenizer, workers=args.baseline_workers)
            return InProcess(server, tokenizer), server
        targets = {"ours": ours(True), "ours, no prefix cache": ours(False),
                   f"one at a time x{args.baseline_workers} (nanochat chat_web)": one_at_a_time}
    results = {}
    for i, (name, make) in enumerate(targets.items()):
        target, server = make()
        try:  # a server at --url keeps its cache between runs: each run sends conversations of its own
            records, wall = asyncio.run(run_workload(target, args.workload, seed=i if args.url else 0, **kwargs))
        finally:
            if server is not None:
                server.stop()
        results[name] = summarize(records, wall)
        r = results[name]
        print(f"{name:40s} {r['completed']:4d} ok {r['failed']:3d} failed  {r['request_throughput']:6.2f} req/s "
              f"{r['output_tok_per_s']:8.1f} tok/s  TTFT mean/p50/p99 {r['ttft_ms_mean']}/{r['ttft_ms_p50']}/"
              f"{r['ttft_ms_p99']} ms  TPOT {r['tpot_ms_mean']}/{r['tpot_ms_p50']}/{r['tpot_ms_p99']}  "
              f"ITL {r['itl_ms_mean']}/{r['itl_ms_p50']}/{r['itl_ms_p99']}  cached {r['cached_tokens']}/"
              f"{r['prompt_tokens']} prompt tokens", flush=True)
        if "ttft_ms_mean_by_turn" in r:
            print(f"{'':40s} TTFT mean by turn (ms): {r['ttft_ms_mean_by_turn']}", flush=True)
    ratios = {}
    if not args.url:
        names = list(results)
        ours_, off, base = (results[n] for n in names)
        ratios = dict(output_tok_per_s_vs_one_at_a_time=round(ours_["output_tok_per_s"] / base["output_tok_per_s"], 2),
                      ttft_mean_one_at_a_time_over_ours=round(base["ttft_ms_mean"] / ours_["ttft_ms_mean"], 2),
                      ttft_mean_no_cache_over_cache=round(off["ttft_ms_mean"] / ours_["ttft_ms_mean"], 2))
        if "ttft_ms_mean_by_turn" in ours_:
            ratios["last_turn_ttft_no_cache_over_cache"] = round(
                off["ttft_ms_mean_by_turn"][-1] / ours_["ttft_ms_mean_by_turn"][-1], 2)
        print("ratios: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    return results, ratios


def run_long_prompt(args, model, tokenizer):
    """The scheduler runs on this thread, the one that built the model, as the server runs it (two OpenMP thread
    teams on the same cores make decoding's pace erratic); the measuring client runs on another."""
    scheduler = local_scheduler(args, model, tokenizer, args.max_batch)
    out = {}

    def measure():
        try:
            out.update(long_prompt_itl(scheduler, tokenizer, streams=args.streams, long_tokens=args.long_prompt,
                                       max_tokens=args.seq_len // 2))
        finally:
            scheduler.stop(timeout=0)
    client = threading.Thread(target=measure)
    scheduler.run(on_ready=client.start)
    client.join()
    print(f"{out['streams']} streams decoding while a {out['long_prompt_tokens']}-token prompt arrives "
          f"(prefill chunk {args.prefill_chunk}, slowdown {args.prefill_slowdown}): ITL median {out['itl_ms_p50']} ms, "
          f"p99 while prefilling {out['itl_ms_p99_while_prefilling']} ms ({out['p99_over_median']}x), long prompt TTFT "
          f"{out['long_ttft_ms']} ms")
    return out


def run_constrained(args, model, tokenizer):
    """Rounds alternating the two batches (constrained others / free others), on the scheduler's own thread as in
    run_long_prompt: the free streams' median ITL each way, and the slowdown."""
    scheduler = local_scheduler(args, model, tokenizer, args.max_batch)
    itl = {True: [], False: []}

    def measure():
        try:
            free_rows_itl(scheduler, tokenizer, args.streams, args.constrained, True, 16)  # warm-up, grammar compile
            for _ in range(args.rounds):
                for constrained in (False, True):
                    itl[constrained].append(free_rows_itl(scheduler, tokenizer, args.streams, args.constrained,
                                                          constrained, args.max_tokens))
        finally:
            scheduler.stop(timeout=0)
    client = threading.Thread(target=measure)
    scheduler.run(on_ready=client.start)
    client.join()
    free, constrained = percentile(itl[False], 50), percentile(itl[True], 50)
    out = dict(free_streams=args.streams, others=args.constrained, rounds=args.rounds,
               itl_ms_beside_free=round(1000 * free, 3), itl_ms_beside_constrained=round(1000 * constrained, 3),
               slowdown=round(constrained / free, 3))
    print(f"{args.streams} free streams beside {args.constrained} others: ITL median {out['itl_ms_beside_free']} ms "
          f"when the others are free, {out['itl_ms_beside_constrained']} ms when they are JSON-schema constrained: "
          f"{out['slowdown']}x")
    return out


PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 12*34?", "Tell me a joke.",
           "Explain recursion in one sentence.", "List three prime numbers.", "What is the capital of France?",
           "Summarize the plot of Hamlet."]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (levels mode)")
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    parser.add_argument("--depth", type=int, default=4, help="in-process model depth")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="in-process model width / depth")
    parser.add_argument("--head-dim", type=int, default=128, help="in-process model head size")
    parser.add_argument("--seq-len", type=int, default=1024, help="in-process model context")
    parser.add_argument("--vocab-size", type=int, default=4096, help="in-process tokenizer vocabulary")
    parser.add_argument("--device", default=None, help="in-process device (default: autodetect)")
    parser.add_argument("--url", default=None, help="benchmark a running server instead (loopback only)")
    parser.add_argument("--api-key", default=None, help="Bearer key of the server at --url")
    parser.add_argument("--mixed", type=int, default=0,
                        help="instead of levels: this many concurrent streams over SSE, OpenAI SSE and WebSocket, "
                             "a third disconnecting mid-stream")
    parser.add_argument("--max-batch", type=int, default=16, help="requests running at once in the in-process server")
    parser.add_argument("--kv-cache-mb", type=float, default=0, help="in-process KV budget (0: the default)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="in-process prompt tokens per step at most")
    parser.add_argument("--prefill-slowdown", type=float, default=2.0,
                        help="in-process: a step with a prompt chunk takes at most this many decode steps (0: off)")
    parser.add_argument("--workload", choices=["single", "shared-prefix", "multi-turn"], default=None,
                        help="vLLM-style run of this workload (ours with and without prefix cache, and nanochat's "
                             "one-request-at-a-time serving; or the server at --url)")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests (multi-turn: conversations)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second of requests (multi-turn: of conversations); inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--turns", type=int, default=10, help="turns per conversation (multi-turn)")
    parser.add_argument("--system-repeats", type=int, default=8,
                        help="length of the shared system prompt, in repeats of a ~35-token text (shared-prefix)")
    parser.add_argument("--baseline-workers", type=int, default=1,
                        help="workers of the one-request-at-a-time baseline (nanochat: one per GPU)")
    parser.add_argument("--long-prompt", type=int, default=0,
                        help="instead: ITL of --streams running streams while a prompt of this many tokens arrives")
    parser.add_argument("--streams", type=int, default=4, help="running streams for --long-prompt; free streams for "
                                                               "--constrained")
    parser.add_argument("--constrained", type=int, default=0,
                        help="measure the free streams' ITL beside this many JSON-schema-constrained streams vs beside "
                             "as many free ones")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for --constrained")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.url:
        check_loopback(args.url)
    model, tokenizer, device, config = (None, None, None, None) if args.url else build_local(args)
    where = dict(mode="http", url=args.url) if args.url else dict(
        mode="in-process", device=device, depth=config.n_layer, n_embd=config.n_embd, seq_len=config.sequence_len,
        max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
        prefill_slowdown=args.prefill_slowdown)

    if args.constrained:
        out = run_constrained(args, model, tokenizer)
        print(json.dumps(dict(bench="serve-constrained", **where, max_tokens=args.max_tokens, **out)))
        return
    if args.long_prompt:
        out = run_long_prompt(args, model, tokenizer)
        print(json.dumps(dict(bench="serve-long-prompt", **where, **out)))
        return
    if args.workload:
        results, ratios = run_workloads(args, model, tokenizer)
        print(json.dumps(dict(bench="serve-workload", workload=args.workload, **where, num_prompts=args.num_prompts,
                              request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                              max_tokens=args.max_tokens, results=results, ratios=ratios)))
        return
    if args.mixed:
        summary, server = run_mixed(args, model, tokenizer)
        print(f"{summary['streams']} streams: {summary['completed']} completed, {summary['disconnected']} "
              f"disconnected, {summary['failed']} failed in {summary['seconds']}s; {summary['tok_per_s']} tok/s; "
              f"TTFT p50/p99 {summary['ttft_ms_p50']}/{summary['ttft_ms_p99']} ms; statuses {summary['statuses']}"
              + (f"; rows active/waiting afterwards {server['active_after']}/{server['waiting_after']}"
                 if server else ""))
        print(json.dumps(dict(bench="serve-mixed", url=args.url, max_tokens=args.max_tokens, **summary, **server)))
        return

    # levels: c clients, each sending its requests one after another (at most c in flight)
    scheduler = None if args.url else local_scheduler(args, model, tokenizer, max(args.concurrency)).start()
    target = Http(args.url, args.api_key, sessions=False) if args.url else InProcess(scheduler, tokenizer)
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature)
    if not args.url:
        asyncio.run(run_workload(target, "single", num_prompts=1, **options))  # warm-up
    levels = []
    for c in args.concurrency:
        records, wall = asyncio.run(run_workload(target, "single", num_prompts=c * args.requests_per_client,
                                                 max_concurrency=c, seed=c, **options))
        levels.append(s := dict(concurrency=c, **summarize(records, wall)))
        print(f"concurrency {c:3d}: {s['completed']:3d} requests in {s['seconds']:6.2f}s  "
              f"{s['request_throughput']:6.2f} req/s  {s['output_tok_per_s']:8.1f} tok/s  "
              f"TTFT p50/p99 {s['ttft_ms_p50']}/{s['ttft_ms_p99']} ms  "
              f"ITL p50/p99 {s['itl_ms_p50']}/{s['itl_ms_p99']} ms", flush=True)
    if scheduler is not None:
        stats = scheduler.snapshot()
        where.update(max_active=stats["max_active"], mean_occupancy=round(stats["mean_occupancy"], 2))
        scheduler.stop()
    base = next((s for s in levels if s["concurrency"] == 1), levels[0])
    top = levels[-1]
    ratio = round(top["output_tok_per_s"] / base["output_tok_per_s"], 2)
    print(f"throughput at concurrency {top['concurrency']} vs {base['concurrency']}: {ratio}x")
    print(json.dumps(dict(bench="serve", **where, max_tokens=args.max_tokens, levels=levels,
                          throughput_ratio=ratio, ratio_levels=[top["concurrency"], base["concurrency"]])))


if __name__ == "__main__":
    main()
