"""
nanochat's own chat API: POST /chat (JSON, or SSE with "stream": true) and the WebSocket /ws (several turns per
socket, cancel, bounded inbox, idle timeout, a cap on open sockets per replica).
"""
import asyncio
import logging
import time

from fastapi import Request, WebSocket
from fastapi.responses import StreamingResponse

from serve.api_common import collect, read_body, sse
from serve.protocol import (ApiError, ChatRequest, Message, api_key_of, conversation, is_cancel, parse, sampling_params,
                            usage)

logger = logging.getLogger("nanochat.serve")

WS_MAX_QUEUED_TURNS = 8  # per socket, beside the one being answered; one more closes the socket


async def chat_job(service, req, session=None):
    """Validate a /chat body (HTTP or one WebSocket turn) and submit it: (prompt tokens, AsyncRequests)."""
    if req.message is not None and req.messages is not None:
        raise ApiError(400, "send either 'message' or 'messages', not both")
    messages = [Message(role="user", content=req.message)] if req.message is not None else req.messages
    convo, params = conversation(messages), sampling_params(req)
    service.check_response_format(req.response_format)
    prompt = service.prompt(convo)
    return prompt, await service.submit(prompt, params, session)


def add_chat_routes(app, service, access):
    @app.post("/chat")
    async def chat(request: Request):
        access.check(request)
        req = await read_body(request, ChatRequest)
        prompt, batch = await chat_job(service, req, request.headers.get("x-session-id"))
        if not req.stream:
            (text,), (done,), _ = await collect(service, batch)
            return {"response": text, "finish_reason": done["finish_reason"],
                    "usage": usage(len(prompt), done["completion_tokens"], done["cached_tokens"])}

        async def stream():
            try:
                async for _, ev in service.events(batch):
                    if "text" in ev:
                        yield sse({"token": ev["text"]})
                    else:
                        yield sse({"done": True, "finish_reason": ev["finish_reason"],
                                   "usage": usage(len(prompt), ev["completion_tokens"], ev["cached_tokens"])})
            except ApiError as e:
                yield sse({"error": e.message})
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        if not access.origin_ok(websocket):
            return await websocket.close(code=1008)  # before accept: the handshake is refused with a 403
        await websocket.accept()
        if service.open_sockets >= service.cfg.ws_max_sockets:
            await websocket.send_json({"error": f"too many open WebSockets on this replica (limit "
                                                f"{service.cfg.ws_max_sockets}); retry later", "status": 503})
            return await websocket.close(code=1013)  # "try again later"
        service.open_sockets += 1
        try:
            await ws_session(websocket, service, access)
        except Exception as e:  # the socket went away while we were sending
            logger.info(f"websocket closed: {type(e).__name__}")
        finally:
            service.open_sockets -= 1


async def ws_session(websocket, service, access):
    """Turns are read beside generation, so a disconnect or {"cancel": true} acts at once. Waiting turns sit
    in a bounded inbox; a client that overfills it is closed rather than queued without limit."""
    inbox = asyncio.Queue(maxsize=WS_MAX_QUEUED_TURNS)
    state = {"received": 0, "cancelled_upto": 0, "batch": None, "closed": False, "active_at": time.monotonic()}
    authed = access.key_ok(access.bearer(websocket))

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
                left = state["active_at"] + service.cfg.ws_idle_timeout - time.monotonic()
                if not busy and left <= 0:
                    await close(f"idle for {service.cfg.ws_idle_timeout:g} s, closing", 408, 1000)
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
                    if not access.key_ok(api_key_of(raw)):
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
                prompt, state["batch"] = await chat_job(service, req, websocket.headers.get("x-session-id"))
                async for _, ev in service.events(state["batch"]):
                    if "text" in ev:
                        await websocket.send_json({"token": ev["text"]})
                    else:
                        await websocket.send_json({
                            "done": True, "finish_reason": ev["finish_reason"],
                            "usage": usage(len(prompt), ev["completion_tokens"], ev["cached_tokens"])})
                service.metrics.route("/ws", 200)
            except ApiError as e:
                service.metrics.route("/ws", e.status)
                await websocket.send_json({"error": e.message, "status": e.status})
            finally:
                state["batch"], state["active_at"] = None, time.monotonic()  # idle time counts from here
    finally:
        reader_task.cancel()
        if state["batch"]:
            state["batch"].cancel()
