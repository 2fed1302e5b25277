"""The real Serve app on a tiny random-weight model, over real HTTP: every route, the official openai client, a
websockets client, bad inputs, overload, a client that disconnects mid-stream, and a killed replica."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
import torch
import yaml

from conftest import REPO_ROOT, TINY_VOCAB, perturbed

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CORS_ORIGIN = "http://allowed.test"
# sequence_len 1024: long enough that a generation is still running when a test acts on it
TEST_MODEL = dict(sequence_len=1024, vocab_size=TINY_VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def tiny_chat_model(tokenizer):
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = perturbed(build_model(GPTConfig(**TEST_MODEL)), scale=0.2)
    with torch.no_grad():  # special tokens never win greedy decoding, so replies run to max_tokens
        model.lm_head.weight[min(tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()):] = 0
    return model.eval()


def make_storage(root, tokenizer):
    """A storage root with the tokenizer and a tiny random sft checkpoint (d2, step 1)."""
    from nanochat.checkpoint_manager import save_checkpoint
    tokenizer.save(os.path.join(root, "tokenizer"))
    model = tiny_chat_model(tokenizer)
    save_checkpoint(os.path.join(root, "chatsft_checkpoints", "d2"), 1, model.state_dict(), None,
                    {"model_config": asdict(model.config)})
    return str(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root, **overrides):
    """serve.start on a free loopback port and run the app; returns its base URL."""
    from ray import serve
    from serve.app import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"storage": root, **overrides}), name="nanochat", route_prefix="/",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def wait_healthy(url, timeout=60, not_replica=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = requests.get(url + "/health", timeout=5)
            if r.status_code == 200 and r.json()["replica"] != not_replica:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


# One app serves this module and test_web_ui.py (starting Serve and a replica is the slow part of both):
# it is started on first use, and shut down by the last module that will use it.
_app = {}


def shared_app(tokenizer, tmp_path_factory):
    if _app:
        try:
            requests.get(_app["url"] + "/health", timeout=5).raise_for_status()
        except requests.RequestException:  # Ray was restarted by a module in between: start again
            _app.clear()
    if not _app:
        _app["root"] = root = make_storage(tmp_path_factory.mktemp("serve_storage"), tokenizer)
        _app["url"] = start_app(root, max_batch=4, max_waiting=4, api_key=API_KEY, cors_origins=CORS_ORIGIN)
    return _app["url"]


def shutdown_shared_app():
    if _app:
        from ray import serve
        serve.shutdown()
        _app.clear()


@pytest.fixture(scope="module", autouse=True)
def _shutdown_serve(request):
    yield
    ui_next = any(getattr(item.module, "UI_READY", False) for item in request.session.items
                  if item.module.__name__ == "test_web_ui")
    if not ui_next:  # else test_web_ui shuts it down when it is done
        shutdown_shared_app()


@pytest.fixture
def url(ray_local, tiny_tokenizer, tmp_path_factory):
    return shared_app(tiny_tokenizer, tmp_path_factory)


@pytest.fixture
def client(url):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def health(url):
    return requests.get(url + "/health", timeout=10).json()


def chat(url, **body):
    return requests.post(url + "/chat", json=body, headers=AUTH, timeout=60)


def sse_events(response):
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: ")]


# -----------------------------------------------------------------------------

def test_page_health_models_metrics(url, client):
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "nanochat" in page.text
    h = health(url)
    assert h["status"] == "ok" and h["model_loaded"] and h["scheduler"]["max_batch"] == 4
    assert [m.id for m in client.models.list().data] == ["nanochat-sft"]
    chat(url, message="Hello", max_tokens=3)
    metrics = requests.get(url + "/metrics", headers=AUTH, timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    parsed = [s for family in text_string_to_metric_families(metrics.text) for s in family.samples]
    assert {s.labels.get("replica") for s in parsed} == {h["replica"]}  # every series names its replica
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica"))): s.value
               for s in parsed}
    names = {name for name, _ in samples}
    for name in ("nanochat:num_requests_running", "nanochat:num_requests_waiting", "nanochat:kv_cache_usage_perc",
                 "nanochat:prefix_cache_queries_total", "nanochat:prefix_cache_hits_total",
                 "nanochat:prompt_tokens_total", "nanochat:generation_tokens_total",
                 "nanochat:time_to_first_token_seconds_bucket", "nanochat:inter_token_latency_seconds_bucket",
                 "nanochat:request_time_per_output_token_seconds_bucket", "nanochat:e2e_request_latency_seconds_bucket",
                 "nanochat:http_requests_total", "nanochat:open_websockets"):
        assert name in names, name
    assert samples[("nanochat:http_requests_total", (("route", "/chat"), ("status", "200")))] >= 1
    assert samples[("nanochat:request_success_total", (("finished_reason", "length"),))] >= 1
    assert samples[("nanochat:generation_tokens_total", ())] >= 3
    assert samples[("nanochat:e2e_request_latency_seconds_count", ())] >= 1


def test_chat_json_and_sse(url):
    r = chat(url, message="Hello", max_tokens=12, temperature=0)
    body = r.json()
    assert r.status_code == 200 and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == 12 + body["usage"]["prompt_tokens"]
    assert chat(url, message="Hello", max_tokens=12, temperature=0).json()["response"] == body["response"]
    # a multi-turn conversation, streamed: the same text arrives in pieces, then a done event with usage
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Hello"}]
    plain = chat(url, messages=messages, max_tokens=20, temperature=0).json()
    with requests.post(url + "/chat", json={"messages": messages, "max_tokens": 20, "temperature": 0,
                                            "stream": True}, headers=AUTH, stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert "".join(e["token"] for e in events if "token" in e) == plain["response"]
    assert events[-1]["done"] and len(events) > 2
    streamed = events[-1]["usage"]
    # the same prompt again: its whole blocks (of 16) come from the prefix cache, and usage says so
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert streamed.pop("prompt_tokens_details") == {"cached_tokens": (streamed["prompt_tokens"] - 1) // 16 * 16}
    assert streamed == {k: v for k, v in plain["usage"].items() if k != "prompt_tokens_details"}
    seeded = [chat(url, message="Hello", max_tokens=10, temperature=1.0, seed=s).json()["response"] for s in (5, 5, 6)]
    assert seeded[0] == seeded[1] != seeded[2]


def test_openai_client(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + 16
    # streaming gives the same text; usage on request
    chunks = list(client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    # n choices with a seed: reproducible, different from each other; usage sums them
    kw = dict(model="nanochat", messages=messages, max_tokens=10, temperature=1.0, top_p=0.95, seed=7, n=3,
              extra_body={"top_k": 50})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) == 3
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 30
    streamed = {}
    for c in client.chat.completions.create(**kw, stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    # a stop string cuts the text before it
    cut = text[3:6]
    r = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=16, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[:text.index(cut)]


def test_api_key_and_cors(url):
    from openai import AuthenticationError, OpenAI
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert requests.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 401
    r = requests.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    # every generating route and /metrics need the key; the page and /health do not, and /health tells no pid
    for route in ("/chat", "/metrics"):
        r = requests.request("POST" if route == "/chat" else "GET", url + route, json={"message": "Hi"}, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], route
    assert requests.get(url + "/", timeout=10).status_code == 200 and "pid" not in health(url)
    # /ws through Serve's proxy: a foreign page's origin is refused at the handshake, the page's own is let in
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect
    with pytest.raises(InvalidStatus, match="403"):
        connect(url.replace("http", "ws") + "/ws", additional_headers={**AUTH, "Origin": "http://evil.test"},
                open_timeout=30)
    with connect(url.replace("http", "ws") + "/ws", additional_headers={"Origin": url}, open_timeout=30) as ws:
        ws.send(json.dumps({"api_key": API_KEY}))  # as the browser does it: no header, the key first
        assert json.loads(ws.recv(timeout=30)) == {"authenticated": True}
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"}
    r = requests.options(url + "/chat", headers=preflight, timeout=10)
    assert r.headers.get("access-control-allow-origin") == CORS_ORIGIN
    r = requests.options(url + "/chat", headers={**preflight, "Origin": "http://evil.test"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers


def test_websocket_several_turns(url):
    from websockets.sync.client import connect
    with connect(url.replace("http", "ws") + "/ws", additional_headers=AUTH, open_timeout=30) as ws:
        replies = []
        for turn in ({"message": "Hello", "max_tokens": 8, "temperature": 0},
                     {"message": "Hello", "temperature": 9},  # an error answers the turn; the socket stays open
                     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}):
            ws.send(json.dumps(turn))
            tokens = []
            while True:
                msg = json.loads(ws.recv(timeout=30))
                if "token" in msg:
                    tokens.append(msg["token"])
                else:
                    break
            replies.append(("".join(tokens), msg))
        ws.send("not json")
        bad = json.loads(ws.recv(timeout=30))
        ws.send("[" * 100_000 + "]" * 100_000)  # RecursionError in the JSON parser used to kill the socket's reader
        deep = json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"message": "x" * (1 << 20)}))  # frames are capped like HTTP bodies
        huge = json.loads(ws.recv(timeout=30))
        # cancel stops the running turn and the one queued behind it (each still gets its "done"); the next turn
        # is answered
        ws.send(json.dumps({"message": "Hello", "max_tokens": 900, "temperature": 0}))
        ws.send(json.dumps({"message": "Hello", "max_tokens": 7, "temperature": 0}))
        ws.send(json.dumps({"cancel": True}))
        cancelled = []
        for _ in range(2):
            while "token" in (msg := json.loads(ws.recv(timeout=30))):
                pass
            cancelled.append(msg)
        ws.send(json.dumps({"message": "Hi", "max_tokens": 3, "temperature": 0}))
        while "token" in (after := json.loads(ws.recv(timeout=30))):
            pass
    assert replies[0][1]["done"] and replies[0][1]["usage"]["completion_tokens"] == 8
    assert replies[0][0] == chat(url, message="Hello", max_tokens=8, temperature=0).json()["response"]
    assert replies[1][1]["status"] == 400 and "temperature" in replies[1][1]["error"]
    assert replies[2][1]["done"] and replies[2][1]["usage"]["completion_tokens"] == 5
    assert bad["status"] == 400 and "JSON" in bad["error"]
    assert deep["status"] == 400 and "nested too deeply" in deep["error"]
    assert huge["status"] == 413 and "limit" in huge["error"]
    assert [m["finish_reason"] for m in cancelled] == ["cancelled", "cancelled"]
    assert cancelled[1]["usage"]["completion_tokens"] == 0 and after["usage"]["completion_tokens"] == 3


def _msgs(*contents):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


BAD_INPUTS = [  # (body, status, words the message must contain)
    (b'{"message": "hi"', 400, "malformed JSON"),
    (b'\xff\xfe{"message": "hi"}', 400, "UTF-8"),
    ({"messages": _msgs(*["hi"] * 501)}, 400, "limit 500"),
    ({"message": "x" * 8001}, 400, "limit 8000"),
    ({"messages": _msgs(*["y" * 7000] * 5)}, 400, "limit 32000"),
    ({"message": ""}, 400, "empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": _msgs("hi", "there")}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "alternate"),
    ({"message": "hi", "temperature": 2.5}, 400, "temperature must be between 0.0 and 2.0"),
    ({"message": "hi", "temperature": -0.1}, 400, "temperature"),
    ({"message": "hi", "temperature": 1e-300}, 400, "temperature must be 0 (greedy) or at least 0.001"),
    ({"message": "hi", "seed": -1}, 400, "seed must be between 0"),
    ({"message": "hi", "top_k": 201}, 400, "top_k must be between 0 and 200"),
    ({"message": "hi", "max_tokens": 0}, 400, "max_tokens must be between 1 and 4096"),
    ({"message": "hi", "max_tokens": 4097}, 400, "max_tokens"),
    ({"message": "hi", "top_p": 0}, 400, "top_p"),
    ({"message": "hi", "stop": ["a"] * 5}, 400, "stop"),
    ({"message": " ".join(f"w{i}" for i in range(1200))}, 400, "context of 1024 tokens"),
    ({"message": 5}, 422, "message"),
    ({"message": "hi", "temperature": "hot"}, 422, "temperature"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"content": "hi"}]}, 422, "role"),
    ([1, 2, 3], 422, "invalid request"),
    ({"message": "hi", "tempreature": 0.5}, 422, "tempreature"),
    (b"x" * (2 << 20), 413, "limit"),
]


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(url, client):
    import openai
    for body, status, words in BAD_INPUTS:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = requests.post(url + "/chat", data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body if len(data) < 200 else data[:80], r.text)
        assert words in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="m", messages=_msgs("hi"), temperature=3)
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 8"):
        client.chat.completions.create(model="m", messages=_msgs("hi"), n=9)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": 7}])
    assert chat(url, message="still there?", max_tokens=3).status_code == 200
    assert health(url)["status"] == "ok"


def _open_stream(url, results, i, max_tokens=1000):
    r = requests.post(url + "/chat", json={"message": f"load {i}", "max_tokens": max_tokens, "temperature": 0,
                                           "stream": True}, headers=AUTH, stream=True, timeout=60)
    results[i] = r


def wait_idle(url, timeout=20):
    deadline = time.time() + timeout
    while (s := health(url)["scheduler"])["active"] + s["waiting"] and time.time() < deadline:
        time.sleep(0.1)
    return s


def test_overload_answers_503_not_a_queue(url):
    before = wait_idle(url)
    results = [None] * 16  # 4 rows + 4 waiting places in the test app
    threads = [threading.Thread(target=_open_stream, args=(url, results, i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        # nothing finishes meanwhile (1000 tokens each), so at most 4 rows + 4 waiting places are taken: the rest
        # get 503 at once. How many get in depends on how fast the scheduler moves waiting requests into rows
        # while the others arrive, but never fewer than the waiting places.
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 503} and 4 <= codes.count(200) <= 8, (codes, before, health(url)["scheduler"])
        rejected = next(r for r in results if r.status_code == 503)
        assert "overloaded" in rejected.json()["error"]["message"] and rejected.headers["retry-after"] == "1"
    finally:
        for r in results:
            r.close()  # disconnecting frees the rows
    wait_idle(url)
    assert chat(url, message="after the storm", max_tokens=3).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(url):
    before = health(url)["scheduler"]
    r = requests.post(url + "/chat", json={"message": "Hello", "max_tokens": 1000, "temperature": 0, "stream": True},
                      headers=AUTH, stream=True, timeout=60)
    lines = r.iter_lines()
    tokens = 0
    while tokens < 3:
        tokens += next(lines).startswith(b'data: {"token"')
    assert health(url)["scheduler"]["active"] == 1
    r.close()
    deadline = time.time() + 10
    while (s := health(url)["scheduler"])["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert s["active"] == 0 and s["cancelled"] == before["cancelled"] + 1
    assert s["tokens"] - before["tokens"] < 1000  # stopped early, not run to max_tokens


def test_chat_cli_against_the_server(url):
    out = subprocess.run([sys.executable, "-m", "serve.chat_cli", "--url", url, "--api-key", API_KEY, "-t", "0",
                          "-m", "6", "-p", "Hello"], capture_output=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr.decode()
    expected = chat(url, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, top_k=50)
    assert out.stdout.decode() == expected.json()["response"] + "\n"


def test_config_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema
    with open(os.path.join(REPO_ROOT, "serve", "config.yaml")) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    assert config.http_options.host == "127.0.0.1"


def test_command_line_maps_onto_the_app_config():
    from serve.app import ServeConfig
    args = ServeConfig.parse(["--storage", "/s", "--source", "rl", "--model-tag", "d20", "--step", "7", "--port",
                              "9000", "--replicas", "2", "--max-replicas", "4", "--gpus-per-replica", "1",
                              "--api-key", "k"])
    cfg = ServeConfig.from_options(asdict(args))
    assert (cfg.storage, cfg.source, cfg.model_tag, cfg.step, cfg.port) == ("/s", "rl", "d20", 7, 9000)
    assert (cfg.replicas, cfg.max_replicas, cfg.gpus_per_replica, cfg.api_key) == (2, 4, 1.0, "k")
    assert cfg.host == "127.0.0.1"  # loopback unless told otherwise
    # `serve run serve.app:build_app k=v` passes strings
    cfg = ServeConfig.from_options({"step": "3", "gpus_per_replica": "0.5", "model_tag": "null", "max_replicas": ""})
    assert (cfg.step, cfg.gpus_per_replica, cfg.model_tag, cfg.max_replicas) == (3, 0.5, None, None)
    with pytest.raises(ValueError, match="unknown serve option"):
        ServeConfig.from_options({"prot": "1"})


def test_a_directory_or_hub_source_is_pinned_for_every_replica(tmp_path, monkeypatch):
    """--source takes a model directory or Hub repo id; the app hands its replicas an absolute directory (they run
    elsewhere) and a repo pinned to a commit (offline, a repo stays as it is: the cache cannot change)."""
    from huggingface_hub import constants
    from serve.app import ServeConfig, build_app
    assert ServeConfig.parse(["--source", "me/tiny-chat@v2"]).source == "me/tiny-chat@v2"
    (tmp_path / "exports").mkdir()
    monkeypatch.chdir(tmp_path)
    assert build_app({"source": "exports"})._bound_deployment.init_args[0]["source"] == str(tmp_path / "exports")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert build_app({"source": "me/tiny-chat"})._bound_deployment.init_args[0]["source"] == "hf://me/tiny-chat"


def converse(purl, name, header=True, turns=4, system=None):
    """A conversation over the OpenAI route, with its name as X-Session-Id or without one: each turn's usage."""
    messages, usages = ([{"role": "system", "content": system}] if system else []), []
    headers = {**AUTH, **({"X-Session-Id": name} if header else {})}
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{name} asks question number {turn}"})
        r = requests.post(purl + "/v1/chat/completions", headers=headers,
                          json={"messages": messages, "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return usages


def test_two_replicas_keep_a_conversation_on_one_and_report_both(url):
    """Two replicas: every turn of a conversation lands where its earlier turns are cached (each later turn takes
    them from the prefix cache), whether it names its session (X-Session-Id, placed by the proxy's router) or not
    (placed by its prompt's opening); requests sharing a long system prompt meet on one replica; /metrics on
    either replica shows both."""
    from ray import serve

    from serve.app import build_app
    app = build_app({"storage": _app["root"], "max_batch": 2, "replicas": 2, "cpus_per_replica": 0.5,
                     "api_key": API_KEY})
    serve.run(app, name="pair", route_prefix="/pair", logging_config={"log_level": "WARNING",
                                                                      "enable_access_log": False})
    purl = url + "/pair"
    try:
        wait_healthy(purl)
        seen, deadline = set(), time.time() + 60
        while len(seen) < 2 and time.time() < deadline:  # both replicas up
            seen.add(health(purl)["replica"])
        assert len(seen) == 2
        # /metrics on either shows both (each replica publishes every couple of seconds), and from then on each
        # knows the other, for placing requests by their prompt
        deadline, replicas = time.time() + 20, set()
        while replicas != seen and time.time() < deadline:
            text = requests.get(purl + "/metrics", headers=AUTH, timeout=10).text
            replicas = {s.labels["replica"] for f in text_string_to_metric_families(text) for s in f.samples}
            time.sleep(0.5)
        assert replicas == seen
        for name, header in (("chat-a", True), ("chat-b", True), ("chat-c", True), ("chat-d", False),
                             ("chat-e", False), ("chat-f", False)):
            usages = converse(purl, name, header)
            for before, now in zip(usages, usages[1:]):  # all of the turn before, in whole blocks, was cached
                assert now["prompt_tokens_details"]["cached_tokens"] >= before["prompt_tokens"] // 16 * 16, name
        system = "You are a terse assistant who answers in one short sentence. " * 12  # ~300 tokens here
        for name in ("chat-g", "chat-h", "chat-i"):
            (usage,) = converse(purl, name, header=False, turns=1, system=system)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 256  # where the others left the system prompt
    finally:
        serve.delete("pair")


def test_killed_replica_is_replaced(url, ray_local):
    first = health(url)
    (name,) = [a["name"] for a in ray_local.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and "ChatServer" in a["name"]]
    ray_local.kill(ray_local.get_actor(name, namespace="serve"), no_restart=True)
    second = wait_healthy(url, timeout=90, not_replica=first["replica"])
    assert second["replica"] != first["replica"]
    assert chat(url, message="back again", max_tokens=3).status_code == 200


def test_a_hung_replica_turns_unhealthy_and_is_replaced(url, tmp_path):
    """A scheduler step that never returns (injected: the model call hangs) makes /health answer 503 and Serve's
    health check fail; Serve replaces the replica and the new one answers."""
    from dataclasses import asdict

    from ray import serve

    from faulty_server import HangingChatServerDeployment
    from serve.app import ServeConfig
    hang_file = str(tmp_path / "hang")
    cfg = ServeConfig.from_options({"storage": _app["root"], "max_batch": 2, "stall_timeout": 2})
    app = HangingChatServerDeployment.options(health_check_period_s=1, health_check_timeout_s=5).bind(
        asdict(cfg), hang_file)
    serve.run(app, name="hanging", route_prefix="/hanging",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    hurl = url + "/hanging"
    try:
        first = wait_healthy(hurl)
        open(hang_file, "w").close()
        with pytest.raises(requests.ReadTimeout):  # this request's step hangs
            requests.post(hurl + "/chat", json={"message": "hang", "max_tokens": 4}, timeout=3)
        deadline, sick = time.time() + 30, None
        while time.time() < deadline:
            r = requests.get(hurl + "/health", timeout=10)
            if r.status_code == 503:
                sick = r.json()
                break
            time.sleep(0.2)
        assert sick and sick["status"].startswith("a scheduler step has been running"), sick
        assert sick["replica"] == first["replica"]
        second = wait_healthy(hurl, timeout=120, not_replica=first["replica"])
        r = requests.post(hurl + "/chat", json={"message": "back", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert second["replica"] != first["replica"] and not os.path.exists(hang_file)
    finally:
        serve.delete("hanging")
    assert health(url)["status"] == "ok"  # the other app was not touched
