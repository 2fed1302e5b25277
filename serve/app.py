"""
Serve the chat model with Ray Serve: one replica per GPU (or on CPU), each holding the model and a
continuous-batching scheduler (serve/scheduler.py), behind a FastAPI ingress built inside the replica.

Routes:
    GET  /                      the chat page (serve/ui.html)
    POST /chat                  {"message": str} or {"messages": [{role, content}...]} + optional temperature,
                                top_k, top_p, max_tokens, seed, stop -> {"response", "finish_reason", "usage"};
                                with "stream": true: SSE events {"token": ...} ... then {"done": true, "usage"}
    WS   /ws                    the same JSON per turn -> {"token": ...} messages, then {"done": true, "usage"};
                                several turns per socket; {"cancel": true} stops the current and queued turns;
                                with a key: Authorization header, or {"api_key": KEY} as the first message
    POST /v1/chat/completions   OpenAI-compatible (stream as SSE ending in [DONE], n, stop, seed, top_k via
                                extra_body, usage, finish_reason)
    GET  /v1/models
    GET  /health                model loaded, scheduler alive, this replica's batch
    GET  /metrics               Prometheus text, this replica's counters and histograms

With an API key configured, /chat, /ws, /v1/* and /metrics require it (Authorization: Bearer KEY); / and /health
stay open. /ws takes connections from the page's own origin, or the --cors-origins list, or non-browser clients.

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
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray import serve

from nanochat.storage import is_uri
from serve.protocol import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, Message, api_key_of,
                            is_cancel, parse, usage, validate)
from serve.scheduler import AsyncRequests, Overloaded, Scheduler

logger = logging.getLogger("nanochat.serve")

UI_PATH = Path(__file__).with_name("ui.html")
WS_MAX_QUEUED_TURNS = 8  # per socket, beside the one being answered; one more closes the socket


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
    api_key: str | None = None  # Bearer key for every generating route and /metrics; default $NANOCHAT_API_KEY
    cors_origins: str = ""  # comma-separated origins allowed cross-site ("*" = any); empty = same origin only
    max_batch: int = 16  # KV-cache rows per replica
    max_waiting: int = 64  # waiting requests per replica before answering 503
    stall_timeout: float = 60.0  # a scheduler step running longer than this = unhealthy (Serve replaces it)
    ws_idle_timeout: float = 300.0  # a WebSocket with no frame and no work for this long is closed
    ws_max_sockets: int = 64  # open WebSockets per replica (each also holds a Serve request slot)

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


# -----------------------------------------------------------------------------
# The replica's state: model, scheduler, metrics. Ray-free.

class ChatService:
    def __init__(self, cfg, model=None, tokenizer=None):
        self.cfg = cfg
        self.device = "cuda" if cfg.gpus_per_replica and torch.cuda.is_available() else "cpu"
        self.step = None  # checkpoint step, when loaded from storage
        if model is None:
            model, tokenizer, self.step, self.scheduler = self._load_and_schedule(cfg, self.device)
        else:
            self.scheduler = Scheduler(model, tokenizer, cfg.max_batch, cfg.max_waiting,
                                       stall_timeout=cfg.stall_timeout).start()
        self.model, self.tokenizer = model, tokenizer
        if cfg.checkpoint:
            self.model_id = f"nanochat-{os.path.basename(cfg.checkpoint.rstrip('/'))}"
        else:
            self.model_id = f"nanochat-{cfg.source}" + (f"-{cfg.model_tag}" if cfg.model_tag else "")
        self.seq_len = model.config.sequence_len
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.started = time.time()
        self.open_sockets = 0
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
        Gauge("nanochat_open_websockets", "WebSockets open on this replica", registry=r).set_function(
            lambda: self.open_sockets)

    @classmethod
    def _load_and_schedule(cls, cfg, device):
        """Load the model on a thread that then runs the scheduler, so that all of the replica's torch work happens
        on one thread (see Scheduler.run): (model, tokenizer, step, scheduler), or the loading error."""
        ready = queue.Queue()

        def torch_thread():
            try:
                model, tokenizer, step = cls._load(cfg, device)
                scheduler = Scheduler(model, tokenizer, cfg.max_batch, cfg.max_waiting,
                                      stall_timeout=cfg.stall_timeout)
                scheduler.running, scheduler.thread = True, threading.current_thread()  # accepts work from now
            except BaseException as e:
                ready.put(e)
                return
            ready.put((model, tokenizer, step, scheduler))
            scheduler.run()
        threading.Thread(target=torch_thread, name="nanochat-scheduler", daemon=True).start()
        out = ready.get()
        if isinstance(out, BaseException):
            raise out
        return out

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
                "model": self.model_id, "step": self.step, "replica": self.replica, "device": self.device,
                "uptime_s": round(time.time() - self.started, 1), "scheduler": self.scheduler.snapshot()}


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

    def key_ok(presented):
        return not cfg.api_key or hmac.compare_digest(str(presented).encode(), cfg.api_key.encode())

    def bearer(request):  # a WebSocket has the same headers as a Request
        header = request.headers.get("authorization", "")
        return header[len("Bearer "):] if header.startswith("Bearer ") else ""

    def check_key(request):
        if not key_ok(bearer(request)):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]

    def origin_ok(websocket):
        """Browsers send Origin on every WebSocket and let any page open one, so a page the operator visits could
        drive a server on their loopback: only the page's own origin, or a configured one, may connect. Clients
        that are not browsers send no Origin."""
        origin = websocket.headers.get("origin")
        return origin is None or "*" in origins or origin in origins or \
            urlsplit(origin).netloc == websocket.headers.get("host")

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
    async def metrics(request: Request):
        check_key(request)
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
        check_key(request)
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
        if not origin_ok(websocket):
            return await websocket.close(code=1008)  # before accept: the handshake is refused with a 403
        await websocket.accept()
        if service.open_sockets >= cfg.ws_max_sockets:
            await websocket.send_json({"error": f"too many open WebSockets on this replica (limit "
                                                f"{cfg.ws_max_sockets}); retry later", "status": 503})
            return await websocket.close(code=1013)  # "try again later"
        service.open_sockets += 1
        try:
            await ws_session(websocket)
        except Exception as e:  # the socket went away while we were sending
            logger.info(f"websocket closed: {type(e).__name__}")
        finally:
            service.open_sockets -= 1

    async def ws_session(websocket):
        """Turns are read beside generation, so a disconnect or {"cancel": true} acts at once. Waiting turns sit
        in a bounded inbox; a client that overfills it is closed rather than queued without limit."""
        inbox = asyncio.Queue(maxsize=WS_MAX_QUEUED_TURNS)
        state = {"received": 0, "cancelled_upto": 0, "batch": None, "closed": False, "active_at": time.monotonic()}
        authed = cfg.api_key is None or key_ok(bearer(websocket))

        async def close(message, status, code):
            await websocket.send_json({"error": message, "status": status})
            await websocket.close(code=code)

        async def reader():
            nonlocal authed
            receive = asyncio.ensure_future(websocket.receive())
            try:
                while True:
                    # never cancel a receive (a frame could be lost): wait on the same one until it completes
                    busy = state["batch"] is not None or not inbox.empty()
                    left = state["active_at"] + cfg.ws_idle_timeout - time.monotonic()
                    if not busy and left <= 0:
                        await close(f"idle for {cfg.ws_idle_timeout:g} s, closing", 408, 1000)
                        break
                    done, _ = await asyncio.wait({receive}, timeout=min(max(left, 0.01), 1.0) if busy else left)
                    if not done:
                        continue
                    state["active_at"] = time.monotonic()
                    msg = receive.result()
                    if msg["type"] == "websocket.disconnect":
                        break
                    receive = asyncio.ensure_future(websocket.receive())
                    raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                    if not authed:  # the key comes first, as {"api_key": KEY}, from clients that set no header
                        if not key_ok(api_key_of(raw)):
                            await close("invalid or missing API key (send Authorization: Bearer <key>, or "
                                        '{"api_key": "<key>"} as the first message)', 401, 1008)
                            break
                        authed = True
                        await websocket.send_json({"authenticated": True})
                        continue
                    if is_cancel(raw):  # stops the running turn and every turn received before the cancel
                        state["cancelled_upto"] = state["received"]
                        if state["batch"]:
                            state["batch"].cancel()
                        continue
                    if inbox.full():
                        await close(f"more than {WS_MAX_QUEUED_TURNS} turns queued on this socket", 429, 1008)
                        break
                    state["received"] += 1
                    inbox.put_nowait((state["received"], raw))
            except Exception as e:  # the socket went away while we were answering it
                logger.info(f"websocket reader stopped: {type(e).__name__}")
            finally:
                receive.cancel()
                state["closed"] = True  # everything of this socket's stops: the running turn and the queued ones
                if state["batch"]:
                    state["batch"].cancel()
                while not inbox.empty():
                    inbox.get_nowait()
                inbox.put_nowait(None)
        reader_task = asyncio.create_task(reader())
        try:
            while (item := await inbox.get()) is not None and not state["closed"]:
                turn, raw = item
                if turn <= state["cancelled_upto"]:  # cancelled before it started: answered, never run
                    await websocket.send_json({"done": True, "finish_reason": "cancelled", "usage": usage(0, 0)})
                    continue
                try:
                    req = parse(raw.encode() if isinstance(raw, str) else raw, ChatRequest)
                    prompt, state["batch"] = chat_job(req)
                    async for _, ev in service.events(state["batch"]):
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
                    state["batch"], state["active_at"] = None, time.monotonic()  # idle time counts from here
        finally:
            reader_task.cancel()
            if state["batch"]:
                state["batch"].cancel()

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

    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(CountRequests, service=service)
    return app


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
    parser.add_argument("--api-key", default=None, help="Bearer key required by /chat, /ws, /v1/* and /metrics "
                        "(default $NANOCHAT_API_KEY; none = open)")
    parser.add_argument("--cors-origins", default="", help="comma-separated origins allowed cross-site, for HTTP "
                        "(CORS) and /ws; '*' for any; default: the page's own origin only")
    parser.add_argument("--max-batch", type=int, default=16, help="KV-cache rows per replica")
    parser.add_argument("--max-waiting", type=int, default=64, help="queued requests per replica before 503")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds a scheduler step may run before the replica reports itself unhealthy and Ray "
                             "Serve replaces it")
    parser.add_argument("--ws-idle-timeout", type=float, default=300.0,
                        help="seconds a WebSocket may stay open with no frame and no work before it is closed")
    parser.add_argument("--ws-max-sockets", type=int, default=64, help="open WebSockets per replica")
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
