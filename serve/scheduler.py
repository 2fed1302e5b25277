"""
Continuous batching for serving: many requests decoded together, each at its own position.

One background thread owns the model and a KV cache with `max_batch` rows. Active requests occupy rows
0..n-1 (kept contiguous, so a decode step runs on a (n, 1) batch over a view of the first n rows). Between
decode steps the loop
  1. retires finished and cancelled requests (the last row moves into the freed one),
  2. admits waiting requests into free rows: the prompt is prefilled straight into the new row of the cache,
     and its first token is sampled from the prefill logits,
  3. runs one decode step that advances every active row by one token.
Each request has its own sampling parameters and its own torch.Generator, so a seeded request samples the
same tokens whether it runs alone or beside others. The waiting queue is bounded: submit() raises Overloaded
when it is full instead of queueing forever.

Output: every request gets events through a callback (called on the scheduler thread):
    {"text": str, "tokens": int}   new complete text (UTF-8 safe, stop strings held back), tokens since last event
    {"done": True, "finish_reason": "stop"|"length"|"cancelled"|"error", "prompt_tokens", "completion_tokens"}
AsyncRequests / generate() wrap that for asyncio and plain-thread consumers. Nothing here depends on Ray.
"""
import asyncio
import codecs
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nanochat.engine import KVCache, ToolUse, sample_next_token

logger = logging.getLogger("nanochat.serve")


class Overloaded(RuntimeError):
    """The waiting queue is full: the caller should answer 503/429 and let the client retry."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None  # None or 0 = no top-k
    top_p: float | None = None  # None or 1.0 = no nucleus cut
    seed: int | None = None  # None = a random seed
    stop: tuple = ()  # stop strings: the text ends before the first one (finish_reason "stop")


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list
    params: SamplingParams
    sink: object  # callable(event dict), called on the scheduler thread
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finish_reason: str | None = None
    generated: list = field(default_factory=list)  # sampled + forced tokens, never the stop token

    def cancel(self):
        """Safe from any thread; the row is freed before the next decode step."""
        self.cancelled = True

    # decoding state, set up at admission
    def _start(self, device, tokenizer):
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.tool = ToolUse(tokenizer)  # the calculator; its output is fed instead of samples
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.unsent_tokens = "", 0, 0
        self.last_token = None


class _RowsView(KVCache):
    """Rows [start, stop) of a KVCache as a cache of their own. Tensors are views, so the model's in-place
    writes (insert, advance) land in the big cache; prev_embedding is reassigned by the model, so the caller
    copies it back."""

    def __init__(self, cache, start, stop, prev_embedding):
        self.k_cache = cache.k_cache[:, start:stop]
        self.v_cache = cache.v_cache[:, start:stop]
        self.cache_seqlens = cache.cache_seqlens[start:stop]
        self.prev_embedding = prev_embedding
        self.n_layers, self.batch_size, self.max_seq_len = cache.n_layers, stop - start, cache.max_seq_len
        self.write = None


class Scheduler:
    def __init__(self, model, tokenizer, max_batch=16, max_waiting=64, seq_len=None, stall_timeout=60.0,
                 max_failed_steps=5):
        self.model, self.tokenizer = model, tokenizer
        # health: a step running for more than stall_timeout seconds (hung), or this many failed steps in a row
        # (e.g. a sticky device error), and the replica reports itself unhealthy
        self.stall_timeout, self.max_failed_steps = stall_timeout, max_failed_steps
        self.step_started, self.failed_steps = None, 0  # step_started: monotonic time of the running step
        self.device = model.get_device()
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.seq_len = seq_len or model.config.sequence_len
        self.cache = KVCache.for_model(model, max_batch, self.seq_len)
        self.prev = None  # (max_batch, 1, C) smear state per row, allocated at the first prefill
        self.stop_tokens = tokenizer.turn_end_ids()
        self.rows = []  # active requests; rows[i] lives in cache row i
        self.waiting = deque()
        self.cv = threading.Condition()
        self.running = False
        self.thread = None
        self.stats = dict(steps=0, tokens=0, admitted=0, finished=0, cancelled=0, max_active=0, occupancy_sum=0,
                          errors=0)

    # -------------------------------------------------------------------------
    # public API (any thread)

    def start(self):
        """Run the loop on a thread of its own."""
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="nanochat-scheduler", daemon=True)
        self.thread.start()
        return self

    def run(self):
        """Run the loop on the calling thread until stop(). The thread that built the model should run it: with
        OpenMP, every thread that runs torch ops gets a team of worker threads of its own, and two teams on the
        same cores make libgomp stop spinning between ops, which here made decoding 1.7x slower."""
        self.running, self.thread = True, threading.current_thread()
        self._loop()

    def stop(self, timeout=10):
        with self.cv:
            self.running = False
            self.cv.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def alive(self):
        return self.thread is not None and self.thread.is_alive()

    def health_problem(self):
        """None when healthy, else what is wrong (the thread died, a step hangs, steps keep failing)."""
        if not self.alive():
            return "scheduler thread died"
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stall_timeout:
            return f"a scheduler step has been running for {time.monotonic() - started:.0f} s (hung?)"
        if self.failed_steps >= self.max_failed_steps:
            return f"the last {self.failed_steps} scheduler steps failed"
        return None

    def submit(self, prompt, params, sink):
        return self.submit_many([(prompt, params, sink)])[0]

    def submit_many(self, items):
        """Queue several requests at once, all or none (n>1 completions need all their rows)."""
        requests = []
        for prompt, params, sink in items:
            if not prompt:
                raise ValueError("empty prompt")
            if len(prompt) >= self.seq_len:
                raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.seq_len}")
            requests.append(Request(list(prompt), params, sink))
        with self.cv:
            if not self.running:
                raise RuntimeError("scheduler is not running")
            if len(self.waiting) + len(requests) > self.max_waiting:
                raise Overloaded(f"server overloaded: {len(self.waiting)} requests waiting "
                                 f"(limit {self.max_waiting}), {len(self.rows)} decoding; retry later")
            self.waiting.extend(requests)
            self.cv.notify_all()
        return requests

    def snapshot(self):
        s = dict(self.stats, active=len(self.rows), waiting=len(self.waiting), max_batch=self.max_batch,
                 max_waiting=self.max_waiting)
        s["mean_occupancy"] = s["occupancy_sum"] / max(s["steps"], 1)
        return s

    # -------------------------------------------------------------------------
    # the loop (scheduler thread only)

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cv:
                    while self.running and not self.rows and not self.waiting:
                        self.cv.wait()
                    self.step_started = time.monotonic()  # a step starts: it must end within stall_timeout
                    if not self.running:
                        break
                    if any(r.cancelled for r in self.waiting):  # gone before their turn: free their places
                        for r in self.waiting:
                            if r.cancelled:
                                self._finish(r, "cancelled")
                        self.waiting = deque(r for r in self.waiting if not r.cancelled)
                    admit = []
                    while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                        admit.append(self.waiting.popleft())
                try:
                    for req in admit:
                        try:
                            self._admit(req)
                        except Exception as e:  # one prompt that cannot be prefilled fails alone
                            logger.exception("prefill failed")
                            self.stats["errors"] += 1
                            self._finish(req, "error", error=f"prefill failed: {type(e).__name__}: {e}")
                    self._retire()
                    if self.rows:
                        self._decode_step()
                        self._retire()
                    self.failed_steps = 0
                except Exception as e:  # a broken step fails the requests in it, not the server
                    logger.exception("scheduler step failed")
                    self.failed_steps += 1
                    self.stats["errors"] += 1
                    for req in self.rows + [r for r in admit if r.finish_reason is None]:
                        self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                    self.rows = []
                finally:
                    self.step_started = None
        # shutting down: nobody will serve what is left
        for req in self.rows + list(self.waiting):
            self._finish(req, "cancelled")
        self.rows, self.waiting = [], deque()

    def _admit(self, req):
        """Prefill the prompt into the next free row and take its first token from the prefill logits."""
        row = len(self.rows)
        req._start(self.device, self.tokenizer)
        self.cache.cache_seqlens[row] = 0
        view = _RowsView(self.cache, row, row + 1, None)  # no prev: the prompt starts the row's sequence
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view)[:, -1, :]
        if view.prev_embedding is not None:  # models with smear carry the last embedding per row
            if self.prev is None:
                self.prev = view.prev_embedding.new_zeros((self.max_batch, *view.prev_embedding.shape[1:]))
            self.prev[row] = view.prev_embedding[0]
        self.rows.append(req)
        self.stats["admitted"] += 1
        token = self._sample([req], logits)[0]
        if req.finish_reason is None:  # sampling may have failed it
            self._accept(req, token)

    def _decode_step(self):
        n = len(self.rows)
        view = _RowsView(self.cache, 0, n, None if self.prev is None else self.prev[:n])
        ids = torch.tensor([[r.last_token] for r in self.rows], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view)[:, -1, :]
        if self.prev is not None:
            self.prev[:n] = view.prev_embedding
        self.stats["steps"] += 1
        self.stats["occupancy_sum"] += n
        self.stats["max_active"] = max(self.stats["max_active"], n)
        for req, token in zip(self.rows, self._sample(self.rows, logits)):
            if req.finish_reason is None and not req.cancelled:
                self._accept(req, token)

    def _sample(self, reqs, logits):
        """One token per request with its own parameters and generator; one host sync for the whole batch.
        Guarded per row: a request whose scaled logits are not finite, or whose sampling raises, ends alone with an
        error (its row sampled from zeros meanwhile, so nothing invalid reaches the device's sampler); the others
        get exactly the tokens they would get alone."""
        # softcapped logits are finite unless the model broke (NaN): a row's sum tells, in one pass over the batch
        finite = torch.isfinite(logits.sum(dim=-1))
        greedy = logits.argmax(dim=-1)
        drawn = [i for i, r in enumerate(reqs) if not r.tool.forced and r.params.temperature != 0]
        sampled = {}
        if drawn:
            rows = torch.tensor(drawn, device=logits.device)
            temperatures = torch.tensor([reqs[i].params.temperature for i in drawn], dtype=logits.dtype,
                                        device=logits.device)
            scaled = logits[rows] / temperatures[:, None]  # a tiny temperature can overflow what was finite
            finite = finite.index_put((rows,), torch.isfinite(scaled.sum(dim=-1)))
            scaled = torch.where(finite[rows, None], scaled, torch.zeros_like(scaled))  # nothing invalid is sampled
            for j, i in enumerate(drawn):
                p = reqs[i].params
                try:
                    sampled[i] = sample_next_token(scaled[j:j + 1], reqs[i].rng, 1.0, p.top_k or None, p.top_p)[0, 0]
                except RuntimeError as e:
                    self.stats["errors"] += 1
                    self._finish(reqs[i], "error", error=f"sampling failed: {e}")
        picked = [i for i, r in enumerate(reqs) if not r.tool.forced and r.finish_reason is None]
        if not picked:
            return [None] * len(reqs)
        tokens = torch.stack([sampled[i] if i in sampled else greedy[i] for i in picked])
        tokens, ok = torch.stack([tokens, finite[picked].long()]).tolist()  # the one host sync of the step
        out = [None] * len(reqs)
        for i, token, fine in zip(picked, tokens, ok):
            if fine:
                out[i] = token
            else:
                self.stats["errors"] += 1
                self._finish(reqs[i], "error", error=f"non-finite logits at temperature {reqs[i].params.temperature}")
        return out

    def _accept(self, req, token):
        """Append one token to a request: forced tokens, stop tokens, the calculator, text, limits."""
        forced = req.tool.next_forced()
        token = token if forced is None else forced
        if token in self.stop_tokens:
            return self._finish(req, "stop")
        req.generated.append(token)
        req.last_token = token
        req.unsent_tokens += 1
        self.stats["tokens"] += 1
        # the calculator, as in the Engine
        req.tool.feed(token)
        req.text += req.decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        if self._emit_text(req):
            return self._finish(req, "stop")
        if len(req.generated) >= req.params.max_tokens:
            return self._finish(req, "length")
        if len(req.prompt) + len(req.generated) >= self.seq_len:
            return self._finish(req, "length")  # the context is full: the next token has no cache slot

    def _emit_text(self, req, final=False):
        """Send the new text that is safe to show. Returns True when a stop string was found (the text is cut
        before it). Text that could be the start of a stop string is held back until it is decided."""
        stops = req.params.stop
        cut = None
        for s in stops:
            idx = req.text.find(s, max(0, req.sent - len(s) + 1))
            if idx >= 0 and (cut is None or idx < cut):
                cut = idx
        if cut is not None:
            req.text = req.text[:cut]
            end = cut
        elif final or not stops:
            end = len(req.text)
        else:  # hold back the longest tail that a stop string starts with
            end = len(req.text)
            for s in stops:
                for k in range(min(len(s) - 1, len(req.text) - req.sent), 0, -1):
                    if s.startswith(req.text[-k:]):
                        end = min(end, len(req.text) - k)
                        break
        if end > req.sent:
            self._send(req, {"text": req.text[req.sent:end], "tokens": req.unsent_tokens})
            req.sent, req.unsent_tokens = end, 0
        return cut is not None

    def _finish(self, req, reason, error=None):
        if req.finish_reason is not None:
            return
        if reason in ("stop", "length") and hasattr(req, "decoder"):
            req.text += req.decoder.decode(b"", final=True)  # a dangling partial character becomes U+FFFD
            self._emit_text(req, final=True)
        req.finish_reason = reason
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        event = {"done": True, "finish_reason": reason, "prompt_tokens": len(req.prompt),
                 "completion_tokens": len(req.generated)}
        if error:
            event["error"] = error
        self._send(req, event)

    def _send(self, req, event):
        try:
            req.sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop working for it
            req.cancelled = True

    def _retire(self):
        """Free the rows of finished and cancelled requests; the last active row moves into each hole."""
        i = 0
        while i < len(self.rows):
            req = self.rows[i]
            if req.finish_reason is None and not req.cancelled:
                i += 1
                continue
            if req.finish_reason is None:
                self._finish(req, "cancelled")
            last = len(self.rows) - 1
            if i != last:
                n = int(self.cache.cache_seqlens[last])
                self.cache.k_cache[:, i, :n] = self.cache.k_cache[:, last, :n]
                self.cache.v_cache[:, i, :n] = self.cache.v_cache[:, last, :n]
                self.cache.cache_seqlens[i] = n
                if self.prev is not None:
                    self.prev[i] = self.prev[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()


# -----------------------------------------------------------------------------
# consumers

class AsyncRequests:
    """Requests of one prompt (n >= 1 sampling params) for an asyncio consumer. They are submitted at
    construction, so Overloaded / ValueError surface before any response is sent; iterating yields
    (index, event) until every request is done. Stopping early (client gone) cancels them; so does dropping
    the object unstarted."""

    def __init__(self, scheduler, prompt, params_list):
        loop = asyncio.get_running_loop()
        events = self.events = asyncio.Queue()

        def sink(i):  # must not capture self, or __del__ could never run while the scheduler holds the sink
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        self.requests = scheduler.submit_many([(prompt, p, sink(i)) for i, p in enumerate(params_list)])

    async def __aiter__(self):
        remaining = len(self.requests)
        try:
            while remaining:
                i, event = await self.events.get()
                remaining -= bool(event.get("done"))
                yield i, event
        finally:
            self.cancel()

    def cancel(self):
        for r in getattr(self, "requests", ()):  # () when submission itself failed
            r.cancel()

    __del__ = cancel


def generate(scheduler, prompt, params, timeout=None):
    """Blocking: (text, done_event) for one request."""
    events = queue.Queue()
    req = scheduler.submit(prompt, params, events.put)
    parts = []
    try:
        while True:
            event = events.get(timeout=timeout)
            if event.get("done"):
                return "".join(parts), event
            parts.append(event["text"])
    finally:
        req.cancel()
