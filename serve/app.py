"""
Serve the chat model with Ray Serve: one replica per GPU (or on CPU), each holding the model and a
continuous-batching scheduler (serve/scheduler.py), behind a FastAPI ingress built inside the replica.

Routes:
    GET  /                      the chat page (serve/ui.html)
    POST /chat                  {"message": str} or {"messages": [{role, content}...]} + optional temperature,
                                top_k, top_p, max_tokens, seed, stop -> {"response", "finish_reason", "usage"};
                                with "stream": true: SSE events {"token": ...} ... then {"done": true, "usage"}
    WS   /ws                    the same JSON per turn -> {"token": ...} messages, then {"done": true, "usage"};
                                several turns per socket; {"cancel": true} stops the current turn
    POST /v1/chat/completions   OpenAI-compatible (stream as SSE ending in [DONE], n, stop, seed, top_k via
                                extra_body, usage, finish_reason); Bearer API key when one is configured
    GET  /v1/models
    GET  /health                model loaded, scheduler alive, this replica's batch
    GET  /metrics               Prometheus text, this replica's counters and histograms

Run (all three bind 127.0.0.1:8000 unless told otherwise):
    python -m serve.app --storage ROOT --source sft [--model-tag d20] [--step S] [--port 8000]
                        [--replicas 2 --gpus-per-replica 1] [--api-key KEY]
    serve run serve.app:app                       (defaults; storage from $NANOCHAT_BASE_DIR)
    serve run serve.app:build_app source=sft model_tag=d20 replicas=2 gpus_per_replica=1
    serve deploy serve/config.yaml
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from nanochat.storage import is_uri
from serve.scheduler import AsyncRequests, Overloaded, SamplingParams, Scheduler

logger = logging.getLogger("nanochat.serve")

UI_PATH = Path(__file__).with_name("ui.html")

# Limits, as nanochat's web chat had them (plus the OpenAI-only fields)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20  # 32000 characters JSON-escaped fit comfortably
WS_MAX_QUEUED_TURNS = 8  # per socket, beside the one being answered
TEMPERATURE_RANGE = (0.0, 2.0)
# below this (but above 0, which is greedy) logits / temperature leave what floats hold: softcapped logits are
# within +-15, and 15 / 1e-3 is far from overflow even in bf16
MIN_TEMPERATURE = 1e-3
TOP_K_RANGE = (0, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_N = 8
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 64
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512


@dataclass
class ServeConfig:
    storage: str | None = None  # storage root; default $NANOCHAT_BASE_DIR or ~/.cache/nanochat
    source: str = "sft"  # sft | rl | mid | base
    model_tag: str | None = None
    step: int | None = None
    checkpoint: str | None = None  # a checkpoint directory, instead of source/model_tag
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas: int | None = None  # > replicas: autoscale between the two
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1
    api_key: str | None = None  # Bearer key for /v1 routes; default $NANOCHAT_API_KEY
    cors_origins: str = ""  # comma-separated origins allowed cross-site ("*" = any); empty = no CORS
    max_batch: int = 16  # KV-cache rows per replica
    max_waiting: int = 64  # waiting requests per replica before answering 503
    stall_timeout: float = 60.0  # a scheduler step running longer than this = unhealthy (Serve replaces it)

    @classmethod
    def from_args(cls, args):
        """From a dict of strings or values (serve run key=value, config.yaml args, argparse)."""
        args = {k.replace("-", "_"): v for k, v in (args or {}).items()}
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve option(s): {sorted(unknown)}")
        out = {}
        for f in fields(cls):
            v = args.get(f.name, f.default)
            if isinstance(v, str):  # values from `serve run k=v` arrive as strings
                kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
                if v.lower() in ("none", "null") or (v == "" and kind is not str):
                    v = None
                else:
                    v = kind(v)
            out[f.name] = v
        cfg = cls(**out)
        cfg.storage = cfg.storage or os.environ.get("NANOCHAT_BASE_DIR")
        if cfg.storage and not is_uri(cfg.storage):  # replicas run in another directory
            cfg.storage = os.path.abspath(cfg.storage)
        cfg.api_key = cfg.api_key or os.environ.get("NANOCHAT_API_KEY") or None
        return cfg


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# -----------------------------------------------------------------------------
# Request bodies (types only; limits are checked in validate() so the messages can name them)

class TextPart(BaseModel):
    type: str = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # our own route: a misspelt field is an error, not a default
    message: str | None = None
    messages: list[Message] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[Message]
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


def _in_range(name, value, lo, hi):
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi} (got {value})", param=name)


def validate(messages, temperature, top_k, top_p, max_tokens, seed, stop, n=1):
    """nanochat's limits -> (messages as [{role, content}], [SamplingParams] * n). ApiError 400 names the limit."""
    if not messages:
        raise ApiError(400, "at least one message is required", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(messages)} (limit {MAX_MESSAGES})", param="messages")
    convo, total = [], 0
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant", "system") or (m.role == "system" and i > 0):
            raise ApiError(400, f"message {i}: role must be 'user' or 'assistant' ('system' only first), "
                                f"got {m.role!r}", param=f"messages.{i}.role")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text for p in m.content if p.type == "text")
        if not content:
            raise ApiError(400, f"message {i}: content is empty", param=f"messages.{i}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"message {i}: content is {len(content)} characters "
                                f"(limit {MAX_MESSAGE_CHARS} per message)", param=f"messages.{i}.content")
        total += len(content)
        convo.append({"role": m.role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"conversation is {total} characters (limit {MAX_TOTAL_CHARS} in total)",
                       param="messages")
    if convo[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    _in_range("temperature", temperature, *TEMPERATURE_RANGE)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {temperature})",
                       param="temperature")
    _in_range("top_k", top_k, *TOP_K_RANGE)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p")
    _in_range("max_tokens", max_tokens, *MAX_TOKENS_RANGE)
    _in_range("n", n, 1, MAX_N)
    _in_range("seed", seed, 0, 2**63 - 1)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
                       param="stop")
    params = [SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_k=DEFAULT_TOP_K if top_k is None else top_k,
        top_p=top_p,
        seed=None if seed is None else seed + i,  # n seeded choices must still differ from each other
        stop=tuple(stops)) for i in range(n)]
    return convo, params


# -----------------------------------------------------------------------------
# The replica's state: model, scheduler, metrics. Ray-free.

class ChatService:
    def __init__(self, cfg, model=None, tokenizer=None):
        self.cfg = cfg
        self.device = "cuda" if cfg.gpus_per_replica and torch.cuda.is_available() else "cpu"
        self.step = None  # checkpoint step, when loaded from storage
        if model is None:
            model, tokenizer, self.step = self._load(cfg, self.device)
        self.model, self.tokenizer = model, tokenizer
        if cfg.checkpoint:
            self.model_id = f"nanochat-{os.path.basename(cfg.checkpoint.rstrip('/'))}"
        else:
            self.model_id = f"nanochat-{cfg.source}" + (f"-{cfg.model_tag}" if cfg.model_tag else "")
        self.seq_len = model.config.sequence_len
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.scheduler = Scheduler(model, tokenizer, cfg.max_batch, cfg.max_waiting,
                                   stall_timeout=cfg.stall_timeout).start()
        self.started = time.time()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not inside Serve (tests, tools)
            self.replica = "local"
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("nanochat_requests", "HTTP requests and WebSocket turns", ["route", "status"],
                                  registry=r)
        self.m_errors = Counter("nanochat_errors", "requests answered with an error", ["route", "status"], registry=r)
        self.m_tokens = Counter("nanochat_tokens_generated", "completion tokens generated", registry=r)
        self.m_prompt_tokens = Counter("nanochat_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.m_ttft = Histogram("nanochat_time_to_first_token_seconds", "submit to first text", registry=r,
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.m_itl = Histogram("nanochat_inter_token_latency_seconds", "time per streamed token", registry=r,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        Gauge("nanochat_active_requests", "requests decoding in the batch", registry=r).set_function(
            lambda: len(self.scheduler.rows))
        Gauge("nanochat_waiting_requests", "requests waiting for a batch row", registry=r).set_function(
            lambda: len(self.scheduler.waiting))

    @staticmethod
    def _load(cfg, device):
        from nanochat.checkpoint_manager import build_model, find_last_step, load_model
        if cfg.checkpoint:
            step = cfg.step if cfg.step is not None else find_last_step(cfg.checkpoint)
            model, tokenizer, meta = build_model(cfg.checkpoint, step, device, "eval", base_dir=cfg.storage)
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

    def submit(self, prompt, params):
        try:
            batch = AsyncRequests(self.scheduler, prompt, params)
        except Overloaded as e:
            raise ApiError(503, str(e), code="overloaded") from None
        self.m_prompt_tokens.inc(len(prompt) * len(params))
        return batch

    async def events(self, batch):
        """(index, event) of a batch, observing latency metrics on the way."""
        last = {}
        async for i, ev in batch:
            now = time.monotonic()
            if "text" in ev:
                if i not in last:
                    self.m_ttft.observe(now - batch.requests[i].submitted_at)
                else:
                    self.m_itl.observe((now - last[i]) / max(ev["tokens"], 1))
                last[i] = now
            elif ev.get("done"):
                self.m_tokens.inc(ev["completion_tokens"])
                if ev["finish_reason"] == "error":
                    raise ApiError(500, f"generation failed: {ev.get('error')}")
            yield i, ev

    def health(self):
        return {"status": self.scheduler.health_problem() or "ok", "model_loaded": True,
                "model": self.model_id, "step": self.step, "replica": self.replica, "pid": os.getpid(),
                "device": self.device,
                "uptime_s": round(time.time() - self.started, 1), "scheduler": self.scheduler.snapshot()}


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -----------------------------------------------------------------------------
# The HTTP API

KNOWN_ROUTES = {"/", "/chat", "/ws", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class CountRequests:
    """Pure ASGI middleware counting responses by route and status (a BaseHTTPMiddleware would get in the
    way of streaming and of disconnect propagation)."""

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            status[0] = 499  # the client went away before an answer started (nginx's code for it)
            raise
        finally:
            self.service.m_requests.labels(route, str(status[0])).inc()
            if status[0] >= 400:
                self.service.m_errors.labels(route, str(status[0])).inc()


def make_api(service):
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = service.cfg
    ui_html = UI_PATH.read_text()

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        kind = {401: "authentication_error", 503: "overloaded_error"}.get(
            exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}},
                            status_code=exc.status, headers=headers)

    async def read_body(request, model_cls):
        """Parse the body ourselves: size, UTF-8 and JSON errors get a 400/413 that says which; a body of the
        wrong shape or types gets 422 naming the fields."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is {declared} bytes (limit {MAX_BODY_BYTES})")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        return parse(bytes(body), model_cls)

    def check_key(request):
        if cfg.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                   f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def sse(obj):
        return f"data: {json.dumps(obj)}\n\n"

    # -- pages and probes --------------------------------------------------------

    @app.get("/")
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        info = service.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    # -- nanochat's own chat API -------------------------------------------------

    def chat_job(req):
        if req.message is not None and req.messages is not None:
            raise ApiError(400, "send either 'message' or 'messages', not both")
        messages = [Message(role="user", content=req.message)] if req.message is not None else req.messages
        convo, params = validate(messages, req.temperature, req.top_k, req.top_p, req.max_tokens, req.seed,
                                 req.stop)
        prompt = service.prompt(convo)
        return prompt, service.submit(prompt, params)

    @app.post("/chat")
    async def chat(request: Request):
        req = await read_body(request, ChatRequest)
        prompt, batch = chat_job(req)
        if not req.stream:
            parts, done = [], None
            async for _, ev in service.events(batch):
                if "text" in ev:
                    parts.append(ev["text"])
                else:
                    done = ev
            return {"response": "".join(parts), "finish_reason": done["finish_reason"],
                    "usage": usage(len(prompt), done["completion_tokens"])}

        async def stream():
            try:
                async for _, ev in service.events(batch):
                    if "text" in ev:
                        yield sse({"token": ev["text"]})
                    else:
                        yield sse({"done": True, "finish_reason": ev["finish_reason"],
                                   "usage": usage(len(prompt), ev["completion_tokens"])})
            except ApiError as e:
                yield sse({"error": e.message})
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        # bounded: a client that sends turns faster than they are answered waits instead of growing the queue
        inbox, current = asyncio.Queue(maxsize=WS_MAX_QUEUED_TURNS), {"received": 0, "cancelled_upto": 0}

        async def reader():  # runs beside generation, so a disconnect or {"cancel": true} stops it at once
            try:
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                    if _is_cancel(raw):  # stops the running turn and every turn received before the cancel
                        current["cancelled_upto"] = current["received"]
                        if current.get("batch"):
                            current["batch"].cancel()
                        continue
                    current["received"] += 1
                    await inbox.put((current["received"], raw))
            finally:
                if current.get("batch"):
                    current["batch"].cancel()
                await inbox.put(None)
        reader_task = asyncio.create_task(reader())
        try:
            while (item := await inbox.get()) is not None:
                turn, raw = item
                if turn <= current["cancelled_upto"]:  # cancelled before it started: answered, never run
                    await websocket.send_json({"done": True, "finish_reason": "cancelled", "usage": usage(0, 0)})
                    continue
                try:
                    req = parse(raw.encode() if isinstance(raw, str) else raw, ChatRequest)
                    prompt, current["batch"] = chat_job(req)
                    async for _, ev in service.events(current["batch"]):
                        if "text" in ev:
                            await websocket.send_json({"token": ev["text"]})
                        else:
                            await websocket.send_json({"done": True, "finish_reason": ev["finish_reason"],
                                                       "usage": usage(len(prompt), ev["completion_tokens"])})
                    service.m_requests.labels("/ws", "200").inc()
                except ApiError as e:
                    service.m_requests.labels("/ws", str(e.status)).inc()
                    service.m_errors.labels("/ws", str(e.status)).inc()
                    await websocket.send_json({"error": e.message, "status": e.status})
                finally:
                    current.pop("batch", None)
        except Exception as e:  # the socket went away while we were sending
            logger.info(f"websocket closed: {type(e).__name__}")
        finally:
            reader_task.cancel()
            if current.get("batch"):
                current["batch"].cancel()

    # -- OpenAI-compatible API ---------------------------------------------------

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.started), "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        check_key(request)
        req = await read_body(request, CompletionRequest)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        convo, params = validate(req.messages, req.temperature, req.top_k, req.top_p, max_tokens, req.seed,
                                 req.stop, req.n)
        prompt = service.prompt(convo)
        batch = service.submit(prompt, params)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or service.model_id
        if not req.stream:
            texts, dones = [[] for _ in params], [None] * len(params)
            async for i, ev in service.events(batch):
                if "text" in ev:
                    texts[i].append(ev["text"])
                else:
                    dones[i] = ev
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                        "logprobs": None, "finish_reason": dones[i]["finish_reason"]} for i in range(len(params))]
            return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                    "usage": usage(len(prompt), sum(d["completion_tokens"] for d in dones))}

        def chunk(choices, **extra):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, **extra})

        async def stream():
            completion_tokens = 0
            for i in range(len(params)):  # the role comes first, as OpenAI sends it
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            try:
                async for i, ev in service.events(batch):
                    if "text" in ev:
                        yield chunk([{"index": i, "delta": {"content": ev["text"]}, "logprobs": None,
                                      "finish_reason": None}])
                    else:
                        completion_tokens += ev["completion_tokens"]
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": ev["finish_reason"]}])
                if (req.stream_options or {}).get("include_usage"):
                    yield chunk([], usage=usage(len(prompt), completion_tokens))
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    if cfg.cors_origins:
        origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(CountRequests, service=service)
    return app


def parse(body, model_cls):
    if len(body) > MAX_BODY_BYTES:  # HTTP bodies are cut off while reading; WebSocket frames arrive whole
        raise ApiError(413, f"request body is {len(body)} bytes (limit {MAX_BODY_BYTES})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise ApiError(422, f"invalid request: {problems}") from None


def _is_cancel(raw):
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("cancel") is True and len(data) == 1


# -----------------------------------------------------------------------------
# Ray Serve

@serve.deployment(name="ChatServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class ChatServer:
    """One replica: loads the model and runs the scheduler; the FastAPI app is built here, bound to it."""

    def __init__(self, config):
        self.service = ChatService(ServeConfig(**config))

    def __serve_build_asgi_app__(self):
        return make_api(self.service)

    def check_health(self):  # raising makes Serve replace the replica
        problem = self.service.scheduler.health_problem()
        if problem:
            raise RuntimeError(problem)

    def __del__(self):
        if hasattr(self, "service"):
            self.service.close()


def build_app(args=None):
    """Serve application builder: `serve run serve.app:build_app key=value ...` and config.yaml's import_path."""
    cfg = ServeConfig.from_args(args)
    options = dict(
        # routed requests must reach the scheduler, which sheds load itself (RAY.md P9: the default is 5);
        # WebSockets hold a slot for as long as they are open, hence the headroom
        max_ongoing_requests=cfg.max_batch + cfg.max_waiting + 64,
        max_queued_requests=4 * cfg.max_waiting,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    )
    if cfg.max_replicas and cfg.max_replicas > cfg.replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.max_batch}
    else:
        options["num_replicas"] = cfg.replicas
    return ChatServer.options(**options).bind(asdict(cfg))


app = build_app({})  # for `serve run serve.app:app`: defaults, storage from $NANOCHAT_BASE_DIR


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a nanochat checkpoint with Ray Serve. Blocks when it "
                                     "starts Ray itself; with RAY_ADDRESS set it deploys to that cluster and returns.")
    parser.add_argument("--storage", default=None,
                        help="storage root (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    parser.add_argument("-i", "--source", default="sft", choices=["sft", "rl", "mid", "base"])
    parser.add_argument("-g", "--model-tag", default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory instead of --source/--model-tag")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose)")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale from --replicas up to this")
    parser.add_argument("--gpus-per-replica", type=float, default=0)
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--api-key", default=None, help="Bearer key for /v1 routes (default $NANOCHAT_API_KEY)")
    parser.add_argument("--cors-origins", default="", help="comma-separated allowed origins, '*' for any")
    parser.add_argument("--max-batch", type=int, default=16, help="KV-cache rows per replica")
    parser.add_argument("--max-waiting", type=int, default=64, help="queued requests per replica before 503")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds a scheduler step may run before the replica reports itself unhealthy and Ray "
                             "Serve replaces it")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from ray_jobs.common import init_ray, storage_root
    args.storage = storage_root(args.storage)  # resolved and exported before Ray starts, so replicas see it
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(vars(args)), name="nanochat", route_prefix="/")
    if os.environ.get("RAY_ADDRESS"):
        # on a cluster we joined (e.g. under `ray job submit`) the app outlives this driver: deploy and return
        print(f"nanochat serving on http://{args.host}:{args.port}/ (stop it with `serve shutdown`)", flush=True)
        return
    # a Ray we started ourselves dies with this process, so keep it alive
    print(f"nanochat serving on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
