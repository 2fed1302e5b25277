"""
The serve API's wire protocol, independent of Ray and of the model: request bodies, the limits a request must
fit in, and the checks that turn a body into sampling parameters or a 4xx that names what is wrong.
"""
import json

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.scheduler import SamplingParams

# Limits, as nanochat's web chat had them (plus the OpenAI-only fields)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20  # 32000 characters JSON-escaped fit comfortably
TEMPERATURE_RANGE = (0.0, 2.0)
# below this (but above 0, which is greedy) logits / temperature leave what floats hold: softcapped logits are
# within +-15, and 15 / 1e-3 is far from overflow even in bf16
MIN_TEMPERATURE = 1e-3
TOP_K_RANGE = (0, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_N = 8
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 64
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512


class ApiError(Exception):
    """A request the server refuses: the HTTP status and a message that says why (OpenAI's error shape)."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# -----------------------------------------------------------------------------
# Request bodies (types only; limits are checked in validate() so the messages can name them)

class TextPart(BaseModel):
    type: str = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # our own route: a misspelt field is an error, not a default
    message: str | None = None
    messages: list[Message] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[Message]
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


def _in_range(name, value, lo, hi):
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi} (got {value})", param=name)


def validate(messages, temperature, top_k, top_p, max_tokens, seed, stop, n=1):
    """nanochat's limits -> (messages as [{role, content}], [SamplingParams] * n). ApiError 400 names the limit."""
    if not messages:
        raise ApiError(400, "at least one message is required", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(messages)} (limit {MAX_MESSAGES})", param="messages")
    convo, total = [], 0
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant", "system") or (m.role == "system" and i > 0):
            raise ApiError(400, f"message {i}: role must be 'user' or 'assistant' ('system' only first), "
                                f"got {m.role!r}", param=f"messages.{i}.role")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text for p in m.content if p.type == "text")
        if not content:
            raise ApiError(400, f"message {i}: content is empty", param=f"messages.{i}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"message {i}: content is {len(content)} characters "
                                f"(limit {MAX_MESSAGE_CHARS} per message)", param=f"messages.{i}.content")
        total += len(content)
        convo.append({"role": m.role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"conversation is {total} characters (limit {MAX_TOTAL_CHARS} in total)",
                       param="messages")
    if convo[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    _in_range("temperature", temperature, *TEMPERATURE_RANGE)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {temperature})",
                       param="temperature")
    _in_range("top_k", top_k, *TOP_K_RANGE)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p")
    _in_range("max_tokens", max_tokens, *MAX_TOKENS_RANGE)
    _in_range("n", n, 1, MAX_N)
    _in_range("seed", seed, 0, 2**63 - 1)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
                       param="stop")
    params = [SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_k=DEFAULT_TOP_K if top_k is None else top_k,
        top_p=top_p,
        seed=None if seed is None else seed + i,  # n seeded choices must still differ from each other
        stop=tuple(stops)) for i in range(n)]
    return convo, params


def usage(prompt_tokens, completion_tokens, cached_tokens=0):
    """OpenAI's usage object; cached_tokens: prompt tokens whose keys came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def parse(body, model_cls):
    if len(body) > MAX_BODY_BYTES:  # HTTP bodies are cut off while reading; WebSocket frames arrive whole
        raise ApiError(413, f"request body is {len(body)} bytes (limit {MAX_BODY_BYTES})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise ApiError(422, f"invalid request: {problems}") from None


def api_key_of(raw):
    """The key of a WebSocket's first message, {"api_key": KEY}; "" when the frame is anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return ""
    return str(data.get("api_key", "")) if isinstance(data, dict) else ""


def is_cancel(raw):
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("cancel") is True and len(data) == 1
