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
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for chat; vLLM's default)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_MAX_TOKENS = 0.8, 50, 512


class ApiError(Exception):
    """A request the server refuses: the HTTP status and a message that says why (OpenAI's error shape)."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# -----------------------------------------------------------------------------
# Request bodies (types only; limits are checked in sampling_params() and conversation() so the messages can name them)

class TextPart(BaseModel):
    type: str = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls (serve/tools.py renders them)
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None


class Sampling(BaseModel):
    """The sampling fields every route takes."""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # vLLM's name: false shows special tokens as they are (<|python_start|>12*3<|python_end|>...), true (the default)
    # as text reads (the calculator's use as <<12*3=36>>, other special tokens as nothing)
    skip_special_tokens: bool = True
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...}: serve/structured.py


class ChatRequest(Sampling):
    model_config = ConfigDict(extra="forbid")  # our own route: a misspelt field is an error, not a default
    message: str | None = None
    messages: list[Message] | None = None
    stream: bool = False


# OpenAI's fields that do not change the output: accepted and ignored. Every other field we do not implement is a
# 400 that names it (a client must never get output that silently ignored what it asked for).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "prediction", "parallel_tool_calls",
                  "safety_identifier", "prompt_cache_key"}
# fields we take only at the value that changes nothing
NEUTRAL_VALUES = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
                  "best_of": (1,), "suffix": ("",)}


class OpenAIRequest(Sampling):
    model_config = ConfigDict(extra="allow")  # checked field by field in check_fields()
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None

    def check_fields(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or value is None or value in NEUTRAL_VALUES.get(name, ()):
                continue
            raise ApiError(400, f"unsupported field {name!r}" + (f" with value {value!r}" if name in NEUTRAL_VALUES
                                                                 else "") + ": this server cannot honour it",
                           param=name)
        return self


class ChatCompletionRequest(OpenAIRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class TextCompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's other fields (model, return_token_strs) change nothing here
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def _in_range(name, value, lo, hi):
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi} (got {value})", param=name)


def text_of(content):
    """A message's content as text: a string as it is, the text parts of a list joined, nothing as ""."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content if p.type == "text")


def conversation(messages):
    """nanochat's limits -> the messages as [{role, content}]. ApiError 400 names the limit."""
    if not messages:
        raise ApiError(400, "at least one message is required", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(messages)} (limit {MAX_MESSAGES})", param="messages")
    convo, total = [], 0
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant", "system") or (m.role == "system" and i > 0):
            raise ApiError(400, f"message {i}: role must be 'user' or 'assistant' ('system' only first), "
                                f"got {m.role!r}", param=f"messages.{i}.role")
        content = text_of(m.content)
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
    return convo


def sampling_params(req, max_tokens=None, n=1, logprobs=None, prompt_logprobs=None, min_tokens=1,
                    response_format=None):
    """A request's sampling fields within nanochat's limits -> [SamplingParams] * n (ApiError 400 names the limit).
    max_tokens: when given, instead of req.max_tokens; logprobs, prompt_logprobs: top alternatives per token;
    response_format: when given, instead of req.response_format (a forced tool call's)."""
    max_tokens = req.max_tokens if max_tokens is None else max_tokens
    _in_range("temperature", req.temperature, *TEMPERATURE_RANGE)
    if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {req.temperature})",
                       param="temperature")
    _in_range("top_k", req.top_k, *TOP_K_RANGE)
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1] (got {req.top_p})", param="top_p")
    _in_range("max_tokens", max_tokens, min_tokens, MAX_TOKENS_RANGE[1])
    _in_range("n", n, 1, MAX_N)
    _in_range("seed", req.seed, 0, 2**63 - 1)
    _in_range("logprobs", logprobs, 0, MAX_LOGPROBS)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
                       param="stop")
    return [SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
        top_p=req.top_p,
        seed=None if req.seed is None else req.seed + i,  # n seeded choices must still differ from each other
        stop=tuple(stops), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        response_format=response_format or req.response_format) for i in range(n)]


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
