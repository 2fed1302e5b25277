"""Hostile clients against the serve app, without Ray: the FastAPI app of serve/api.py on uvicorn at a loopback port
(real HTTP and WebSocket, real clients), on a tiny random-weight model. A fuzz harness over every route, the API key
on every generating route, WebSocket origins and limits, and 64 concurrent streams with a third walking away.
test_serve.py runs the same app under Ray Serve."""
import asyncio
import json
import math
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from bench.bench_serve import LocalServer, mixed_load
from serve.api import make_api
from serve.app import ServeConfig
from serve.service import ChatService
from serve.protocol import MAX_BODY_BYTES
from test_serve import BAD_INPUTS, tiny_chat_model

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED_ORIGIN = "http://allowed.test"
CONFIG = dict(api_key=KEY, cors_origins=ALLOWED_ORIGIN, max_batch=16, max_waiting=64, ws_idle_timeout=1.5,
              ws_max_sockets=24)  # the load test opens 21


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    service = ChatService(ServeConfig(**CONFIG), tiny_chat_model(tiny_tokenizer), tiny_tokenizer)
    try:
        with LocalServer(make_api(service)) as srv:
            srv.service = service
            yield srv
    finally:
        service.close()


def idle(service, timeout=20):
    """True once the scheduler holds no row and no waiting request (every row freed)."""
    deadline = time.time() + timeout
    while (service.scheduler.rows or service.scheduler.waiting) and time.time() < deadline:
        time.sleep(0.02)
    return not service.scheduler.rows and not service.scheduler.waiting


def ws_url(server):
    return server.url.replace("http", "ws", 1) + "/ws"


def ws_turn(ws, turn):
    """Send a turn, read to its end: (text, last message)."""
    ws.send(turn if isinstance(turn, (str, bytes)) else json.dumps(turn))
    text = []
    while "token" in (msg := json.loads(ws.recv(timeout=30))):
        text.append(msg["token"])
    return "".join(text), msg


# -----------------------------------------------------------------------------
# fuzz: every field of every body replaced by every kind of wrong value

VALID_CHAT = {"message": "hi", "max_tokens": 2, "temperature": 0}
VALID_OPENAI = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
VALID_COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 2, "temperature": 0}
FIELDS = ["message", "messages", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "stream", "n",
          "max_completion_tokens", "stream_options", "logprobs", "top_logprobs"]
COMPLETION_FIELDS = ["prompt", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "stream", "n",
                     "echo", "logprobs", "stream_options"]
WRONG_VALUES = [None, "", "x" * 9000, -1, 0, 10**30, 1e308, math.nan, math.inf, -math.inf, [], {}, True,
                [[[[["deep"]]]]], {"role": "user"}, [None], ["a"] * 100, [{"role": "user", "content": 5}],
                [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}],
                [{"role": "assistant", "content": "a"}], [{"role": "user", "content": [{"type": "image"}]}]]


def mutations(valid, fields):
    for field in fields:
        for value in WRONG_VALUES:
            body = dict(valid)
            body[field] = value
            if body.get("max_tokens") is None and "max_tokens" in body:
                body.pop("max_tokens")
            # keep every accepted request short: a mutation that is valid must not run to the default 512 tokens
            body.setdefault("max_tokens", 2) if field != "max_tokens" else None
            yield body


def check_answer(r, body):
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and isinstance(error["message"], str), (body, r.text[:300])
    elif body.get("stream") is True:
        assert r.text.startswith("data: "), r.text[:300]


def test_fuzz_every_route_gets_4xx_with_a_message_and_leaks_nothing(server):
    session = requests.Session()
    session.headers.update(AUTH)
    counts = {"2xx": 0, "4xx": 0}
    for route, valid, fields in (("/chat", VALID_CHAT, FIELDS), ("/v1/chat/completions", VALID_OPENAI, FIELDS),
                                 ("/v1/completions", VALID_COMPLETION, COMPLETION_FIELDS)):
        for body in mutations(valid, fields):
            # NaN and inf go out as JSON's non-standard literals, which Python's parser accepts
            r = session.post(server.url + route, data=json.dumps(body), timeout=60,
                             headers={"Content-Type": "application/json"})
            check_answer(r, body)
            counts["2xx" if r.status_code < 300 else "4xx"] += 1
        for raw, status, words in BAD_INPUTS:  # the hand-written cases, on both routes
            data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
            r = session.post(server.url + route, data=data, timeout=60, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (route, data[:80], r.text[:300])
    # a body larger than the cap, without a Content-Length (chunked): cut off while reading
    r = session.post(server.url + "/chat", data=iter([b"{" + b" " * MAX_BODY_BYTES, b"}"]), timeout=60)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    for method, route in (("get", "/chat"), ("put", "/v1/chat/completions"), ("post", "/health"),
                          ("get", "/no/such/route")):
        assert 400 <= getattr(session, method)(server.url + route, timeout=10).status_code < 500
    assert counts["4xx"] > 200 and counts["2xx"] > 20, counts  # the harness does reach both outcomes
    assert idle(server.service), server.service.scheduler.snapshot()
    r = session.post(server.url + "/chat", json={"message": "still here?", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert session.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_fuzz_websocket_frames_get_errors_and_the_socket_stays_usable(server):
    frames = [json.dumps(b) for b in mutations(VALID_CHAT, FIELDS)]
    frames += ["", "null", "[]", "{", "\"text\"", '{"message": "hi", "max_tokens": 2, "temperature": NaN}',
               "[" * 50_000 + "]" * 50_000, json.dumps({"message": "x" * (MAX_BODY_BYTES + 1)})]
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        for frame in frames:
            text, last = ws_turn(ws, frame)
            if "error" in last:
                assert 400 <= last["status"] < 500 and last["error"], (frame[:100], last)
            else:
                assert last["done"] and last["finish_reason"] in ("length", "stop"), (frame[:100], last)
        ws.send(b"\xff\xfe not utf-8")  # a binary frame that is not UTF-8
        assert json.loads(ws.recv(timeout=30))["status"] == 400
        text, last = ws_turn(ws, {"message": "usable?", "max_tokens": 3, "temperature": 0})
        assert last["done"] and last["usage"]["completion_tokens"] == 3
    assert idle(server.service)


# -----------------------------------------------------------------------------
# auth and origins

def test_every_generating_route_and_metrics_need_the_key(server):
    url = server.url
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, route, kwargs in (("post", "/chat", {"json": {"message": "hi", "max_tokens": 2}}),
                                  ("post", "/v1/chat/completions", {"json": body}),
                                  ("get", "/v1/models", {}), ("get", "/metrics", {})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):  # the last lacks "Bearer"
            r = getattr(requests, method)(url + route, headers=headers, timeout=30, **kwargs)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (route, headers, r.text)
        assert getattr(requests, method)(url + route, headers=AUTH, timeout=60, **kwargs).status_code == 200
    health = requests.get(url + "/health", timeout=10)  # open, for load balancers, and discloses no pid
    assert health.status_code == 200 and "pid" not in health.json()
    assert requests.get(url + "/", timeout=10).status_code == 200

    # /ws: the header, or the key as the first message (browsers cannot set headers on a WebSocket)
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        assert ws_turn(ws, {"message": "hi", "max_tokens": 2})[1]["done"]
    with connect(ws_url(server), open_timeout=30) as ws:
        ws.send(json.dumps({"api_key": KEY}))
        assert json.loads(ws.recv(timeout=30)) == {"authenticated": True}
        assert ws_turn(ws, {"message": "hi", "max_tokens": 2})[1]["done"]
    for first in ({"api_key": "wrong"}, {"message": "hi", "max_tokens": 2}):  # no key: a turn is not run
        with connect(ws_url(server), open_timeout=30) as ws:
            ws.send(json.dumps(first))
            reply = json.loads(ws.recv(timeout=30))
            assert reply["status"] == 401 and "API key" in reply["error"], reply
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            assert ws.close_code == 1008
    assert idle(server.service)


def test_websocket_origins(server):
    """A web page elsewhere cannot drive the server through the operator's browser: /ws takes the page's own
    origin, the configured one, or clients that send no Origin (not browsers)."""
    host = server.url.split("//")[1]
    for origin in ("http://evil.test", f"http://{host}.evil.test", "null"):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(server), additional_headers={**AUTH, "Origin": origin}, open_timeout=30)
        assert refused.value.response.status_code == 403
    for origin in (server.url, ALLOWED_ORIGIN):
        with connect(ws_url(server), additional_headers={**AUTH, "Origin": origin}, open_timeout=30) as ws:
            assert ws_turn(ws, {"message": "hi", "max_tokens": 2})[1]["done"]


# -----------------------------------------------------------------------------
# WebSocket limits

def test_websocket_idle_timeout_socket_cap_queue_cap_and_disconnect(server):
    service = server.service
    # idle: no frame and no work for ws_idle_timeout closes the socket; a socket that is generating is not idle
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        text, last = ws_turn(ws, {"message": "long", "max_tokens": 300, "temperature": 0})
        assert last["usage"]["completion_tokens"] == 300
        t0 = time.time()
        reply = json.loads(ws.recv(timeout=30))
        assert reply["status"] == 408 and "idle" in reply["error"] and time.time() - t0 >= 1.0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)

    # the cap on open sockets, separate from batch rows: one more than the cap is told to come back later
    sockets = [connect(ws_url(server), additional_headers=AUTH, open_timeout=30)
               for _ in range(CONFIG["ws_max_sockets"])]
    try:
        with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as extra:
            reply = json.loads(extra.recv(timeout=30))
            assert reply["status"] == 503 and "too many open WebSockets" in reply["error"]
            with pytest.raises(ConnectionClosed):
                extra.recv(timeout=30)
            assert extra.close_code == 1013
        assert ws_turn(sockets[0], {"message": "hi", "max_tokens": 2})[1]["done"]  # the open ones still work
    finally:
        for ws in sockets:
            ws.close()
    deadline = time.time() + 10
    while service.open_sockets and time.time() < deadline:
        time.sleep(0.02)
    assert service.open_sockets == 0

    # the inbox holds 8 turns behind the running one; a client that sends more is closed, its work stopped
    before = service.scheduler.snapshot()
    with connect(ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        try:
            for _ in range(12):
                ws.send(json.dumps({"message": "flood", "max_tokens": 1000, "temperature": 0}))
        except ConnectionClosed:  # the server may close it before the twelfth: the messages sent before it remain
            pass
        while "token" in (msg := json.loads(ws.recv(timeout=30))):
            pass
        assert msg["status"] == 429 and "turns queued" in msg["error"], msg
    assert idle(service)
    time.sleep(0.5)  # nothing queued starts later
    after = service.scheduler.snapshot()  # at most the first turn ran, and it was stopped
    assert after["admitted"] - before["admitted"] <= 1 and after["tokens"] - before["tokens"] < 1000

    # a disconnect cancels the running turn and drops the queued ones: none of them runs afterwards
    before = service.scheduler.snapshot()
    ws = connect(ws_url(server), additional_headers=AUTH, open_timeout=30)
    for _ in range(4):
        ws.send(json.dumps({"message": "bye", "max_tokens": 1000, "temperature": 0}))
    assert "token" in json.loads(ws.recv(timeout=30))
    ws.close()
    assert idle(service)
    after = service.scheduler.snapshot()
    assert after["cancelled"] == before["cancelled"] + 1 and after["tokens"] - before["tokens"] < 1000
    time.sleep(0.5)  # nothing queued starts later
    assert service.scheduler.snapshot()["admitted"] == after["admitted"] == before["admitted"] + 1


# -----------------------------------------------------------------------------
# load

def test_64_streams_over_sse_openai_and_websocket_with_a_third_disconnecting(server):
    summary = asyncio.run(mixed_load(server.url, streams=64, max_tokens=24, api_key=KEY))
    assert summary["failed"] == 0 and summary["errors"] == [], summary
    assert summary["disconnected"] == 22 and summary["completed"] == 42, summary
    assert set(summary["statuses"]) == {"200", "101"}, summary  # no 5xx, no 503: 64 fit in rows + waiting
    assert summary["completion_tokens"] == 42 * 24
    assert idle(server.service), server.service.scheduler.snapshot()


def test_a_request_bigger_than_the_kv_budget_is_a_400_and_harms_nobody(tiny_tokenizer):
    """0.05 MiB of KV memory (a few hundred tokens): a request whose prompt and max_tokens need more is refused
    with a message, while one that fits is answered."""
    cfg = ServeConfig(api_key=KEY, kv_cache_mb=0.05)
    service = ChatService(cfg, tiny_chat_model(tiny_tokenizer), tiny_tokenizer)
    try:
        with LocalServer(make_api(service)) as srv:
            usable = service.scheduler.pool.usable_blocks
            too_big = requests.post(srv.url + "/chat", headers=AUTH, timeout=30,
                                    json={"message": "hi", "max_tokens": 4000})
            assert too_big.status_code == 400, too_big.text
            assert f"KV blocks; the replica has {usable}" in too_big.json()["error"]["message"]
            fits = requests.post(srv.url + "/chat", headers=AUTH, timeout=30, json={"message": "hi", "max_tokens": 8})
            assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 8
    finally:
        service.close()
