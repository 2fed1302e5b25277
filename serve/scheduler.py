"""
Continuous batching for serving: many requests decoded together, each at its own position, over paged KV memory.

One background thread owns the model and a BlockPool (nanochat.paged_cache): KV memory in blocks, sized by a byte
budget, with a prefix cache. Each loop iteration
  1. retires finished and cancelled requests (their blocks go back to the pool; full ones stay cached),
  2. admits waiting requests, in order, while there is a batch row and KV memory for them: a request takes the
     cached blocks that hold the longest prefix of its prompt, plus new blocks for the rest of its prompt and
     for max_tokens (so a running request never runs out of memory); the head of the queue waits otherwise,
  3. runs one forward over the last token of every request past its prompt and a chunk of prompt tokens of the
     requests still prefilling, laid end to end in one row (nanochat.paged_cache.PackedBatch: no padding,
     attention per row); each request whose prompt is done samples its next (or first) token. The chunk is sized
     from measured step times (PrefillBudget), so a long prompt takes as many iterations as it needs for the
     streams already running to keep their pace while it arrives.
Each request has its own sampling parameters and its own torch.Generator, so a seeded request samples the
same tokens whether it runs alone or beside others. The waiting queue is bounded: submit() raises Overloaded
when it is full instead of queueing forever.

Output: every request gets events through a callback (called on the scheduler thread):
    {"prompt_logprobs": [TokenLogprob]}   once its prompt is prefilled, when it asked (prompt tokens 1..)
    {"text": str, "tokens": int}   new complete text (UTF-8 safe, stop strings held back), tokens since last event;
                                   with "logprobs": [TokenLogprob] of those tokens when it asked
    {"done": True, "finish_reason": "stop"|"length"|"cancelled"|"error", "prompt_tokens", "completion_tokens",
     "cached_tokens"}
AsyncRequests / generate() wrap that for asyncio and plain-thread consumers. Nothing here depends on Ray.
"""
import asyncio
import codecs
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nanochat import cuda_runtime
from nanochat.engine import ToolUse, sample_next_token
from nanochat.paged_cache import BlockPool, PackedBatch, PagedRow, block_bytes
from serve.structured import grammar_compiler, mask_rows

logger = logging.getLogger("nanochat.serve")


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (raw logits: before temperature, top-k or top-p) and the `top`
    most likely tokens at its position, [(token, logprob)] best first."""
    token: int
    logprob: float
    top: list


def token_logprobs(logits, tokens, tops):
    """[TokenLogprob] of tokens (n ids) at logits rows (n, V), row i with its tops[i] best alternatives: one
    log-softmax and one host copy for them all."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(tops)
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, c, list(zip(i[:n], v[:n]))) for t, c, i, v, n in zip(tokens, chosen, ids, values, tops)]


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
    logprobs: int | None = None  # each generated token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (read from the prefill)
    skip_special_tokens: bool = True  # special tokens in the text read as people read them (ToolUse.shown_bytes)
    response_format: dict | None = None  # JSON output under a schema, by constrained decoding (serve/structured.py)


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
    kv: PagedRow | None = None  # its blocks and how many positions hold keys, while it has a row
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob of prompt tokens 1.. so far

    def cancel(self):
        """Safe from any thread; the row is freed before the next decode step."""
        self.cancelled = True

    # decoding state, set up at admission
    def _start(self, device, tokenizer):
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.tool = ToolUse(tokenizer)  # the calculator; its output is fed instead of samples
        # the tokens it may take next, under its response_format's grammar (compiled grammars are cached)
        grammar = grammar_compiler(tokenizer).compile_response_format(self.params.response_format) \
            if self.params.response_format else None
        self.constraint = grammar.matcher() if grammar is not None else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.unsent_tokens = "", 0, 0
        self.unsent_logprobs = []  # TokenLogprob of the unsent tokens, when the request wants them
        self.last_token = None
        self.prev = None  # smear state after its last fed token (models with smear): (tensor (R, 1, C), its row)
        self.keys = []  # prefix-cache keys of its full blocks, in order

    @property
    def prefilled(self):
        return self.kv.length >= len(self.prompt)

    def fed_tokens(self, start, stop):
        """The tokens at positions start .. stop - 1 of its cache (the prompt, then the generated tokens)."""
        n = len(self.prompt)
        return (self.prompt[start:stop] if stop <= n else
                self.prompt[start:] + self.generated[max(0, start - n):stop - n])


def default_kv_bytes(model, max_batch, seq_len, block_size):
    """The KV budget when none is given: on a GPU, half of the memory free once the model is loaded; elsewhere
    what max_batch requests of the full context take (and the scratch block)."""
    device = model.get_device()
    if device.type == "cuda":
        return cuda_runtime.free_memory(device) // 2
    cfg = model.config
    per_token = block_bytes(cfg.n_layer, 1, cfg.n_kv_head, cfg.n_embd // cfg.n_head, model.cos.dtype)
    return (max_batch * -(-seq_len // block_size) + 1) * block_size * per_token


class PrefillBudget:
    """Prompt tokens per step beside running streams, sized from measured step times so that a step with a prompt
    chunk takes at most `slowdown` times a decode-only step: the streams' inter-token latency stays within that
    factor of their pace while prompts arrive, on any device. (Where a chunk adds little to the decoding forward,
    chunks grow toward the cap; where every token costs compute, as on a CPU, they stay small.) With no stream
    decoding, or slowdown 0, the budget is the cap."""

    def __init__(self, cap, slowdown=2.0, floor=16, smoothing=0.25):
        self.cap, self.slowdown, self.floor, self.smoothing = cap, slowdown, min(floor, cap), smoothing
        self.decode_seconds = None  # a decode-only step (moving average)
        self.token_seconds = None  # what each prompt token adds to a step (moving average)

    def tokens(self, decoding):
        if not decoding or not self.slowdown:
            return self.cap
        if self.decode_seconds is None or self.token_seconds is None:
            return self.floor  # not measured yet: start small
        allowed = (self.slowdown - 1) * self.decode_seconds / max(self.token_seconds, 1e-9)
        return int(min(self.cap, max(self.floor, allowed)))

    def observe(self, decoding, prompt_tokens, seconds):
        """One step's wall time (it ends with the sampled tokens on the host, so it covers the device's work)."""
        if not decoding:
            return
        if not prompt_tokens:
            self.decode_seconds = self._average(self.decode_seconds, seconds)
        elif self.decode_seconds is not None:
            self.token_seconds = self._average(self.token_seconds,
                                               max(seconds - self.decode_seconds, 0.0) / prompt_tokens)

    def _average(self, old, new):
        return new if old is None else old + self.smoothing * (new - old)


class Scheduler:
    def __init__(self, model, tokenizer, max_batch=16, max_waiting=64, seq_len=None, stall_timeout=60.0,
                 max_failed_steps=5, kv_cache_bytes=None, block_size=16, prefix_cache=True, prefill_chunk=512,
                 prefill_slowdown=2.0):
        """max_batch: requests running at once; kv_cache_bytes: the KV memory budget (default_kv_bytes when None);
        prefill_chunk: prompt tokens prefilled per iteration at most; prefill_slowdown: how much longer than a
        decode-only step a step with a prompt chunk may take while streams decode (PrefillBudget; 0: no limit)."""
        self.model, self.tokenizer = model, tokenizer
        # health: a step running for more than stall_timeout seconds (hung), or this many failed steps in a row
        # (e.g. a sticky device error), and the replica reports itself unhealthy
        self.stall_timeout, self.max_failed_steps = stall_timeout, max_failed_steps
        self.step_started, self.failed_steps = None, 0  # step_started: monotonic time of the running step
        self.device = model.get_device()
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.prefill_budget = PrefillBudget(prefill_chunk, prefill_slowdown)
        self.seq_len = seq_len or model.config.sequence_len
        budget = kv_cache_bytes or default_kv_bytes(model, max_batch, self.seq_len, block_size)
        self.pool = BlockPool.for_model(model, budget, block_size, prefix_cache)
        self.smear = getattr(model.config, "use_smear", False)
        self.stop_tokens = tokenizer.turn_end_ids()
        self.rows = []  # running requests (prefilling or decoding), in admission order
        self.waiting = deque()
        self.cv = threading.Condition()
        self.running = False
        self.thread = None
        self.stats = dict(steps=0, tokens=0, admitted=0, finished=0, cancelled=0, max_active=0, occupancy_sum=0,
                          errors=0, prompt_tokens=0, prefill_tokens=0, prefix_hit_tokens=0)

    # -------------------------------------------------------------------------
    # public API (any thread)

    def start(self):
        """Run the loop on a thread of its own."""
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="nanochat-scheduler", daemon=True)
        self.thread.start()
        return self

    def run(self, on_ready=None):
        """Run the loop on the calling thread until stop(); on_ready() is called once work is accepted. The thread
        that built the model should run it: with OpenMP, every thread that runs torch ops gets a team of worker
        threads of its own, and two teams on the same cores make libgomp stop spinning between ops, which here
        made decoding 1.7x slower."""
        self.running, self.thread = True, threading.current_thread()
        if on_ready is not None:
            on_ready()
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
            need = self.pool.blocks_for(self._reserved_tokens(prompt, params))
            if need > self.pool.usable_blocks:
                raise ValueError(f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} needs {need} "
                                 f"KV blocks; the replica has {self.pool.usable_blocks} (lower max_tokens)")
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
        pool = self.pool
        s = dict(self.stats, active=len(self.rows), waiting=len(self.waiting), max_batch=self.max_batch,
                 max_waiting=self.max_waiting, kv_blocks=pool.usable_blocks, kv_blocks_used=pool.used(),
                 kv_blocks_cached=len(pool.entry), block_size=pool.block_size, prefix_evictions=pool.evictions)
        s["mean_occupancy"] = s["occupancy_sum"] / max(s["steps"], 1)
        s["kv_usage"] = s["kv_blocks_used"] / max(pool.usable_blocks, 1)
        return s

    def _reserved_tokens(self, prompt, params):
        """Positions a request may fill: its prompt and max_tokens, within the context."""
        return min(len(prompt) + params.max_tokens, self.seq_len)

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
                    while self.waiting and len(self.rows) < self.max_batch and self._reserve(self.waiting[0]):
                        self.rows.append(self.waiting.popleft())
                try:
                    self._retire()
                    decoding = [r for r in self.rows if r.prefilled]
                    prefills = self._prefill_plan(self.prefill_budget.tokens(bool(decoding)))
                    started = time.perf_counter()
                    self._run_step(decoding, prefills)
                    self.prefill_budget.observe(len(decoding), sum(n for _, n in prefills),
                                                time.perf_counter() - started)
                    if decoding:
                        self.failed_steps = 0  # a decode step went through: the device works
                    self._retire()
                except Exception as e:  # a broken step fails the requests in it, not the server
                    logger.exception("scheduler step failed")
                    self.failed_steps += 1
                    self.stats["errors"] += 1
                    for req in self.rows:
                        self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                    self._retire()
                finally:
                    self.step_started = None
        # shutting down: nobody will serve what is left
        for req in self.rows + list(self.waiting):
            self._finish(req, "cancelled")
        self._retire()
        self.waiting = deque()

    def _reserve(self, req):
        """KV memory for a request at the head of the queue: the cached blocks of its prompt's longest prefix and
        new blocks for the rest of what it may fill. False (nothing taken) when the pool cannot hold it yet."""
        pool = self.pool
        blocks, keys = pool.match(req.prompt)
        cached_logprobs = []
        if req.params.prompt_logprobs is not None:  # only the blocks whose positions' log-probabilities were kept
            cached_logprobs = self._cached_prompt_logprobs(req, keys)
            kept = len(cached_logprobs) // pool.block_size
            pool.release(blocks[kept:])
            blocks, keys = blocks[:kept], keys[:kept]
        fresh = pool.allocate(pool.blocks_for(self._reserved_tokens(req.prompt, req.params)) - len(blocks))
        if fresh is None:
            pool.release(blocks)
            return False
        req._start(self.device, self.tokenizer)
        req.prompt_logprobs = cached_logprobs
        req.kv = PagedRow(blocks + fresh, length=len(blocks) * pool.block_size)
        req.keys, req.cached_tokens = keys, req.kv.length
        if req.cached_tokens and self.smear:  # smear continues from the last cached token's embedding
            last = torch.tensor([[req.prompt[req.kv.length - 1]]], device=self.device)
            req.prev = self.model.token_embedding(last), 0
        self.stats["admitted"] += 1
        self.stats["prompt_tokens"] += len(req.prompt)  # (every prompt is looked up in the prefix cache)
        self.stats["prefix_hit_tokens"] += req.cached_tokens
        return True

    def _prefill_plan(self, budget):
        """Up to `budget` prompt tokens of the requests still prefilling, oldest first: [(request, tokens)]."""
        plan = []
        for req in self.rows:
            if budget <= 0:
                break
            if not req.prefilled and req.finish_reason is None and not req.cancelled:
                n = min(len(req.prompt) - req.kv.length, budget)
                plan.append((req, n))
                budget -= n
        return plan

    def _run_step(self, decoding, prefills):
        """One forward for all of it. When that fails with prompt chunks in it, the decoding requests step alone
        (a failure there fails the step) and each prompt alone, so a prompt that cannot be prefilled fails by
        itself."""
        if not decoding and not prefills:  # (every request left was retired just now)
            return
        try:
            return self._step(decoding, prefills)
        except Exception:
            if not prefills:
                raise
        if decoding:
            self._step(decoding, [])
        for req, n in prefills:
            try:
                self._step([], [(req, n)])
            except Exception as e:
                logger.error("prefill failed", exc_info=e)
                self.stats["errors"] += 1
                self._finish(req, "error", error=f"prefill failed: {type(e).__name__}: {e}")

    def _step(self, decoding, prefills):
        """One forward of the decoding requests' last tokens and the prompt chunks, packed into one row (no
        padding); every request whose prompt is done then samples a token."""
        reqs = decoding + [req for req, _ in prefills]
        ids = [req.last_token for req in decoding]
        for req, n in prefills:
            ids += req.prompt[req.kv.length:req.kv.length + n]
        prev = self._smear_state(reqs)
        lengths = [req.kv.length for req in reqs]
        new_lens = [1] * len(decoding) + [n for _, n in prefills]
        cache = PackedBatch(self.pool, [r.kv for r in reqs], new_lens, prev)
        every_position = any(req.params.prompt_logprobs is not None for req, _ in prefills)
        try:
            logits = self.model(torch.tensor([ids], dtype=torch.long, device=self.device), kv_cache=cache,
                                last_only=not every_position)
        except Exception:  # nothing advanced: the rows can be stepped again
            for req, length in zip(reqs, lengths):
                req.kv.length = length
            raise
        if every_position:  # (1, N, V): the prompt chunks' positions too
            ends = list(itertools.accumulate(new_lens))
            self._prompt_logprobs(prefills, logits[0], ends[len(decoding):], lengths[len(decoding):])
            logits = logits[0, [e - 1 for e in ends]]
        else:
            logits = logits[:, -1, :]
        if cache.prev_embedding is not None:
            for i, r in enumerate(reqs):
                r.prev = cache.prev_embedding, i
        if decoding:
            self.stats["steps"] += 1
            self.stats["occupancy_sum"] += len(decoding)
            self.stats["max_active"] = max(self.stats["max_active"], len(decoding))
        for req in reqs:
            if req.kv.length // self.pool.block_size > len(req.keys):  # (most steps fill no block)
                self._register_full_blocks(req)
        sampled = reqs
        if prefills:  # the requests that sample: the decoding ones and the prompts that got their last chunk
            self.stats["prefill_tokens"] += sum(n for _, n in prefills)
            ready = [i for i, req in enumerate(reqs) if req.prefilled]
            for i in (i for i in ready if i >= len(decoding)):  # prompts whose last chunk was in this step
                if reqs[i].params.prompt_logprobs is not None:
                    self._send(reqs[i], {"prompt_logprobs": reqs[i].prompt_logprobs})
                if reqs[i].params.max_tokens == 0:  # the prompt's log-probabilities were all it asked for
                    self._finish(reqs[i], "length")
            ready = [i for i in ready if reqs[i].finish_reason is None]
            sampled, logits = [reqs[i] for i in ready], logits[ready]
        tokens = self._sample(sampled, logits)
        for req, token, logprob in zip(sampled, tokens, self._generated_logprobs(sampled, tokens, logits)):
            if req.finish_reason is None and not req.cancelled:  # sampling may have failed it
                self._accept(req, token, logprob)

    def _smear_state(self, reqs):
        """(R, 1, C): the smear state of each request's last fed token (zeros for one that has none), or None when
        none has one. Requests that stepped together last time, in the same order, take that step's tensor as it
        is (decoding, most steps)."""
        if not self.smear:
            return None
        last = reqs[0].prev[0] if reqs[0].prev is not None else None
        if last is not None and len(last) == len(reqs) and all(r.prev is not None and r.prev[0] is last
                                                                and r.prev[1] == i for i, r in enumerate(reqs)):
            return last
        states = [r.prev for r in reqs]
        if all(s is None for s in states):
            return None
        like = next(s for s in states if s is not None)[0]
        return torch.cat([t[i:i + 1] if t is not None else like.new_zeros(1, *like.shape[1:])
                          for t, i in (s or (None, 0) for s in states)])

    @staticmethod
    def _generated_logprobs(reqs, tokens, logits):
        """TokenLogprob of the token each request takes now (the sampled one, or the calculator's forced one) for
        the requests that asked, else None."""
        out = [None] * len(reqs)
        wanted = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and r.finish_reason is None]
        if wanted:
            taken = [reqs[i].tool.forced[0] if reqs[i].tool.forced else tokens[i] for i in wanted]
            tops = [reqs[i].params.logprobs for i in wanted]
            for i, entry in zip(wanted, token_logprobs(logits[wanted], taken, tops)):
                out[i] = entry
        return out

    def _prompt_logprobs(self, prefills, logits, ends, starts):
        """Log-probabilities of the prompt tokens that the chunks' positions predict, for the requests that asked:
        position p's logits give token p + 1's (the first prompt token has none)."""
        rows, targets, tops = [], [], []
        for (req, n), end, start in zip(prefills, ends, starts):
            if req.params.prompt_logprobs is None:
                continue
            m = min(n, len(req.prompt) - 1 - start)  # the last prompt position predicts a generated token
            rows += range(end - n, end - n + m)
            targets += req.prompt[start + 1:start + 1 + m]
            tops += [req.params.prompt_logprobs] * m
        entries = iter(token_logprobs(logits[rows], targets, tops)) if rows else iter(())
        for (req, n), start in zip(prefills, starts):
            if req.params.prompt_logprobs is not None:
                req.prompt_logprobs += itertools.islice(entries, min(n, len(req.prompt) - 1 - start))

    def _register_full_blocks(self, req):
        """Put the request's blocks that are now full into the prefix cache, with the log-probabilities their
        positions gave (the prompt tokens after each), when the request computed them: (top, entries)."""
        bs = self.pool.block_size
        for b in range(len(req.keys), req.kv.length // bs):
            parent = req.keys[-1] if req.keys else None
            req.keys.append(self.pool.register(req.kv.blocks[b], parent, req.fed_tokens(b * bs, (b + 1) * bs)))
            if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) >= (b + 1) * bs:
                self.pool.annotate(req.keys[-1], (req.params.prompt_logprobs, req.prompt_logprobs[b * bs:(b + 1) * bs]))

    def _cached_prompt_logprobs(self, req, keys):
        """The prompt log-probabilities kept beside the leading cached blocks (keys) of its prompt: as many blocks as
        have them with at least the request's top alternatives and predict its next token (a block's last position
        predicts the token after it, which the block's key does not fix)."""
        top, bs, out = req.params.prompt_logprobs, self.pool.block_size, []
        for b, key in enumerate(keys):
            note = self.pool.note(key)
            if note is None or note[0] < top or note[1][-1].token != req.prompt[(b + 1) * bs]:
                break
            out += [TokenLogprob(e.token, e.logprob, e.top[:top]) for e in note[1]]
        return out

    def _sample(self, reqs, logits):
        """One token per request with its own parameters and generator; one host sync for the whole batch.
        Guarded per row: a request whose scaled logits are not finite, or whose sampling raises, ends alone with an
        error (its row sampled from zeros meanwhile, so nothing invalid reaches the device's sampler); the others
        get exactly the tokens they would get alone."""
        constrained, drawn, picked = [], [], []  # constrained rows, rows that draw a sample, rows that take a token
        for i, r in enumerate(reqs):
            if r.constraint is not None:
                constrained.append(i)
            if not r.tool.forced:
                picked.append(i)
                if r.params.temperature != 0:
                    drawn.append(i)
        if constrained:  # their forbidden tokens to -inf (on a copy: log-probabilities stay the model's own)
            logits = mask_rows(logits.clone(), constrained, [reqs[i].constraint for i in constrained])
        # softcapped logits are finite unless the model broke (NaN): a row's max tells, and max gives the greedy
        # token in the same pass (-inf, a forbidden token's, is no harm)
        best, greedy = logits.max(dim=-1)
        sampled = {}
        if drawn:
            rows = torch.tensor(drawn, device=logits.device)
            temperatures = torch.tensor([reqs[i].params.temperature for i in drawn], dtype=logits.dtype,
                                        device=logits.device)
            scaled = logits[rows] / temperatures[:, None]  # a tiny temperature can overflow what was finite
            best = best.index_put((rows,), scaled.amax(dim=-1))
            finite = torch.isfinite(best[rows, None])
            scaled = torch.where(finite, scaled, torch.zeros_like(scaled))  # nothing invalid is sampled
            for j, i in enumerate(drawn):
                p = reqs[i].params
                try:
                    sampled[i] = sample_next_token(scaled[j:j + 1], reqs[i].rng, 1.0, p.top_k or None, p.top_p)[0, 0]
                except RuntimeError as e:
                    self.stats["errors"] += 1
                    self._finish(reqs[i], "error", error=f"sampling failed: {e}")
        picked = [i for i in picked if reqs[i].finish_reason is None]  # (sampling may have failed some)
        if not picked:
            return [None] * len(reqs)
        if sampled:
            greedy = greedy.index_put((torch.tensor(list(sampled), device=logits.device),),
                                      torch.stack(list(sampled.values())))
        tokens, best = greedy.tolist(), best.tolist()  # the host sync of the step (the second copy waits on nothing)
        out = [None] * len(reqs)
        for i in picked:
            if math.isfinite(best[i]):
                out[i] = tokens[i]
            else:
                self.stats["errors"] += 1
                self._finish(reqs[i], "error", error=f"non-finite logits at temperature {reqs[i].params.temperature}")
        return out

    def _accept(self, req, token, logprob=None):
        """Append one token to a request: forced tokens, stop tokens, the calculator, text, limits. logprob: its
        TokenLogprob, when the request wants them."""
        forced = req.tool.next_forced()
        token = token if forced is None else forced
        if token in self.stop_tokens:
            return self._finish(req, "stop")
        req.generated.append(token)
        req.last_token = token
        req.unsent_tokens += 1
        if logprob is not None:
            req.unsent_logprobs.append(logprob)
        if req.constraint is not None:
            req.constraint.advance(token)
        self.stats["tokens"] += 1
        # the calculator, as in the Engine
        req.tool.feed(token)
        req.text += req.decoder.decode(req.tool.shown_bytes(token, raw=not req.params.skip_special_tokens))
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
            event = {"text": req.text[req.sent:end], "tokens": req.unsent_tokens}
            if req.params.logprobs is not None:
                event["logprobs"], req.unsent_logprobs = req.unsent_logprobs, []
            self._send(req, event)
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
                 "completion_tokens": len(req.generated), "cached_tokens": req.cached_tokens}
        if error:
            event["error"] = error
        self._send(req, event)

    def _send(self, req, event):
        try:
            req.sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop working for it
            req.cancelled = True

    def _retire(self):
        """Give the blocks of finished and cancelled requests back to the pool (their full blocks stay cached)."""
        keep = []
        for req in self.rows:
            if req.finish_reason is None and not req.cancelled:
                keep.append(req)
                continue
            if req.finish_reason is None:
                self._finish(req, "cancelled")
            self.pool.release(req.kv.blocks)
            req.kv.blocks = []
        self.rows = keep


# -----------------------------------------------------------------------------
# consumers

class AsyncRequests:
    """Requests [(prompt, SamplingParams)] for an asyncio consumer. They are submitted at construction, together,
    so Overloaded / ValueError surface before any response is sent; iterating yields (index, event) until every
    request is done. Stopping early (client gone) cancels them; so does dropping the object unstarted."""

    def __init__(self, scheduler, items):
        loop = asyncio.get_running_loop()
        events = self.events = asyncio.Queue()

        def sink(i):  # must not capture self, or __del__ could never run while the scheduler holds the sink
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        self.requests = scheduler.submit_many([(prompt, p, sink(i)) for i, (prompt, p) in enumerate(items)])

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
