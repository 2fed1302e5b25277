"""
Serve the chat model with Ray Serve: one replica per GPU (or on CPU), each a ChatService (serve/service.py: the
model and its continuous-batching scheduler) behind the FastAPI app of serve/api.py, built inside the replica.

Routes:
    GET  /                      the chat page (serve/ui.html)
    POST /chat                  {"message": str} or {"messages": [{role, content}...]} + optional temperature,
                                top_k, top_p, max_tokens, seed, stop -> {"response", "finish_reason", "usage"};
                                with "stream": true: SSE events {"token": ...} ... then {"done": true, "usage"}
    WS   /ws                    the same JSON per turn -> {"token": ...} messages, then {"done": true, "usage"};
                                several turns per socket; {"cancel": true} stops the current and queued turns;
                                with a key: Authorization header, or {"api_key": KEY} as the first message
    POST /v1/chat/completions   OpenAI-compatible (stream as SSE ending in [DONE], n, stop, seed, top_k via
                                extra_body, logprobs / top_logprobs, usage, finish_reason)
    POST /v1/completions        as vLLM serves it: text or token-id prompts, several at once, echo, logprobs
    POST /tokenize, /detokenize, GET /tokenizer_info   the server's tokenizer, in vLLM's shapes
    GET  /v1/models
    GET  /health                model loaded, scheduler alive, this replica's batch
    GET  /metrics               Prometheus text in vLLM's names (serve/metrics.py)

Requests with an X-Session-Id header (a conversation id) go to the replica that served that session before, where
its earlier turns are in the prefix cache (serve/router.py).

With an API key configured, /chat, /ws, /v1/* and /metrics require it (Authorization: Bearer KEY); / and /health
stay open. /ws takes connections from the page's own origin, or the --cors-origins list, or non-browser clients.

Run (all three bind 127.0.0.1:8000 unless told otherwise):
    python -m serve.app --storage ROOT --source sft [--model-tag d20] [--step S] [--port 8000]
                        [--replicas 2 --gpus-per-replica 1] [--api-key KEY]
    serve run serve.app:app                       (defaults; storage from $NANOCHAT_BASE_DIR)
    serve run serve.app:build_app source=sft model_tag=d20 replicas=2 gpus_per_replica=1
    serve deploy serve/config.yaml
"""
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from nanochat.checkpoint_manager import pin_source
from nanochat.flags import ArgsMixin, flag, value_type
from nanochat.storage import is_uri
from serve.api import make_api
from serve.metrics import merge_replicas
from serve.protocol import ApiError
from serve.router import SessionAffinityRouter, affinity_key, rendezvous
from serve.scheduler import SamplingParams
from serve.service import ChatService

logger = logging.getLogger("nanochat.serve")


@dataclass
class ServeConfig(ArgsMixin):
    storage: str | None = flag(None, "storage root (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    source: str = flag("sft", "model to serve: sft|rl|mid|base under the storage root, a model directory (Hugging "
                              "Face export or nanochat layout) or a Hugging Face Hub repo id owner/name[@revision]",
                       aliases=["-i"])
    model_tag: str | None = flag(None, "model tag, e.g. d20 (default: the largest)", aliases=["-g"])
    step: int | None = flag(None, "checkpoint step (default: the last)", aliases=["-s"])
    checkpoint: str | None = flag(None, "a checkpoint directory, instead of --source / --model-tag")
    host: str = flag("127.0.0.1", "bind address (0.0.0.0 to expose)")
    port: int = flag(8000, "HTTP port", aliases=["-p"])
    replicas: int = flag(1, "replicas (one model copy each)")
    max_replicas: int | None = flag(None, "above --replicas: autoscale between the two")
    gpus_per_replica: float = flag(0, "GPUs per replica (0: CPU)")
    cpus_per_replica: float = flag(1, "CPUs per replica")
    api_key: str | None = flag(None, "Bearer key required by /chat, /ws, /v1/* and /metrics "
                                     "(default $NANOCHAT_API_KEY; none: open)")
    cors_origins: str = flag("", "comma-separated origins allowed cross-site, for HTTP (CORS) and /ws; '*' for any; "
                                 "default: the page's own origin only")
    max_batch: int = flag(16, "requests running at once per replica (decoded together)")
    max_waiting: int = flag(64, "requests waiting per replica before answering 503")
    kv_cache_mb: float = flag(0, "KV-cache memory per replica in MiB, allocated in blocks (0: half of the GPU "
                                 "memory free after loading the model; on CPU what max_batch full contexts take)")
    block_size: int = flag(16, "tokens per KV-cache block (the prefix cache shares whole blocks)")
    prefix_cache: bool = flag(True, "keep finished requests' KV blocks and reuse them for prompts that start the "
                                    "same way (earlier turns of a chat, a shared system prompt)")
    affinity: bool = flag(True, "send a conversation's requests to the replica that holds its earlier turns: by "
                                "their X-Session-Id header, else by their prompt's opening")
    prefill_chunk: int = flag(512, "prompt tokens prefilled per scheduler step at most, in the decoding streams' "
                                   "forward (a long prompt is prefilled in chunks)")
    prefill_slowdown: float = flag(2.0, "while streams decode, a step with a prompt chunk takes at most this many "
                                        "times a decode-only step: chunks are sized from measured step times so the "
                                        "streams keep their pace (0: always --prefill-chunk)")
    stall_timeout: float = flag(60.0, "seconds a scheduler step may run before the replica reports itself unhealthy "
                                      "and Ray Serve replaces it")
    ws_idle_timeout: float = flag(300.0, "seconds a WebSocket may stay open with no frame and no work")
    ws_max_sockets: int = flag(64, "open WebSockets per replica")

    @classmethod
    def from_options(cls, args):
        """From a dict of strings or values (serve run key=value, config.yaml args, vars() of the parsed flags)."""
        args = {k.replace("-", "_"): v for k, v in (args or {}).items()}
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve option(s): {sorted(unknown)}")
        out = {}
        for f in fields(cls):
            v = args.get(f.name, f.default)
            if isinstance(v, str):  # values from `serve run k=v` arrive as strings
                kind = value_type(f)
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
# Ray Serve

@ray.remote(num_cpus=0)
class MetricsBoard:
    """Every replica's latest metrics text, so that /metrics on any replica shows them all."""

    def __init__(self):
        self.texts = {}

    def put(self, replica, text):
        self.texts[replica] = (text, time.time())

    def get(self, max_age=30.0):  # a replica that stopped reporting (gone) drops out
        now = time.time()
        self.texts = {r: (t, at) for r, (t, at) in self.texts.items() if now - at <= max_age}
        return {r: t for r, (t, _) in self.texts.items()}

    def replicas(self, max_age=6.0):
        """The replicas that reported lately: the live ones, as far as placement by prompt is concerned."""
        now = time.time()
        return sorted(r for r, (_, at) in self.texts.items() if now - at <= max_age)


class RemoteRequests:
    """Requests running on another replica, as AsyncRequests look: (index, event) pairs, cancel()."""

    def __init__(self, stream, n):
        self.stream = stream
        now = time.monotonic()
        self.requests = [SimpleNamespace(submitted_at=now) for _ in range(n)]

    async def __aiter__(self):
        try:
            async for item in self.stream:
                yield item
        finally:
            self.cancel()

    def cancel(self):
        self.stream.cancel()


def metrics_board(app_name):
    return MetricsBoard.options(name=f"nanochat-metrics-{app_name}", namespace="serve", get_if_exists=True).remote()


@serve.deployment(name="ChatServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class ChatServer:
    """One replica: loads the model and runs the scheduler; the FastAPI app is built here, bound to it."""

    PUBLISH_EVERY_S = 2.0

    def __init__(self, config):
        context = serve.get_replica_context()
        cfg = ServeConfig(**config)
        self.service = ChatService(cfg, replica=context.replica_id.unique_id)
        self.app_name, self.deployment = context.app_name, context.deployment
        self.board = metrics_board(self.app_name)
        self.service.all_metrics = self.all_metrics
        if cfg.affinity:
            self.service.forward = self.forward
        self.user_end = self.service.tokenizer.encode_special("<|user_end|>")
        self.peers, self.live = None, ([], 0.0)  # (replica ids, when read)
        self.publisher = threading.Thread(target=self._publish, daemon=True)
        self.publisher.start()

    async def forward(self, prompt, params):
        """Run the request on the replica that owns its prompt's opening, when that is not this one: a batch that
        streams from there, or None (run here)."""
        key = affinity_key(prompt, self.user_end)
        replicas = await self.live_replicas()
        if len(replicas) < 2 or rendezvous(key, replicas) == self.service.replica:
            return None
        if self.peers is None:
            self.peers = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
        stream = self.peers.options(stream=True, session_id=key).generate.remote(prompt, [asdict(p) for p in params])
        try:
            await stream.__anext__()  # accepted there (or its ApiError, e.g. 503, surfaces here, before any reply)
        except Exception as e:
            cause = e if isinstance(e, ApiError) else getattr(e, "cause", None)  # (Ray wraps the replica's error)
            if isinstance(cause, ApiError):
                raise cause from None
            logger.warning("forwarding to the prompt's replica failed; serving it here", exc_info=True)
            return None
        return RemoteRequests(stream, len(params))

    async def live_replicas(self):
        if time.time() - self.live[1] > self.PUBLISH_EVERY_S:
            try:
                self.live = (await self.board.replicas.remote(), time.time())
            except ray.exceptions.RayActorError:
                self.board = metrics_board(self.app_name)
        return self.live[0]

    async def generate(self, prompt, params):
        """A request forwarded by another replica (see forward): run here, stream its events back, the first being
        an acknowledgement."""
        batch = self.service.submit_here([(prompt, SamplingParams(**p)) for p in params])
        yield None
        async for item in batch:
            yield item

    def _publish(self):
        # (a board that went with the replica that created it is replaced when next read, below)
        while self.service.scheduler.running:  # until the replica closes
            self.board.put.remote(self.service.replica, self.service.metrics.text())
            time.sleep(self.PUBLISH_EVERY_S)

    async def all_metrics(self):
        """Prometheus text of every live replica (this one's fresh), each series labelled with its replica."""
        texts = {}
        try:
            texts = await self.board.get.remote()
        except ray.exceptions.RayActorError:
            self.board = metrics_board(self.app_name)
        texts[self.service.replica] = self.service.metrics.text()
        return merge_replicas(texts)

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
    cfg = ServeConfig.from_options(args)
    # every replica loads the same model: a directory made absolute, a Hub repo pinned to its current commit
    cfg.source = pin_source(cfg.source)
    options = dict(
        # routed requests must reach the scheduler, which sheds load itself (Serve's default of 5 ongoing requests
        # would queue them in the proxy instead);
        # WebSockets hold a slot for as long as they are open, hence the headroom
        max_ongoing_requests=cfg.max_batch + cfg.max_waiting + 64,
        max_queued_requests=4 * cfg.max_waiting,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    )
    if cfg.affinity:
        options["request_router_config"] = RequestRouterConfig(request_router_class=SessionAffinityRouter)
    if cfg.max_replicas and cfg.max_replicas > cfg.replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.max_batch}
    else:
        options["num_replicas"] = cfg.replicas
    return ChatServer.options(**options).bind(asdict(cfg))


app = build_app({})  # for `serve run serve.app:app`: defaults, storage from $NANOCHAT_BASE_DIR


def parser():
    return ServeConfig.parser("Serve a nanochat checkpoint with Ray Serve. Blocks when it starts Ray itself; with "
                              "RAY_ADDRESS set it deploys to that cluster and returns.")


def main(argv=None):
    args = ServeConfig.from_args(parser().parse_args(argv))

    from nanochat.common import get_base_dir
    from ray_jobs.common import init_ray
    args.storage = get_base_dir(args.storage)  # resolved here, once: the replicas get it in their config
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(asdict(args)), name="nanochat", route_prefix="/")
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
