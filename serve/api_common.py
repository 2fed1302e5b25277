"""
What every route of the HTTP API shares: who may call (API key, WebSocket origins), reading and parsing a body,
server-sent events, and collecting a whole answer from a batch of requests.
"""
import hmac
import json
from urllib.parse import urlsplit

from serve.protocol import MAX_BODY_BYTES, ApiError, parse


class Access:
    """The API key and the WebSocket origins of one app."""

    def __init__(self, cfg):
        self.api_key = cfg.api_key
        self.origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]

    def key_ok(self, presented):
        return not self.api_key or hmac.compare_digest(str(presented).encode(), self.api_key.encode())

    @staticmethod
    def bearer(request):  # a WebSocket has the same headers as a Request
        header = request.headers.get("authorization", "")
        return header[len("Bearer "):] if header.startswith("Bearer ") else ""

    def check(self, request):
        if not self.key_ok(self.bearer(request)):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def origin_ok(self, websocket):
        """Browsers send Origin on every WebSocket and let any page open one, so a page the operator visits could
        drive a server on their loopback: only the page's own origin, or a configured one, may connect. Clients
        that are not browsers send no Origin."""
        origin = websocket.headers.get("origin")
        return origin is None or "*" in self.origins or origin in self.origins or \
            urlsplit(origin).netloc == websocket.headers.get("host")


async def read_body(request, model_cls):
    """Parse the body ourselves: size, UTF-8 and JSON errors get a 400/413 that says which; a body of the wrong
    shape or types gets 422 naming the fields."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {declared} bytes (limit {MAX_BODY_BYTES})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    return parse(bytes(body), model_cls)


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


async def collect(service, batch):
    """The whole answer of a batch: ([text per request], [its final event], [its tokens' TokenLogprob, where it
    asked for them])."""
    n = len(batch.requests)
    texts, dones, logprobs = [[] for _ in range(n)], [None] * n, [[] for _ in range(n)]
    async for i, ev in service.events(batch):
        if "text" in ev:
            texts[i].append(ev["text"])
            logprobs[i] += ev.get("logprobs", ())
        else:
            dones[i] = ev
    return ["".join(t) for t in texts], dones, logprobs
