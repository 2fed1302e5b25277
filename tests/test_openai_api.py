"""The OpenAI- and vLLM-compatible surface, without Ray: /v1/completions (text and token prompts, several at once, echo,
logprobs against the model's own forward, streaming), chat logprobs through the openai client, the tokenizer
endpoints, and request fields that are refused or ignored. The FastAPI app of serve/api.py on uvicorn at a loopback
port, on a tiny random-weight model."""
import json

import openai
import pytest
import requests
import torch

from bench.bench_serve import LocalServer
from serve.api import make_api
from serve.app import ServeConfig
from serve.service import ChatService
from test_serve import tiny_chat_model


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    model = tiny_chat_model(tiny_tokenizer)
    service = ChatService(ServeConfig(max_batch=8), model, tiny_tokenizer)
    try:
        with LocalServer(make_api(service)) as srv:
            srv.service, srv.model, srv.tokenizer = service, model, tiny_tokenizer
            yield srv
    finally:
        service.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def log_softmax(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def post(server, route, body):
    return requests.post(server.url + route, json=body, timeout=60)


def test_completion_echo_logprobs_are_the_models_own(server):
    tok = server.tokenizer
    text = "<|bos|>The quick brown fox"  # special-token strings in a prompt are those tokens
    ids = tok.encode(text[len("<|bos|>"):], prepend="<|bos|>")
    r = post(server, "/v1/completions", {"prompt": text, "max_tokens": 3, "echo": True, "logprobs": 2,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == len(ids)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(text) and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    full = list(ids)
    for _ in range(3):  # the greedy continuation, from the model itself
        full.append(log_softmax(server.model, full)[-1].argmax().item())
    reference = log_softmax(server.model, full)
    assert lp["tokens"] == [tok.decode([t]) for t in full]
    for p in range(1, len(full)):  # position p - 1 predicts token p
        assert lp["token_logprobs"][p] == pytest.approx(reference[p - 1, full[p]].item(), abs=1e-4)
        # the two best, keyed by their text (tokens that are parts of one character share the text U+FFFD)
        best = reference[p - 1].topk(2)
        expected = {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            expected.setdefault(tok.decode([t]), v)
        got = lp["top_logprobs"][p]
        assert list(got) == list(expected) and list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)
    # offsets index the choice's text: each token's string starts where its offset says
    assert lp["text_offset"][0] == 0
    assert all(choice["text"][o:o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))


def test_lm_eval_style_scoring_batched_token_prompts_and_max_tokens_zero(server):
    """lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1; and several
    prompts in one request, scored as they would be alone."""
    tok = server.tokenizer
    prompts = [tok.encode(s, prepend="<|bos|>") for s in ("Hello world", "What is 12*3?", "the theory of")]
    alone = [post(server, "/v1/completions", {"prompt": p, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
             for p in prompts]
    together = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                "temperature": 0}).json()
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    for p, one, choice in zip(prompts, alone, together["choices"]):
        assert one["choices"][0]["finish_reason"] == "length" and one["usage"]["completion_tokens"] == 0
        assert one["choices"][0]["text"] == tok.decode(p)
        ref = log_softmax(server.model, p)
        expected = [None] + [ref[i - 1, p[i]].item() for i in range(1, len(p))]
        assert one["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert choice["logprobs"]["token_logprobs"][:len(p)] == pytest.approx(expected, abs=1e-4)
        assert len(choice["logprobs"]["tokens"]) == len(p) + 1  # and the one generated token
        # is_greedy as lm-eval reads it: each token's logprob against the best of its top_logprobs
        greedy = [ref[i - 1].argmax().item() == p[i] for i in range(1, len(p))]
        tops = choice["logprobs"]["top_logprobs"][1:len(p)]
        assert [lp == max(top.values()) for lp, top in zip(expected[1:], tops)] == greedy


def test_completion_n_seeds_stop_and_stream(server, client):
    out = client.completions.create(model="m", prompt=["<|bos|>Hello", "<|bos|>The"], n=2, max_tokens=6, seed=3,
                                    temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and len({c.text for c in out.choices}) > 1
    again = client.completions.create(model="m", prompt=["<|bos|>Hello", "<|bos|>The"], n=2, max_tokens=6, seed=3,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: the same samples
    whole = client.completions.create(model="m", prompt="<|bos|>Hello", max_tokens=8, temperature=0, echo=True,
                                      logprobs=1)
    stream = client.completions.create(model="m", prompt="<|bos|>Hello", max_tokens=8, temperature=0, echo=True,
                                       logprobs=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == whole.choices[0].logprobs.tokens
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"


def test_chat_logprobs_through_the_openai_client(server, client):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content and len(content) == 6
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content)
    streamed = [t for c in client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_tokenizer_endpoints_in_vllms_shapes(server):
    tok = server.tokenizer
    info = requests.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|assistant_end|>" and info["bos_token"] == "<|bos|>" and info["chat_template"]
    r = post(server, "/tokenize", {"prompt": "<|bos|>Hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("Hello world", prepend="<|bos|>") and r["count"] == len(r["tokens"])
    assert post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": True}).json()["tokens"][0] == \
        tok.get_bos_token_id()
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    assert chat == server.service.prompt([{"role": "user", "content": "hi"}])
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "<|bos|>Hello world"
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400


@pytest.mark.parametrize("route,body,field", [
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "logprobs"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": [1, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
])
def test_fields_that_would_change_the_output_are_refused_by_name(server, route, body, field):
    base = {"messages": [{"role": "user", "content": "hi"}]} if route.endswith("chat/completions") else \
        {"prompt": "hi"}
    r = post(server, route, {"model": "m", "max_tokens": 2, **base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["param"] == field, error


def test_fields_that_change_nothing_are_accepted(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u1",
            "metadata": {"k": "v"}, "store": False, "frequency_penalty": 0, "presence_penalty": 0.0,
            "logit_bias": {}, "response_format": {"type": "text"}, "parallel_tool_calls": True, "tools": None}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "user": "u1", "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["choices"][0]["finish_reason"] in ("length", "stop")


# -----------------------------------------------------------------------------
# structured outputs and tool calls: even this random model's output parses and validates, by constrained decoding

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "none"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Tell me about someone."}]


def test_json_schema_output_validates_for_every_seed(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(4):
        out = client.chat.completions.create(model="m", messages=ASK, response_format=fmt, temperature=1.0,
                                             seed=seed, max_tokens=120)
        assert out.choices[0].finish_reason == "stop", out.choices[0]
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                         temperature=1.0, seed=0, max_tokens=120)
    assert out.choices[0].finish_reason in ("stop", "length")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    # cut short: finish_reason says so, and the text is the valid prefix it got to
    out = client.chat.completions.create(model="m", messages=ASK, response_format=fmt, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")


def test_structured_output_on_every_route(server, client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = post(server, "/chat", {"message": "who?", "response_format": fmt, "max_tokens": 120, "seed": 1})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["response"]), PERSON)
    out = client.completions.create(model="m", prompt="<|bos|>JSON:", max_tokens=120, seed=2,
                                    extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=ASK, response_format=fmt, max_tokens=120, seed=3, stream=True) if c.choices)
    jsonschema.validate(json.loads(streamed), PERSON)


@pytest.mark.parametrize("fmt,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "response_format"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format"),
])
def test_a_schema_that_cannot_be_compiled_is_a_400(server, fmt, words):
    for route, body in (("/v1/chat/completions", {"messages": ASK}), ("/chat", {"message": "hi"}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = post(server, route, {**body, "response_format": fmt, "max_tokens": 5})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (route, r.text)


def test_langchain_with_structured_output_returns_an_instance(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="m", max_tokens=100,
                                      temperature=0.7, max_retries=0)
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_forced_tool_calls_validate_and_come_back_into_the_conversation(client):
    jsonschema = pytest.importorskip("jsonschema")
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        out = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, CLOCK], tool_choice=named,
                                             seed=seed, temperature=1.0, max_tokens=200)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    out = client.chat.completions.create(model="m", messages=ask, tools=[WEATHER, CLOCK], tool_choice="required",
                                         seed=5, max_tokens=200)
    assert out.choices[0].finish_reason == "tool_calls", out.choices[0]
    (call,) = out.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # streamed, as OpenAI streams a named call: its id and name, then the arguments in fragments as they are
    # generated, then finish_reason "tool_calls"; cut short by max_tokens, "length"
    for max_tokens, finish in ((200, "tool_calls"), (4, "length")):
        chunks = list(client.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice=named,
                                                     seed=0, temperature=1.0, max_tokens=max_tokens, stream=True))
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather", deltas[0]
        assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:]), deltas
        assert chunks[-1].choices[0].finish_reason == finish and not any(c.choices[0].delta.content for c in chunks
                                                                         if c.choices)
        text = "".join(d.function.arguments for d in deltas)
        if finish == "tool_calls":
            assert len(deltas) > 3, deltas  # fragments, not one delta at the end
            jsonschema.validate(json.loads(text), WEATHER["function"]["parameters"])
        else:
            assert 1 < len(deltas) <= 1 + 4 and text.startswith("{"), deltas  # a fragment per token at most
    # the call and its result go back into the conversation; "none" answers in text
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    out = client.chat.completions.create(model="m", messages=history, tools=[WEATHER, CLOCK], tool_choice="none",
                                         max_tokens=5)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"


def test_bad_tool_requests_are_400s(server):
    for body, field in (({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [{"type": "function"}]}, "tools"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                         "response_format")):
        r = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 5, **body})
        assert r.status_code == 400 and field in r.json()["error"]["message"] + str(r.json()["error"]["param"]), \
            (body, r.text)
