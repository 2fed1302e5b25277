"""
The OpenAI-compatible API: GET /v1/models and POST /v1/chat/completions (n choices, stop, seed, top_k via
extra_body, usage, finish_reason; "stream": true as SSE chunks ending in [DONE]).
"""
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve.api_common import collect, read_body, sse
from serve.protocol import CompletionRequest, ApiError, usage, validate


def add_openai_routes(app, service, access):
    @app.get("/v1/models")
    async def models(request: Request):
        access.check(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.started), "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        access.check(request)
        req = await read_body(request, CompletionRequest)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        convo, params = validate(req.messages, req.temperature, req.top_k, req.top_p, max_tokens, req.seed,
                                 req.stop, req.n)
        prompt = service.prompt(convo)
        batch = await service.submit(prompt, params, request.headers.get("x-session-id"))
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or service.model_id
        if not req.stream:
            texts, dones = await collect(service, batch)
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": None, "finish_reason": dones[i]["finish_reason"]} for i in range(len(params))]
            return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                    "usage": usage(len(prompt), sum(d["completion_tokens"] for d in dones),
                                   max(d["cached_tokens"] for d in dones))}

        def chunk(choices, **extra):
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, **extra})

        async def stream():
            completion_tokens = cached_tokens = 0
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
                        cached_tokens = max(cached_tokens, ev["cached_tokens"])
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": ev["finish_reason"]}])
                if (req.stream_options or {}).get("include_usage"):
                    yield chunk([], usage=usage(len(prompt), completion_tokens, cached_tokens))
            except ApiError as e:
                yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")
