"""Continuous batching scheduler, in-process (no Ray): batched == alone, per-request sampling, stop rules,
calculator, UTF-8 safe streaming, cancellation and overload."""
import asyncio
import queue
import threading
import time

import pytest
import torch

from conftest import TINY_VOCAB, perturbed
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from serve.scheduler import AsyncRequests, Overloaded, PrefillBudget, SamplingParams, Scheduler, generate

# default GPTConfig pieces on: smear (per-row prev_embedding), value embeddings, sliding windows (128 of 256)
SMALL = dict(sequence_len=256, vocab_size=TINY_VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    m = perturbed(build_model(GPTConfig(**SMALL)), scale=0.2).eval()
    with torch.no_grad():  # specials never win greedy decoding, so lengths are predictable
        m.lm_head.weight[min(tiny_tokenizer.encode_special(s) for s in tiny_tokenizer.get_special_tokens()):] = 0
    return m


@pytest.fixture
def scheduler(model, tiny_tokenizer):
    # no prefix cache where requests race: whether a request finds its prefix cached would depend on timing, and
    # keys computed in another batch shape may differ in the last bit (a near-tie could then flip a token); the
    # cache has deterministic tests of its own below
    s = Scheduler(model, tiny_tokenizer, max_batch=3, max_waiting=16, prefix_cache=False).start()
    yield s
    s.stop()


def run_concurrently(scheduler, jobs):
    """jobs: [(prompt, params)] submitted from threads at once -> [(text, done)] in order."""
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        results[i] = generate(scheduler, *jobs[i], timeout=60)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def submit_in_order(scheduler, jobs):
    """jobs: [(prompt, params)] queued at once, in this order -> [(text, done)] in order."""
    sinks = [queue.Queue() for _ in jobs]
    scheduler.submit_many([(p, params, q.put) for (p, params), q in zip(jobs, sinks)])
    results = []
    for q in sinks:
        parts = []
        while "done" not in (event := q.get(timeout=60)):
            parts.append(event["text"])
        results.append(("".join(parts), event))
    return results


def without_cache_counts(results):
    """[(text, done)] with done's cached_tokens left out: what a request produced, wherever its prefix came from."""
    return [(text, {k: v for k, v in done.items() if k != "cached_tokens"}) for text, done in results]


PROMPTS = ["Hello world", "The quick brown fox jumps over", "x", "What is 12*3? Let me compute",
           "the theory of the thing is that", "In 2024 the temperature"]


def test_batched_equals_alone_and_engine_greedy(model, tiny_tokenizer, scheduler):
    prompts = [tiny_tokenizer.encode(p, prepend="<|bos|>") for p in PROMPTS]
    lengths = [150, 30, 60, 10, 40, 80]  # 150 tokens run past the 128-token sliding window
    jobs = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p, n in zip(prompts, lengths)]
    alone = [generate(scheduler, *job, timeout=60) for job in jobs]
    assert scheduler.snapshot()["max_active"] == 1
    batched = run_concurrently(scheduler, jobs)
    # six requests over three rows: rows were shared and reused (admission between decode steps)
    stats = scheduler.snapshot()
    assert stats["max_active"] == 3 and stats["admitted"] == 12
    for (text_a, done_a), (text_b, done_b), n in zip(alone, batched, lengths):
        assert text_a == text_b
        assert done_a["finish_reason"] == done_b["finish_reason"] == "length"
        assert done_a["completion_tokens"] == done_b["completion_tokens"] == n
    engine = Engine(model, tiny_tokenizer)  # and the scheduler agrees with the training-side engine
    for p, n, (text, _) in zip(prompts, lengths, alone):
        seqs, _ = engine.generate_batch(p, 1, max_tokens=n, temperature=0.0)
        assert tiny_tokenizer.decode(seqs[0][len(p):]) == text


def test_seeded_sampling_is_per_request(tiny_tokenizer, scheduler):
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    params = [SamplingParams(max_tokens=30, temperature=1.0, top_k=40, seed=s) for s in (1, 2, 3)]
    params.append(SamplingParams(max_tokens=30, temperature=0.7, top_p=0.9, seed=4))
    alone = [generate(scheduler, prompt, p)[0] for p in params]
    together = [t for t, _ in run_concurrently(scheduler, [(prompt, p) for p in params])]
    assert together == alone
    assert len(set(alone)) == len(alone)  # different seeds, different samples


def test_cancel_frees_the_row(tiny_tokenizer, scheduler):
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    events, got_text = [], threading.Event()

    def sink(ev):
        events.append(ev)
        got_text.set()
    req = scheduler.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0), sink)
    assert got_text.wait(10)
    req.cancel()
    # a fresh request is served right after: the row came back
    _, done = generate(scheduler, prompt, SamplingParams(max_tokens=5, temperature=0.0), timeout=30)
    assert done["completion_tokens"] == 5
    assert events[-1]["done"] and events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["completion_tokens"] < 200
    assert scheduler.snapshot()["cancelled"] == 1 and scheduler.snapshot()["errors"] == 0


def test_a_step_with_nothing_to_run_does_nothing(model, tiny_tokenizer):
    """Regression: when the requests left were all retired at the top of an iteration (cancelled just before it),
    the step had nothing to run and failed trying (an error, and a failed step towards unhealthy)."""
    s = Scheduler(model, tiny_tokenizer)
    s._run_step([], [])
    assert s.stats["errors"] == 0 and s.stats["steps"] == 0


def test_overload_and_prompt_limits(model, tiny_tokenizer):
    s = Scheduler(model, tiny_tokenizer, max_batch=1, max_waiting=2)  # not started: nothing leaves the queue
    s.running = True
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    s.submit_many([(prompt, SamplingParams(), lambda ev: None)] * 2)
    with pytest.raises(Overloaded, match="limit 2"):
        s.submit(prompt, SamplingParams(), lambda ev: None)
    with pytest.raises(ValueError, match="context"):
        s.submit([1] * SMALL["sequence_len"], SamplingParams(), lambda ev: None)


def test_cancelled_waiting_request_frees_its_place(model, tiny_tokenizer):
    s = Scheduler(model, tiny_tokenizer, max_batch=1, max_waiting=1).start()
    try:
        prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
        long = SamplingParams(max_tokens=250, temperature=0.0)
        running = s.submit(prompt, long, lambda ev: None)
        while not s.rows:  # admitted: the waiting place is free again
            threading.Event().wait(0.005)
        waiting = s.submit(prompt, long, lambda ev: None)
        with pytest.raises(Overloaded):
            s.submit(prompt, long, lambda ev: None)
        waiting.cancel()
        for _ in range(500):
            if not s.waiting:
                break
            threading.Event().wait(0.01)
        s.submit(prompt, long, lambda ev: None)  # accepted while the first one still decodes
        assert waiting.finish_reason == "cancelled" and running.finish_reason is None
    finally:
        s.stop()


def test_async_requests_stream_and_cancel_on_close(tiny_tokenizer, scheduler):
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")

    async def main():
        batch = AsyncRequests(scheduler, [(prompt, SamplingParams(max_tokens=8, temperature=0.0, seed=i))
                                          for i in range(2)])
        done = {}
        async for i, ev in batch:
            if ev.get("done"):
                done[i] = ev
        early = AsyncRequests(scheduler, [(prompt, SamplingParams(max_tokens=200, temperature=0.0))])
        events = early.__aiter__()
        await events.__anext__()
        await events.aclose()  # the consumer leaves after its first event (a client that went away)
        return done, early.requests[0]
    done, left = asyncio.run(main())
    assert {d["completion_tokens"] for d in done.values()} == {8}
    for _ in range(200):
        if left.finish_reason:
            break
        threading.Event().wait(0.01)
    assert left.finish_reason == "cancelled"


# -----------------------------------------------------------------------------
# A scripted model: stop rules, tool use and UTF-8 handling need exact control over the tokens

class ScriptedModel(torch.nn.Module):
    """Emits script[i] at generated position i (one-hot logits), then `then` forever."""

    def __init__(self, prompt_len, script, then, vocab=TINY_VOCAB, sequence_len=256):
        super().__init__()
        self.config = GPTConfig(**{**SMALL, "sequence_len": sequence_len})
        self.register_buffer("cos", torch.zeros(1))
        self.prompt_len, self.script, self.then, self.vocab = prompt_len, script, then, vocab

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None, last_only=False):
        T = idx.size(1)  # (the scheduler packs its requests' tokens into one row)
        logits = torch.zeros(1, T, self.vocab)
        positions, _ = kv_cache.begin(T)  # a slice when every row decodes at the same position
        positions = [positions.start] * T if isinstance(positions, slice) else positions[0].tolist()
        for t, position in enumerate(positions):
            i = position + 1 - self.prompt_len
            logits[0, t, self.script[i] if 0 <= i < len(self.script) else self.then] = 1.0
        kv_cache.advance(T)
        return kv_cache.last_rows(logits) if last_only else logits


def scripted_run(tok, script, then=None, seq_len=256, **params):
    prompt = tok.encode("Hi", prepend="<|bos|>")
    then = tok.encode_special("<|assistant_end|>") if then is None else then
    s = Scheduler(ScriptedModel(len(prompt), script, then, sequence_len=seq_len), tok, max_batch=2).start()
    events = []
    try:
        req = s.submit(prompt, SamplingParams(**{"temperature": 0.0, **params}), events.append)
        for _ in range(500):
            if req.finish_reason:
                break
            threading.Event().wait(0.01)
    finally:
        s.stop()
    texts = [e["text"] for e in events if "text" in e]
    return texts, events[-1]


def test_stop_token_and_calculator(tiny_tokenizer):
    tok = tiny_tokenizer
    S = tok.encode_special
    script = [*tok.encode("sum:"), S("<|python_start|>"), *tok.encode("12*3"), S("<|python_end|>")]
    texts, done = scripted_run(tok, script, skip_special_tokens=False)  # then <|assistant_end|>, after the tool's
    text = "".join(texts)                                                  # forced output
    assert text == "sum:<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>"
    assert done["finish_reason"] == "stop"
    assert done["completion_tokens"] == len(script) + 2 + len(tok.encode("36"))  # stop token not counted
    texts, done = scripted_run(tok, script)  # by default, as people read it
    assert "".join(texts) == "sum:<<12*3=36>>"
    no_result = [S("<|python_start|>"), *tok.encode("1/0"), S("<|python_end|>"), *tok.encode("ok"), S("<|user_start|>")]
    assert "".join(scripted_run(tok, no_result)[0]) == "<<1/0>>ok"
    texts, done = scripted_run(tok, [*tok.encode("ab")], then=tok.get_bos_token_id())
    assert "".join(texts) == "ab" and done["finish_reason"] == "stop"


def test_stop_strings_are_never_streamed(tiny_tokenizer):
    tok = tiny_tokenizer
    script = tok.encode("Hello world. Bye")
    texts, done = scripted_run(tok, script, stop=("world", "zzz"))
    assert "".join(texts) == "Hello " and done["finish_reason"] == "stop"
    assert all("wor" not in t for t in texts)
    texts, done = scripted_run(tok, script, stop=("Hello world. Bye!",))  # a prefix only: all text comes out
    assert "".join(texts) == "Hello world. Bye" and done["finish_reason"] == "stop"  # then assistant_end


def test_utf8_split_across_tokens_is_held_until_complete(tiny_tokenizer):
    tok = tiny_tokenizer
    byte_ids = [tok.enc.encode_single_token(bytes([b])) for b in "é€".encode()]  # 2 + 3 bytes, one token each
    texts, done = scripted_run(tok, byte_ids)
    assert texts == ["é", "€"] and done["finish_reason"] == "stop"
    texts, done = scripted_run(tok, byte_ids[:1], max_tokens=1)  # cut mid-character: replaced at the end
    assert texts == ["\ufffd"] and done["finish_reason"] == "length"


def test_length_limits(tiny_tokenizer):
    tok = tiny_tokenizer
    word = tok.encode("the")[0]
    P = len(tok.encode("Hi", prepend="<|bos|>"))
    texts, done = scripted_run(tok, [], then=word, max_tokens=7)
    assert done == {"done": True, "finish_reason": "length", "prompt_tokens": P, "completion_tokens": 7,
                    "cached_tokens": 0}
    texts, done = scripted_run(tok, [], then=word, seq_len=P + 6, max_tokens=100)  # the context fills first
    assert done["finish_reason"] == "length" and done["completion_tokens"] == 6


def test_a_poison_request_fails_alone(model, tiny_tokenizer):
    """temperature 1e-300 turns the logits into inf/NaN: that request ends with an error, and the 8 beside it
    (greedy and seeded sampling) produce exactly what they produce alone. A prompt whose prefill raises fails
    alone too."""
    s = Scheduler(model, tiny_tokenizer, max_batch=9, max_waiting=16, prefix_cache=False).start()  # (see above)
    try:
        prompts = [tiny_tokenizer.encode(p, prepend="<|bos|>") for p in PROMPTS + PROMPTS[:2]]
        jobs = [(p, SamplingParams(max_tokens=20, temperature=0.0 if i % 2 else 0.8, seed=i))
                for i, p in enumerate(prompts)]
        alone = [generate(s, *job, timeout=60) for job in jobs]
        poison = (prompts[0], SamplingParams(max_tokens=20, temperature=1e-300, seed=1))
        bad_id = (prompts[0] + [TINY_VOCAB + 7], SamplingParams(max_tokens=20, temperature=0.0))  # no such token
        for bad, message in ((poison, "non-finite logits"), (bad_id, "prefill failed")):
            results = run_concurrently(s, [bad] + jobs)
            text, done = results[0]
            assert done["finish_reason"] == "error" and message in done["error"], done
            assert without_cache_counts(results[1:]) == without_cache_counts(alone)
        deadline = time.time() + 10  # the last rows are retired just after their final events went out
        while s.snapshot()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert s.snapshot()["active"] == 0 and s.alive()
    finally:
        s.stop()


def test_sampling_guards_each_row(model, tiny_tokenizer):
    """_sample on crafted logits: a greedy row with a NaN (a broken model) and a row with every token forbidden
    (-inf) end with an error; the rows beside them get their argmax (the first of tied maxima, as argmax gives) or
    their seeded sample."""
    from serve.scheduler import Request
    s = Scheduler(model, tiny_tokenizer, max_batch=5)
    events = []
    params = [SamplingParams(temperature=0.0)] * 4 + [SamplingParams(temperature=0.8, seed=3)]
    reqs = [Request([1], p, events.append) for p in params]
    for r in reqs:
        r._start(s.device, tiny_tokenizer)
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = float("nan")
    logits[1] = float("-inf")
    logits[2, [3, 9]] = 100.0  # a tie
    tokens = s._sample(reqs, logits.clone())
    assert tokens[:4] == [None, None, 3, int(logits[3].argmax())]
    expected = torch.multinomial(torch.softmax(logits[4] / 0.8, dim=-1), 1,
                                 generator=torch.Generator().manual_seed(3)).item()
    assert tokens[4] == expected
    errors = [e for e in events if e.get("finish_reason") == "error"]
    assert len(errors) == 2 and all("non-finite logits" in e["error"] for e in errors)
    assert [r.finish_reason for r in reqs] == ["error", "error", None, None, None]


def test_a_prompt_that_cannot_be_prefilled_alone_fails_alone(model, tiny_tokenizer):
    """Regression: a bad prompt prefilled by itself (here: admitted while two streams decode) used to fail the whole
    step, and with it the streams decoding beside it."""
    tok = tiny_tokenizer
    s = Scheduler(model, tok, max_batch=4, prefix_cache=False).start()
    try:
        prompts = [tok.encode(p, prepend="<|bos|>") for p in PROMPTS[:2]]
        params = SamplingParams(max_tokens=40, temperature=0.0)
        alone = [generate(s, p, params, timeout=60) for p in prompts]
        sinks, started = [queue.Queue() for _ in prompts], threading.Event()
        for p, q in zip(prompts, sinks):
            s.submit(p, params, lambda ev, q=q: (q.put(ev), started.set()))
        assert started.wait(30)
        _, bad = generate(s, prompts[0] + [TINY_VOCAB + 7], params, timeout=60)  # no such token
        assert bad["finish_reason"] == "error" and "prefill failed" in bad["error"], bad
        results = []
        for q in sinks:
            parts = []
            while "done" not in (event := q.get(timeout=60)):
                parts.append(event["text"])
            results.append(("".join(parts), event))
        assert results == alone
        assert s.snapshot()["errors"] == 1 and s.health_problem() is None
    finally:
        s.stop()


@pytest.mark.parametrize("special", ["<|user_start|>", "<|user_end|>", "<|assistant_start|>"])
def test_tokens_of_other_turns_end_the_reply(model, tiny_tokenizer, special):
    """A model that samples a token which can only belong to another turn ends its reply there (finish_reason
    "stop"), in the scheduler and in the Engine, instead of showing it as text."""
    import copy
    tok = tiny_tokenizer
    prompt = tok.encode("Hello world", prepend="<|bos|>")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    s = Scheduler(model, tok, max_batch=2).start()
    try:
        _, reference = generate(s, prompt, params, timeout=60)
    finally:
        s.stop()
    ref_tokens = Engine(model, tok).generate_batch(prompt, max_tokens=12, temperature=0.0)[0][0][len(prompt):]
    assert reference["completion_tokens"] == 12 and len(ref_tokens) == 12
    # the special token now scores 10x what the 4th reply token scored: greedy picks it there, or earlier
    hijacked = copy.deepcopy(model)
    with torch.no_grad():
        hijacked.lm_head.weight[tok.encode_special(special)] = 10 * model.lm_head.weight[ref_tokens[3]]
    s = Scheduler(hijacked, tok, max_batch=2).start()
    try:
        text, done = generate(s, prompt, params, timeout=60)
    finally:
        s.stop()
    n = done["completion_tokens"]
    assert done["finish_reason"] == "stop" and n <= ref_tokens.index(ref_tokens[3]) and "<|" not in text
    assert text == tok.decode(ref_tokens[:n])
    engine_tokens = Engine(hijacked, tok).generate_batch(prompt, max_tokens=12, temperature=0.0)[0][0][len(prompt):]
    assert engine_tokens == ref_tokens[:n]


def test_a_hung_step_or_steps_that_keep_failing_make_it_unhealthy(model, tiny_tokenizer):
    """What /health and Ray Serve's check_health report: a step that hangs with work pending, or a run of failing
    steps (a sticky device error), turns the replica unhealthy; a working step makes it healthy again."""
    import copy
    m = copy.deepcopy(model)
    forward, gate, mode = m.forward, threading.Event(), {"hang": False, "fail": False}

    def faulty(ids, *args, **kwargs):
        if mode["hang"]:
            gate.wait(30)
        if mode["fail"] and ids.shape[1] == 1:  # decode steps fail, prefill works
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(ids, *args, **kwargs)
    m.forward = faulty
    s = Scheduler(m, tiny_tokenizer, max_batch=2, stall_timeout=0.5, max_failed_steps=3).start()
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    params = SamplingParams(max_tokens=4, temperature=0.0)

    def wait_for(cond, timeout=10):
        deadline = time.time() + timeout
        while not cond() and time.time() < deadline:
            time.sleep(0.02)
        return cond()
    try:
        time.sleep(0.7)
        assert s.health_problem() is None  # idle for longer than the stall timeout is fine
        mode["hang"] = True
        results = []
        t = threading.Thread(target=lambda: results.append(generate(s, prompt, params, timeout=60)))
        t.start()
        assert wait_for(lambda: (s.health_problem() or "").startswith("a scheduler step has been running"))
        mode["hang"] = False
        gate.set()
        t.join()
        assert results[0][1]["finish_reason"] == "length" and wait_for(lambda: s.health_problem() is None)
        mode["fail"] = True
        for _ in range(3):
            assert generate(s, prompt, params, timeout=60)[1]["finish_reason"] == "error"
        assert s.health_problem() == "the last 3 scheduler steps failed"
        mode["fail"] = False
        assert generate(s, prompt, params, timeout=60)[1]["finish_reason"] == "length"
        assert s.health_problem() is None
    finally:
        gate.set()
        s.stop()


# -----------------------------------------------------------------------------
# paged KV memory: the prefix cache, the memory budget, chunked prefill

def conversation_turns(tok, scheduler, params, turns=4):
    """A multi-turn chat as a client drives it: each turn's prompt is the last prompt, the reply re-encoded and
    a new user message. -> [(text, done)] per turn."""
    prompt, out = tok.encode("Hello there, tell me", prepend="<|bos|>"), []
    for t in range(turns):
        text, done = generate(scheduler, prompt, params, timeout=60)
        out.append((text, done))
        prompt = prompt + tok.encode(text) + tok.encode(f" and then turn {t} asks more")
    return out


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, temperature=0.0),
                                    SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=7)])
def test_prefix_cache_changes_nothing_but_the_work(model, tiny_tokenizer, params):
    """Turn after turn of one conversation: the same replies with the prefix cache on and off (greedy and
    seeded), while with it on each later turn takes its earlier turns' blocks from the cache."""
    runs = {}
    for on in (True, False):
        s = Scheduler(model, tiny_tokenizer, max_batch=2, prefix_cache=on, block_size=8).start()
        try:
            runs[on] = conversation_turns(tiny_tokenizer, s, params)
            stats = s.snapshot()
        finally:
            s.stop()
        if on:
            assert stats["prefix_hit_tokens"] == sum(done["cached_tokens"] for _, done in runs[on]) > 0
    assert without_cache_counts(runs[True]) == without_cache_counts(runs[False])
    assert [d["cached_tokens"] for _, d in runs[False]] == [0, 0, 0, 0]
    cached = [d["cached_tokens"] for _, d in runs[True]]
    prompts = [d["prompt_tokens"] for _, d in runs[True]]
    assert cached[0] == 0
    for t in range(1, 4):  # at least everything before the previous turn's reply, whole blocks of 8
        assert cached[t] >= (prompts[t - 1] // 8) * 8 and cached[t] % 8 == 0 and cached[t] < prompts[t]


def test_a_shared_system_prompt_is_prefilled_once(model, tiny_tokenizer):
    tok = tiny_tokenizer
    system = tok.encode("You are a helpful assistant. Answer briefly and kindly, " * 3, prepend="<|bos|>")
    s = Scheduler(model, tok, max_batch=4, block_size=16).start()
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        first = generate(s, system + tok.encode(" first"), params, timeout=60)
        jobs = [(system + tok.encode(f" question {i}"), params) for i in range(4)]
        results = run_concurrently(s, jobs)
        stats = s.snapshot()
    finally:
        s.stop()
    assert first[1]["cached_tokens"] == 0
    # every block of the system prompt came from the cache (and more where the questions share tokens too)
    assert all(done["cached_tokens"] >= (len(system) // 16) * 16 for _, done in results)
    assert stats["prefill_tokens"] == stats["prompt_tokens"] - stats["prefix_hit_tokens"]


def test_kv_memory_is_a_budget_of_blocks(model, tiny_tokenizer):
    """12 blocks of 16 tokens: short requests (2 blocks each) run six at once; a long one (10 blocks) waits until
    enough are free and then runs; a request that could never fit is refused; every reply is what it is alone,
    and every block comes back."""
    tok = tiny_tokenizer
    per_block = 2 * 2 * 16 * 2 * 32 * 4  # k and v, 2 layers, 16 tokens, 2 heads of 32, fp32
    s = Scheduler(model, tok, max_batch=8, kv_cache_bytes=13 * per_block, block_size=16).start()
    try:
        assert s.pool.usable_blocks == 12
        prompts = [tok.encode(p, prepend="<|bos|>") for p in PROMPTS]
        short = [(p, SamplingParams(max_tokens=32 - len(p), temperature=0.0)) for p in prompts]  # 2 blocks
        long = (prompts[0], SamplingParams(max_tokens=150, temperature=0.0))  # 10 blocks
        alone = [generate(s, *job, timeout=60) for job in short + [long]]
        together = submit_in_order(s, short + [long])
        stats = s.snapshot()
        with pytest.raises(ValueError, match="needs 15 KV blocks; the replica has 12"):
            s.submit(prompts[0], SamplingParams(max_tokens=220), lambda e: None)
        deadline = time.time() + 10
        while s.snapshot()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert s.pool.used() == 0
    finally:
        s.stop()
    assert without_cache_counts(together) == without_cache_counts(alone)
    assert stats["max_active"] == 6  # the six short ones together: 12 blocks; the long one never beside them all


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_streams(model, tiny_tokenizer):
    """While a 200-token prompt arrives in chunks of 16, a stream already running gets a token per chunk, and
    the long request's reply is the same as with the prompt prefilled in one go."""
    tok = tiny_tokenizer
    running = tok.encode("Hello world", prepend="<|bos|>")
    long_prompt = (tok.encode("the theory of the thing is that " * 30, prepend="<|bos|>"))[:200]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    s = Scheduler(model, tok, max_batch=2, prefill_chunk=512).start()
    try:
        whole = generate(s, long_prompt, params, timeout=60)
    finally:
        s.stop()
    s = Scheduler(model, tok, max_batch=2, prefill_chunk=16, prefix_cache=False).start()
    log, started = [], threading.Event()
    try:
        def sink(name):
            def put(event):
                log.append((name, event))
                started.set()
            return put
        s.submit(running, SamplingParams(max_tokens=120, temperature=0.0), sink("running"))
        assert started.wait(30)
        events = queue.Queue()
        mark = len(log)
        s.submit(long_prompt, params, lambda e: (log.append(("long", e)), events.put(e)))
        parts = []
        while True:
            event = events.get(timeout=60)
            if event.get("done"):
                break
            parts.append(event["text"])
    finally:
        s.stop()
    assert ("".join(parts), event) == whole
    first_long = next(i for i, (name, _) in enumerate(log) if name == "long")
    during = sum(e.get("tokens", 0) for name, e in log[mark:first_long] if name == "running")
    assert 200 // 16 <= during <= 200 // 16 + 3  # one decode step per chunk (13 chunks), and a few around them


def test_the_prefill_budget_keeps_a_step_within_the_slowdown_of_a_decode_step():
    """Chunks beside decoding streams are sized from measured step times: decode steps of 3 ms and 0.1 ms per prompt
    token allow 30 tokens at slowdown 2 (a 6 ms step), 60 at 3; within [floor, cap]; no streams: the cap."""
    b = PrefillBudget(cap=512, slowdown=2.0, smoothing=1.0)
    assert b.tokens(decoding=False) == 512 and b.tokens(decoding=True) == 16  # unmeasured: start small
    b.observe(4, 0, 0.003)
    b.observe(0, 300, 0.5)  # a prefill-only step says nothing about the streams' pace
    assert b.token_seconds is None and b.tokens(True) == 16
    b.observe(4, 16, 0.003 + 16 * 0.0001)
    assert b.tokens(True) == 30 and b.tokens(False) == 512
    b.slowdown = 3.0
    assert b.tokens(True) == 60
    b.observe(4, 60, 0.003 + 60 * 0.01)  # prompt tokens got costly (a long context): back to the floor
    assert b.tokens(True) == 16
    b.observe(4, 16, 0.003)  # free: up to the cap
    assert b.tokens(True) == 512
    assert PrefillBudget(cap=512, slowdown=0).tokens(True) == 512  # 0: no limit
    assert PrefillBudget(cap=8).tokens(True) == 8  # the floor never exceeds the cap
    smooth = PrefillBudget(cap=512, smoothing=0.25)
    smooth.observe(1, 0, 0.004)
    smooth.observe(1, 0, 0.008)
    assert smooth.decode_seconds == pytest.approx(0.005)  # a moving average: one slow step moves it a quarter


def test_bf16_scheduler_decodes_the_greedy_tokens_of_fp32(tiny_tokenizer, monkeypatch):
    from test_engine import bf16_copy
    torch.manual_seed(0)  # weights perturbed further than the fixture's: peakier logits
    model = perturbed(build_model(GPTConfig(**SMALL)), scale=0.5).eval()
    bf16 = bf16_copy(model, monkeypatch)
    prompts = [tiny_tokenizer.encode(p, prepend="<|bos|>") for p in PROMPTS[:3]]

    def engine_greedy(m, p):
        return Engine(m, tiny_tokenizer).generate_batch(p, 1, max_tokens=24, temperature=0.0)[0][0][len(p):]
    s = Scheduler(bf16, tiny_tokenizer, max_batch=3, prefix_cache=False).start()
    try:
        # queued at once, so they share the same steps every run: a batch's makeup moves bf16's last bits, and
        # arriving from threads they were sometimes admitted apart (one run in three differed then)
        got = submit_in_order(s, [(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in prompts])
    finally:
        s.stop()
    # batched bf16 serving = the bf16 Engine, every prompt
    assert [text for text, _ in got] == [tiny_tokenizer.decode(engine_greedy(bf16, p)) for p in prompts]
    # = fp32 where fp32's picks are not near-ties (a 3e-5 margin flips in bf16, rightly): the first prompt's are
    fp32 = engine_greedy(model, prompts[0])
    with torch.no_grad():
        top = model(torch.tensor([prompts[0] + fp32]))[0, len(prompts[0]) - 1:-1].topk(2, dim=-1).values
    assert (top[:, 0] - top[:, 1]).min() > 0.02
    assert got[0][0] == tiny_tokenizer.decode(fp32)


def collect_events(scheduler, prompt, params):
    """Every event of one request, in order, until done."""
    events, sink = [], queue.Queue()
    scheduler.submit(prompt, params, sink.put)
    while "done" not in (event := sink.get(timeout=60)):
        events.append(event)
    return events + [event]


def test_prompt_logprobs_come_from_the_prefill_chunked_and_past_the_prefix_cache(model, tiny_tokenizer):
    """A prompt's log-probabilities come from its prefill's logits, chunk by chunk. Its cached blocks are reused
    only where their positions' log-probabilities were kept (at least as many top alternatives, and the token after
    the block the same): the rest is computed."""
    prompt = tiny_tokenizer.encode(PROMPTS[1] + " " + PROMPTS[4], prepend="<|bos|>")
    other = prompt[:8] + [prompt[8] + 1] + prompt[9:]  # the token after the first two blocks (of 4) differs
    references = {}
    with torch.no_grad():
        for p in (prompt, other):
            references[tuple(p)] = torch.log_softmax(model(torch.tensor([p]))[0].float(), dim=-1)
    s = Scheduler(model, tiny_tokenizer, max_batch=2, block_size=4, prefill_chunk=5, prefill_slowdown=0).start()
    try:
        collect_events(s, prompt, SamplingParams(max_tokens=3, temperature=0.0))  # its blocks enter the cache
        full = (len(prompt) - 1) // 4 * 4  # the cached tokens of a full match
        # no log-probabilities kept yet: computed (and kept); then read back; 5 alternatives: computed again (and
        # kept with 5); 2 alternatives from those 5; another prompt shares 2 blocks, but the token after them differs
        for p, top, cached in ((prompt, 3, 0), (prompt, 3, full), (prompt, 5, 0), (prompt, 2, full), (other, 2, 4)):
            events = collect_events(s, p, SamplingParams(max_tokens=0, prompt_logprobs=top))
            assert [sorted(e) for e in events] == [["prompt_logprobs"], ["cached_tokens", "completion_tokens", "done",
                                                                           "finish_reason", "prompt_tokens"]]
            entries, done = events[0]["prompt_logprobs"], events[1]
            assert done["finish_reason"] == "length" and done["completion_tokens"] == 0, done
            assert done["cached_tokens"] == cached, (top, done)
            assert [e.token for e in entries] == p[1:]
            reference = references[tuple(p)]
            for i, e in enumerate(entries):  # position i's logits predict token i + 1
                assert e.logprob == pytest.approx(reference[i, p[i + 1]].item(), abs=1e-4)
                best = reference[i].topk(top)
                assert [t for t, _ in e.top] == best.indices.tolist()
                assert [v for _, v in e.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    finally:
        s.stop()


def test_generated_logprobs_arrive_with_their_text(model, tiny_tokenizer, scheduler):
    prompt = tiny_tokenizer.encode(PROMPTS[3], prepend="<|bos|>")
    events = collect_events(scheduler, prompt, SamplingParams(max_tokens=12, temperature=0.0, logprobs=2))
    texts = [e for e in events if "text" in e]
    entries = [entry for e in texts for entry in e["logprobs"]]
    assert [len(e["logprobs"]) for e in texts] == [e["tokens"] for e in texts]
    tokens = [e.token for e in entries]
    assert len(tokens) == 12 and tiny_tokenizer.decode(tokens) == "".join(e["text"] for e in texts)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    for i, e in enumerate(entries):
        row = reference[len(prompt) - 1 + i]
        assert e.top[0][0] == e.token  # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)
        assert [t for t, _ in e.top] == row.topk(2).indices.tolist()
    # a request that did not ask gets none
    assert all("logprobs" not in e for e in collect_events(scheduler, prompt, SamplingParams(max_tokens=4)))
