"""
The OpenAI-compatible API, as vLLM serves it: GET /v1/models, POST /v1/chat/completions (n choices, stop, seed, top_k
via extra_body, logprobs / top_logprobs, response_format json_object / json_schema, tools and tool_choice (see
serve/tools.py), usage, finish_reason) and POST /v1/completions (prompts as text or token
ids, several at once, echo, logprobs with text offsets, max_tokens 0 with echo). "stream": true answers in SSE
chunks ending in [DONE].
"""
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve.api_common import collect, read_body, sse
from serve.protocol import (MAX_PROMPTS, ApiError, ChatCompletionRequest, TextCompletionRequest, conversation,
                            sampling_params, usage)
from serve.tools import call_schema, check_tools, forced_calls, may_be_call, parse_calls, render, tool_call


class CompletionLogprobs:
    """The logprobs object of one /v1/completions choice: tokens, token_logprobs, top_logprobs and text_offset,
    each token's offset counted from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self.offset = 0

    def add(self, token, logprob=None, top=None):
        text = self.tokenizer.decode([token])
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else self._by_text(top))

    def _by_text(self, top):
        """Keyed by text, as OpenAI's shape has it, best first: where two tokens share a text (parts of one
        character) the likelier one's value stands, so the best value is always the top token's."""
        out = {}
        for t, lp in top:
            out.setdefault(self.tokenizer.decode([t]), lp)
        return out

    def add_prompt(self, prompt, entries):
        """The first prompt token has no log-probability; entries (TokenLogprob) cover the rest."""
        self.add(prompt[0])
        for e in entries:
            self.add(e.token, e.logprob, e.top)

    def add_generated(self, entries):
        for e in entries:
            self.add(e.token, e.logprob, e.top)

    def take(self):
        """What was added since the last take(), as the object OpenAI sends (streamed chunks carry their own)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def chat_logprobs(tokenizer, entries):
    """TokenLogprob entries -> OpenAI's chat "logprobs" object: each token's text, log-probability, UTF-8 bytes and
    its top alternatives."""
    def token(t, logprob):
        return {"token": tokenizer.decode([t]), "logprob": logprob,
                "bytes": list(tokenizer.decode_single_token_bytes(t))}
    return {"content": [{**token(e.token, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_prompts(service, prompt):
    """/v1/completions' prompt (a string, strings, token ids or lists of them) -> [(text, token ids)]. Text is
    tokenized as the model's raw input: special-token strings in it (e.g. <|bos|>) are those tokens, and nothing is
    added (a base model saw <|bos|> at the start of every document: begin a prompt with it for the same)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: 1 to {MAX_PROMPTS} prompts per request (got {len(prompt)})", param="prompt")
    vocab = service.tokenizer.get_vocab_size()
    out = []
    for i, p in enumerate(prompt):
        ids = service.tokenizer.encode_with_special(p) if isinstance(p, str) else p
        if not ids:
            raise ApiError(400, f"prompt {i} is empty", param="prompt")
        if not all(0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt {i}: token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= service.seq_len:
            raise ApiError(400, f"prompt {i} is {len(ids)} tokens, longer than the model's context of "
                                f"{service.seq_len} tokens", param="prompt")
        out.append((p if isinstance(p, str) else service.tokenizer.decode(ids), ids))
    return out


def add_openai_routes(app, service, access):
    tokenizer = service.tokenizer

    @app.get("/v1/models")
    async def models(request: Request):
        access.check(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.started), "owned_by": "nanochat",
                                            "max_model_len": service.seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        access.check(request)
        req = (await read_body(request, ChatCompletionRequest)).check_fields()
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools, mode = check_tools(req.tools, req.tool_choice)
        forced = mode not in (None, "auto")  # "required" or a named function: generated under its schema
        response_format = req.response_format
        if forced:
            if (response_format or {}).get("type", "text") != "text":
                raise ApiError(400, "a forced tool call (tool_choice) and a response_format cannot both apply",
                               param="response_format")
            response_format = {"type": "json_schema",
                               "json_schema": {"name": "tool_call", "schema": call_schema(tools, mode), "strict": True}}
        service.check_response_format(response_format, "tools" if forced else "response_format")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        convo = conversation(render(req.messages, tools if mode else {}))
        params = sampling_params(req, max_tokens, req.n, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                 response_format=response_format)
        prompt = service.prompt(convo)
        batch = await service.submit(prompt, params, request.headers.get("x-session-id"))
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or service.model_id

        def logprobs_of(entries):
            return chat_logprobs(tokenizer, entries) if req.logprobs else None

        def calls_in(text, done):
            """The reply's tool calls, or None when it is an answer (or a forced call cut short)."""
            if forced:
                return forced_calls(text, tools, mode) if done["finish_reason"] == "stop" else None
            return parse_calls(text, tools) if mode == "auto" else None

        if not req.stream:
            texts, dones, entries = await collect(service, batch)
            choices = []
            for i, (text, done) in enumerate(zip(texts, dones)):
                calls = calls_in(text, done)
                message = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
                    {"role": "assistant", "content": text}
                choices.append({"index": i, "message": message, "logprobs": None if calls else logprobs_of(entries[i]),
                                "finish_reason": "tool_calls" if calls else done["finish_reason"]})
            return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                    "usage": usage(len(prompt), sum(d["completion_tokens"] for d in dones),
                                   max(d["cached_tokens"] for d in dones))}

        def chunk(choices, **extra):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, **extra})

        def content(i, text, entries):
            return chunk([{"index": i, "delta": {"content": text}, "logprobs": logprobs_of(entries),
                           "finish_reason": None}])

        def arguments(i, call):
            return chunk([{"index": i, "delta": {"tool_calls": [dict(call, index=0)]}, "logprobs": None,
                           "finish_reason": None}])

        async def stream():
            completion_tokens = cached_tokens = 0
            # a named function's arguments are the generated text itself: streamed as they come, as OpenAI streams
            # them (the call's id and name first). Any other reply that is (or may still turn out to be) a tool call
            # is held back, then sent as one.
            named = mode in tools
            held = [{"text": "", "logprobs": []} if mode and not named else None for _ in params]
            for i in range(len(params)):  # the role comes first, as OpenAI sends it
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
                if named:  # the call's id and name, its arguments to follow
                    header = tool_call(mode, {})
                    header["function"]["arguments"] = ""
                    yield arguments(i, header)
            try:
                async for i, ev in service.events(batch):
                    if "text" in ev and named:
                        yield arguments(i, {"function": {"arguments": ev["text"]}})
                    elif "text" in ev and held[i] is None:
                        yield content(i, ev["text"], ev.get("logprobs", ()))
                    elif "text" in ev:
                        held[i]["text"] += ev["text"]
                        held[i]["logprobs"] += ev.get("logprobs", ())
                        if not forced and not may_be_call(held[i]["text"]):  # an answer after all
                            yield content(i, held[i]["text"], held[i]["logprobs"])
                            held[i] = None
                    else:
                        completion_tokens += ev["completion_tokens"]
                        cached_tokens = max(cached_tokens, ev["cached_tokens"])
                        finish_reason = ev["finish_reason"]
                        if named and finish_reason == "stop":  # complete: the grammar saw to it
                            finish_reason = "tool_calls"
                        elif held[i] is not None:
                            calls = calls_in(held[i]["text"], ev)
                            if calls:
                                yield chunk([{"index": i, "delta": {"tool_calls": [dict(call, index=k) for k, call
                                                                                    in enumerate(calls)]},
                                              "logprobs": None, "finish_reason": None}])
                                finish_reason = "tool_calls"
                            elif held[i]["text"]:
                                yield content(i, held[i]["text"], held[i]["logprobs"])
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
                if (req.stream_options or {}).get("include_usage"):
                    yield chunk([], usage=usage(len(prompt), completion_tokens, cached_tokens))
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        access.check(request)
        req = (await read_body(request, TextCompletionRequest)).check_fields()
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo: the prompt's log-probabilities)",
                           param="max_tokens")
        prompts = completion_prompts(service, req.prompt)
        k = req.logprobs
        params = sampling_params(req, n=req.n, logprobs=k, prompt_logprobs=k if req.echo else None,
                                 min_tokens=0 if req.echo else 1)
        service.check_response_format(req.response_format)
        items = [(ids, p) for _, ids in prompts for p in params]  # choice i: prompt i // n, its (i % n)-th sample
        if len(prompts) == 1:
            batch = await service.submit(prompts[0][1], params, request.headers.get("x-session-id"))
        else:  # the prompts go to the scheduler together, to be decoded in the same steps
            batch = service.submit_here(items)
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or service.model_id
        prompt_of = [prompts[i // len(params)] for i in range(len(items))]
        logprobs = [CompletionLogprobs(tokenizer) if k is not None else None for _ in items]
        prompt_tokens = sum(len(ids) for _, ids in prompts)

        def echoed(i, ev):
            """The prompt's text (and log-probabilities) ahead of a choice's first event, with echo."""
            if "prompt_logprobs" in ev:
                logprobs[i].add_prompt(prompt_of[i][1], ev["prompt_logprobs"])
            return prompt_of[i][0]

        def piece(i, ev):
            if "text" in ev and logprobs[i] is not None:
                logprobs[i].add_generated(ev["logprobs"])
            return ev.get("text", "")

        if not req.stream:
            texts, dones = [[] for _ in items], [None] * len(items)
            if req.echo and k is None:
                texts = [[text] for text, _ in prompt_of]
            async for i, ev in service.events(batch):
                if "prompt_logprobs" in ev:
                    texts[i].append(echoed(i, ev))
                elif "done" in ev:
                    dones[i] = ev
                else:
                    texts[i].append(piece(i, ev))
            choices = [{"index": i, "text": "".join(texts[i]),
                        "logprobs": logprobs[i].take() if logprobs[i] is not None else None,
                        "finish_reason": dones[i]["finish_reason"]} for i in range(len(items))]
            return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                    "usage": usage(prompt_tokens, sum(d["completion_tokens"] for d in dones),
                                   max(d["cached_tokens"] for d in dones))}

        def chunk(i, text, finish_reason=None):
            return sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": i, "text": text, "finish_reason": finish_reason,
                                     "logprobs": logprobs[i].take() if logprobs[i] is not None else None}]})

        async def stream():
            completion_tokens = cached_tokens = 0
            if req.echo and k is None:
                for i in range(len(items)):
                    yield chunk(i, prompt_of[i][0])
            try:
                async for i, ev in service.events(batch):
                    if "prompt_logprobs" in ev:
                        yield chunk(i, echoed(i, ev))
                    elif "done" in ev:
                        completion_tokens += ev["completion_tokens"]
                        cached_tokens = max(cached_tokens, ev["cached_tokens"])
                        yield chunk(i, "", ev["finish_reason"])
                    else:
                        yield chunk(i, piece(i, ev))
                if (req.stream_options or {}).get("include_usage"):
                    yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")
