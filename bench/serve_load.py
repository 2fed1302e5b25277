"""
Serving workloads in vLLM's benchmark terms, for bench/bench_serve.py: requests arrive as a Poisson process
(--request-rate, inf = all at once) with at most --max-concurrency in flight, and the report gives completed,
failed, request throughput, output tok/s, and TTFT / TPOT / ITL mean, p50 and p99.

Workloads (each request is a list of chat messages):
    single         one user question per request
    shared-prefix  a long system prompt shared by every request, then a short question
    multi-turn     conversations of --turns turns: each turn is sent once the previous reply is in, with the
                   whole conversation so far (as a chat client does), so turn k re-sends turns 1..k-1

A target is anything with submit(messages, SamplingParams, sink) -> request (with cancel()) whose sink gets the
scheduler's events (serve/scheduler.py): InProcess(the continuous-batching Scheduler, or OneAtATime below, which
serves the way nanochat's chat_web did: a pool of workers, each running Engine.generate for one request at a
time), or Http (a running server's streaming OpenAI route).
"""
import asyncio
import codecs
import queue
import random
import threading
import time
from dataclasses import dataclass, field

QUESTIONS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 12*34?", "Tell me a joke.",
             "Explain recursion in one sentence.", "List three prime numbers.", "What is the capital of France?",
             "Summarize the plot of Hamlet.", "How do bees make honey?", "Name a famous painter."]
SYSTEM = ("You are a helpful, careful assistant. Answer in plain words, keep replies short, say so when you do "
          "not know, never make up facts, and prefer examples over definitions. ")


def conversations(workload, num_prompts, turns, system_repeats, seed=0):
    """The requests of a workload as conversations: a list of lists of user messages (one list per conversation,
    one message per turn) plus the system prompt (or None)."""
    rng = random.Random(seed)
    system = SYSTEM * system_repeats if workload == "shared-prefix" else None
    if workload == "multi-turn":
        return [[f"{rng.choice(QUESTIONS)} (conversation {seed}-{c}, turn {t + 1})" for t in range(turns)]
                for c in range(num_prompts)], None
    return [[f"{rng.choice(QUESTIONS)} (request {seed}-{i})"] for i in range(num_prompts)], system


@dataclass
class Record:
    conversation: int
    turn: int
    prompt_tokens: int = 0
    ttft: float | None = None
    gaps: list = field(default_factory=list)  # inter-token latencies, one per token after the first
    e2e: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def run_workload(target, workload, num_prompts=32, request_rate=float("inf"), max_concurrency=None,
                       turns=10, system_repeats=8, max_tokens=32, temperature=0.0, seed=0):
    """Drive the target with the workload. -> (records, wall seconds)."""
    from serve.scheduler import SamplingParams
    convos, system = conversations(workload, num_prompts, turns, system_repeats, seed)
    limit = asyncio.Semaphore(max_concurrency or 10**9)
    loop = asyncio.get_running_loop()
    rng = random.Random(seed + 1)
    records = []

    async def one_request(messages, record, session):
        events = asyncio.Queue()
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + len(records))
        async with limit:
            start = time.perf_counter()
            last, parts = None, []
            try:
                req = target.submit(messages, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                                    session)
            except Exception as e:  # overloaded or refused
                record.error = f"{type(e).__name__}: {e}"
                return ""
            try:
                while True:
                    ev = await events.get()
                    now = time.perf_counter()
                    if ev.get("done"):
                        record.e2e, record.output_tokens = now - start, ev["completion_tokens"]
                        record.prompt_tokens, record.cached_tokens = ev["prompt_tokens"], ev["cached_tokens"]
                        if ev["finish_reason"] == "error":
                            record.error = ev.get("error") or "error"
                        return "".join(parts)
                    if ev["tokens"]:  # (a final flush of held-back text carries no new token)
                        if last is None:
                            record.ttft = now - start
                        else:
                            record.gaps.extend([(now - last) / ev["tokens"]] * ev["tokens"])
                        last = now
                    parts.append(ev["text"])
            finally:
                req.cancel()

    async def conversation(c, user_turns):
        messages = [{"role": "system", "content": system}] if system else []
        for t, text in enumerate(user_turns):
            messages.append({"role": "user", "content": text})
            record = Record(c, t)
            records.append(record)
            reply = await one_request(messages, record, f"conversation-{seed}-{c}")
            if record.error:
                return
            messages.append({"role": "assistant", "content": reply or " "})

    t0 = time.perf_counter()
    tasks = []
    for c, user_turns in enumerate(convos):
        tasks.append(asyncio.ensure_future(conversation(c, user_turns)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


def long_prompt_itl(server, tokenizer, streams=4, long_tokens=2000, max_tokens=256, settle=32):
    """Inter-token latency of `streams` running streams while one prompt of long_tokens arrives: p99 of their gaps
    that overlap the long prompt's prefill (its submission to its first token), against their median before it."""
    from serve.scheduler import SamplingParams
    log, texts = [], {"before": 0, "after": 0}
    settled, long_started, after = threading.Event(), threading.Event(), threading.Event()
    # (waiting on events: polling the log would take the GIL from the scheduler thread, into the gaps measured)

    def sink(name):
        def put(ev):  # called on the scheduler thread only
            log.append((time.perf_counter(), name, ev))
            if name == "long":
                long_started.set()
            elif "text" in ev:
                phase = "after" if long_started.is_set() else "before"
                texts[phase] += 1
                if texts["before"] >= streams * settle:
                    settled.set()
                if texts["after"] >= 2 * streams:  # every stream's gap across the prefill has ended
                    after.set()
        return put
    prompt = tokenizer.render_for_completion([{"role": "user", "content": QUESTIONS[0]},
                                              {"role": "assistant", "content": ""}])
    running = [server.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), sink(i))
               for i in range(streams)]
    words = tokenizer.encode(" ".join(QUESTIONS) * 200)[:long_tokens]
    settled.wait(120)
    t_submit = time.perf_counter()
    long = server.submit(words, SamplingParams(max_tokens=4, temperature=0.0), sink("long"))
    long_started.wait(120)
    after.wait(120)
    t_first = next(t for t, name, _ in list(log) if name == "long")
    for r in running + [long]:
        r.cancel()
    last, before, during = {}, [], []
    for t, name, ev in list(log):
        if name == "long" or "text" not in ev or not ev["tokens"]:
            continue
        if name in last:
            gap = (t - last[name]) / ev["tokens"]
            if t > t_submit and last[name] < t_first:  # a gap that overlaps the long prompt's prefill
                during.append(gap)
            elif t <= t_submit:
                before.append(gap)
        last[name] = t
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    median = percentile(before, 50)  # their pace with no prompt arriving
    return dict(streams=streams, long_prompt_tokens=len(words), long_ttft_ms=ms(t_first - t_submit),
                itl_ms_p50=ms(median), itl_ms_p99_while_prefilling=ms(percentile(during, 99)),
                itl_ms_max_while_prefilling=ms(max(during) if during else None),
                p99_over_median=round(percentile(during, 99) / median, 2) if during and median else None)


# a schema a random-weight model never finishes within a few hundred tokens: its rows stay in the batch throughout
OPEN_ENDED = {"type": "json_schema", "json_schema": {"name": "notes", "schema": {
    "type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}}, "required": ["notes"]}}}


def free_rows_itl(server, tokenizer, free=4, others=4, constrained=True, max_tokens=128):
    """Median inter-token gap of `free` unconstrained streams decoding beside `others` streams that are constrained
    by a JSON schema (constrained=True) or are free as well: the same batch either way, so the difference is the
    constrained rows' mask work. Gaps count until the first stream ends (the batch stays the same)."""
    from serve.scheduler import SamplingParams
    log, done = [], threading.Event()

    def sink(name):
        def put(ev):  # on the scheduler thread
            log.append((time.perf_counter(), name, ev))
            if "done" in ev:
                done.set()
        return put
    prompt = tokenizer.render_for_completion([{"role": "user", "content": QUESTIONS[1]},
                                              {"role": "assistant", "content": ""}])
    running = [server.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i), sink(i))
               for i in range(free)]
    running += [server.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=100 + i,
                                                     response_format=OPEN_ENDED if constrained else None),
                              sink(("other", i)))
                for i in range(others)]
    done.wait(600)
    for r in running:
        r.cancel()
    end = next(t for t, _, ev in list(log) if "done" in ev)
    last, gaps = {}, []
    for t, name, ev in list(log):
        if t > end or "text" not in ev or not ev["tokens"]:
            continue
        if name in last and isinstance(name, int):
            gaps.append((t - last[name]) / ev["tokens"])
        last[name] = t
    return percentile(gaps[len(gaps) // 4:], 50)  # (the first quarter: prefill and warm-up)


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(records, wall):
    """vLLM's benchmark report, times in ms."""
    ok = [r for r in records if r.error is None and r.e2e is not None]
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    itl = [g for r in ok for g in r.gaps]
    out = dict(completed=len(ok), failed=len(records) - len(ok), seconds=round(wall, 2),
               request_throughput=round(len(ok) / wall, 2),
               output_tok_per_s=round(sum(r.output_tokens for r in ok) / wall, 1),
               prompt_tokens=sum(r.prompt_tokens for r in ok), cached_tokens=sum(r.cached_tokens for r in ok))
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        out[f"{name}_ms_mean"] = ms(sum(values) / len(values)) if values else None
        out[f"{name}_ms_p50"] = ms(percentile(values, 50))
        out[f"{name}_ms_p99"] = ms(percentile(values, 99))
    turns = sorted({r.turn for r in ok})
    if len(turns) > 1:  # multi-turn: TTFT by turn
        out["ttft_ms_mean_by_turn"] = [ms(sum(v) / len(v)) for t in turns
                                       if (v := [r.ttft for r in ok if r.turn == t and r.ttft is not None])]
    return out


class InProcess:
    """A scheduler-like server in this process, given chat messages."""

    def __init__(self, server, tokenizer):
        self.server, self.tokenizer = server, tokenizer

    def submit(self, messages, params, sink, session=None):
        prompt = self.tokenizer.render_for_completion(messages + [{"role": "assistant", "content": ""}])
        return self.server.submit(prompt, params, sink)


class Http:
    """A running server's /v1/chat/completions, streamed (one thread per request), as scheduler events; with
    sessions, each conversation sends its own X-Session-Id (replica affinity)."""

    def __init__(self, url, api_key=None, sessions=True):
        self.url = url.rstrip("/") + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.sessions = sessions

    def submit(self, messages, params, sink, session=None):
        job = _Job(messages, params, sink)
        headers = {**self.headers, **({"X-Session-Id": session} if self.sessions and session else {})}
        threading.Thread(target=self._stream, args=(job, headers), daemon=True).start()
        return job

    def _stream(self, job, headers):
        import json

        import requests
        body = {"messages": job.prompt, "max_tokens": job.params.max_tokens, "temperature": job.params.temperature,
                "seed": job.params.seed, "stream": True, "stream_options": {"include_usage": True}}
        done = {"done": True, "finish_reason": "error", "prompt_tokens": 0, "completion_tokens": 0,
                "cached_tokens": 0}
        try:
            with requests.post(self.url, json=body, headers=headers, stream=True, timeout=600) as r:
                if r.status_code != 200:
                    done["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                for line in r.iter_lines() if r.status_code == 200 else ():
                    if job.cancelled:
                        break
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        if choice["delta"].get("content"):
                            job.sink({"text": choice["delta"]["content"], "tokens": 1})
                        if choice.get("finish_reason"):
                            done["finish_reason"] = choice["finish_reason"]
                    if event.get("usage"):
                        u = event["usage"]
                        done.update(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                                    cached_tokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
                    if "error" in event:
                        done["error"] = str(event["error"])[:200]
        except requests.RequestException as e:
            done["error"] = f"{type(e).__name__}: {e}"
        job.sink(done)


class OneAtATime:
    """nanochat's chat_web way of serving: `workers` workers (one per GPU there), each generating one request at a
    time with Engine.generate (prefill, then one token per step) while the others queue. Same submit() and
    events as the Scheduler."""

    def __init__(self, model, tokenizer, workers=1):
        from nanochat.engine import Engine
        self.engine, self.tokenizer = Engine(model, tokenizer), tokenizer
        self.stop_tokens = tokenizer.turn_end_ids()
        self.queue = queue.Queue()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, prompt, params, sink):
        job = _Job(prompt, params, sink)
        self.queue.put(job)
        return job

    def stop(self):
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(timeout=60)

    def _work(self):
        import torch
        while (job := self.queue.get()) is not None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            n = 0
            with torch.inference_mode():
                for column, _ in self.engine.generate(job.prompt, num_samples=1, max_tokens=job.params.max_tokens,
                                                      temperature=job.params.temperature,
                                                      top_k=job.params.top_k, seed=job.params.seed or 0):
                    token = column[0]
                    if job.cancelled or token in self.stop_tokens:
                        break
                    n += 1
                    job.sink({"text": decoder.decode(self.tokenizer.decode_single_token_bytes(token)), "tokens": 1})
            job.sink({"done": True, "finish_reason": "length" if n >= job.params.max_tokens else "stop",
                      "prompt_tokens": len(job.prompt), "completion_tokens": n, "cached_tokens": 0})


@dataclass(eq=False)
class _Job:
    prompt: list
    params: object
    sink: object
    cancelled: bool = False

    def cancel(self):
        self.cancelled = True
