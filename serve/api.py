"""
The HTTP API of one replica, as a FastAPI app over a ChatService (Ray-free: tests and tools run it on uvicorn).

    GET  /          the chat page (serve/ui.html)          GET /health   open; 503 naming the problem if unhealthy
    GET  /metrics   Prometheus text (needs the API key)    /chat, /ws    serve/chat_routes.py
    /v1/*           serve/openai_routes.py                 /tokenize, /detokenize, /tokenizer_info: serve/tokenizer_routes.py

Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}); a full queue answers 503 with
Retry-After. Every HTTP response is counted by route and status.
"""
import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serve.api_common import Access
from serve.chat_routes import add_chat_routes
from serve.openai_routes import add_openai_routes
from serve.protocol import ApiError
from serve.tokenizer_routes import add_tokenizer_routes

UI_PATH = Path(__file__).with_name("ui.html")

KNOWN_ROUTES = {"/", "/chat", "/ws", "/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
                "/detokenize", "/tokenizer_info", "/health", "/metrics"}


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
            self.service.metrics.route(route, status[0])


def make_api(service):
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    access = Access(service.cfg)
    ui_html = UI_PATH.read_text()

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        kind = {401: "authentication_error", 503: "overloaded_error"}.get(
            exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}},
                            status_code=exc.status, headers=headers)

    @app.get("/")
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        info = service.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        access.check(request)
        text = await service.all_metrics() if service.all_metrics else service.metrics.text().encode()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    add_chat_routes(app, service, access)
    add_openai_routes(app, service, access)
    add_tokenizer_routes(app, service, access)
    if access.origins:
        app.add_middleware(CORSMiddleware, allow_origins=access.origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(CountRequests, service=service)
    return app
