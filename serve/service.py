"""
A replica's state, Ray-free: the model, the continuous-batching scheduler that owns it, and the replica's metrics.
The HTTP API (serve/api.py) and the Ray Serve deployment (serve/app.py) are built around one ChatService.
"""
import os
import queue
import threading
import time

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, find_last_step, load_checkpoint_model, load_model
from serve.metrics import ServeMetrics
from serve.protocol import ApiError
from serve.scheduler import AsyncRequests, Overloaded, Scheduler
from serve.structured import SchemaError, grammar_compiler


class ChatService:
    def __init__(self, cfg, model=None, tokenizer=None, replica="local"):
        """cfg: a ServeConfig; model and tokenizer given (tests, tools) or loaded from cfg's storage; replica: this
        replica's id, as /health reports it."""
        self.cfg, self.replica = cfg, replica
        self.device = "cuda" if cfg.gpus_per_replica and torch.cuda.is_available() else "cpu"
        self.step = None  # checkpoint step, when loaded from storage
        if model is None:
            model, tokenizer, self.step, self.scheduler = self._load_and_schedule(cfg, self.device)
        else:
            self.scheduler = self._scheduler(cfg, model, tokenizer).start()
        self.model, self.tokenizer = model, tokenizer
        if cfg.checkpoint:
            self.model_id = f"nanochat-{os.path.basename(cfg.checkpoint.rstrip('/'))}"
        elif cfg.source not in SOURCE_DIRS:  # a directory or Hub repo: its own name, as other servers show it
            self.model_id = cfg.source
        else:
            self.model_id = f"nanochat-{cfg.source}" + (f"-{cfg.model_tag}" if cfg.model_tag else "")
        self.seq_len = model.config.sequence_len
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.started = time.time()
        self.open_sockets = 0
        self.metrics = ServeMetrics(self.scheduler, lambda: self.open_sockets)
        self.all_metrics = None  # async () -> every replica's metrics, where a deployment provides it
        self.forward = None  # async (prompt, params) -> a batch running on another replica, or None: run here

    @classmethod
    def _load_and_schedule(cls, cfg, device):
        """Load the model on a thread that then runs the scheduler, so that all of the replica's torch work happens
        on one thread (see Scheduler.run): (model, tokenizer, step, scheduler), or the loading error."""
        ready = queue.Queue()

        def torch_thread():
            try:
                model, tokenizer, step = cls._load(cfg, device)
                scheduler = cls._scheduler(cfg, model, tokenizer)
            except BaseException as e:
                ready.put(e)
                return
            scheduler.run(on_ready=lambda: ready.put((model, tokenizer, step, scheduler)))
        threading.Thread(target=torch_thread, name="nanochat-scheduler", daemon=True).start()
        out = ready.get()
        if isinstance(out, BaseException):
            raise out
        return out

    @staticmethod
    def _scheduler(cfg, model, tokenizer):
        return Scheduler(model, tokenizer, cfg.max_batch, cfg.max_waiting, stall_timeout=cfg.stall_timeout,
                         kv_cache_bytes=int(cfg.kv_cache_mb * 2**20) or None, block_size=cfg.block_size,
                         prefix_cache=cfg.prefix_cache, prefill_chunk=cfg.prefill_chunk,
                         prefill_slowdown=cfg.prefill_slowdown)

    @staticmethod
    def _load(cfg, device):
        if cfg.checkpoint:
            step = cfg.step if cfg.step is not None else find_last_step(cfg.checkpoint)
            model, tokenizer, meta = load_checkpoint_model(cfg.checkpoint, step, device, "eval", base_dir=cfg.storage)
        else:
            model, tokenizer, meta = load_model(cfg.source, device, "eval", cfg.model_tag, cfg.step,
                                                base_dir=cfg.storage)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer under {cfg.storage}/tokenizer")
        return model, tokenizer, meta.get("step")

    def close(self):
        self.scheduler.stop()

    def prompt(self, convo):
        try:
            ids, _ = self.tokenizer.render_conversation(convo, max_tokens=10**9)
        except ValueError as e:  # roles out of order and the like
            raise ApiError(400, str(e), param="messages") from None
        ids.append(self.assistant_start)
        if len(ids) >= self.seq_len:
            raise ApiError(400, f"prompt is {len(ids)} tokens, longer than the model's context of "
                                f"{self.seq_len} tokens", param="messages")
        return ids

    def check_response_format(self, response_format, param="response_format"):
        """A response_format the scheduler can enforce (compiled now, and cached for it), or a 400 saying why not."""
        if response_format:
            try:
                grammar_compiler(self.tokenizer).compile_response_format(response_format)
            except SchemaError as e:
                raise ApiError(400, f"{param}: {e}", param=param) from None

    async def submit(self, prompt, params, session=None):
        """Start generating: here, or on the replica that owns this prompt's opening (self.forward, where the
        deployment provides it; not for requests that name their session, which the proxy has placed already)."""
        if self.forward is not None and not session:
            batch = await self.forward(prompt, params)
            if batch is not None:
                return batch
        return self.submit_here([(prompt, p) for p in params])

    def submit_here(self, items):
        """[(prompt, SamplingParams)] queued here together -> their AsyncRequests."""
        try:
            return AsyncRequests(self.scheduler, items)
        except Overloaded as e:
            raise ApiError(503, str(e), code="overloaded") from None
        except ValueError as e:  # e.g. more KV memory than the replica has
            raise ApiError(400, str(e), param="max_tokens") from None

    async def events(self, batch):
        """(index, event) of a batch, observing latency metrics on the way."""
        timers = [self.metrics.timer(r.submitted_at) for r in batch.requests]
        async for i, ev in batch:
            timers[i].observe(ev)
            if ev.get("done") and ev["finish_reason"] == "error":
                raise ApiError(500, f"generation failed: {ev.get('error')}")
            yield i, ev

    def health(self):
        return {"status": self.scheduler.health_problem() or "ok", "model_loaded": True,
                "model": self.model_id, "step": self.step, "replica": self.replica, "device": self.device,
                "uptime_s": round(time.time() - self.started, 1), "scheduler": self.scheduler.snapshot()}
