"""
Chat with a model in the terminal: a local checkpoint (default) or a running server (--url).

    python -m serve.chat_cli                              # interactive, newest sft checkpoint
    python -m serve.chat_cli -i sft -g d20 -s 700 -t 0.6 -k 50
    python -m serve.chat_cli -p "Why is the sky blue?"     # one-shot: print the reply and exit
    python -m serve.chat_cli -i karpathy/nanochat-d32      # a model on the Hugging Face Hub (or a directory)
    python -m serve.chat_cli --url http://127.0.0.1:8000 [--api-key KEY]

Interactive commands: clear (or /clear) starts a new conversation; quit, exit (or /exit, /quit) leave.
The reply streams as it is generated; bytes of a character split across tokens are held until complete.
"""
import codecs
import json
import os
import random
import sys
import uuid
from dataclasses import dataclass
from functools import cached_property

from nanochat.flags import ArgsMixin, flag, storage_flag
from nanochat.storage import is_uri

CLEAR, EXIT = {"clear", "/clear"}, {"quit", "exit", "/quit", "/exit"}


class LocalChat:
    """Multi-turn chat over a checkpoint, as nanochat's chat_cli: the conversation is kept as tokens."""

    def __init__(self, args):
        from nanochat.checkpoint_manager import load_model
        from nanochat.common import autodetect_device_type
        from nanochat.engine import Engine, ToolUse
        from serve.structured import SchemaError, grammar_compiler
        device = args.device_type or autodetect_device_type()
        base_dir = (args.storage if is_uri(args.storage) else os.path.abspath(args.storage)) if args.storage else None
        self.model, self.tokenizer, _ = load_model(args.source, device, "eval", args.model_tag, args.step,
                                                   base_dir=base_dir)
        if self.tokenizer is None:
            raise SystemExit(f"no tokenizer found under the storage root ({base_dir or '$NANOCHAT_BASE_DIR'})")
        self.engine = Engine(self.model, self.tokenizer)
        self.grammar = None
        if args.response_format:
            try:
                self.grammar = grammar_compiler(self.tokenizer).compile_response_format(args.response_format)
            except SchemaError as e:
                raise SystemExit(f"--json-schema {args.json_schema}: {e}")
        self.new_tool = lambda: ToolUse(self.tokenizer)  # shows the calculator's use as text reads (the Engine runs it)
        self.args = args
        S = self.tokenizer.encode_special
        self.user_start, self.user_end = S("<|user_start|>"), S("<|user_end|>")
        self.assistant_start, self.assistant_end = S("<|assistant_start|>"), S("<|assistant_end|>")
        self.stop_tokens = self.tokenizer.turn_end_ids()
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def reply(self, text, write):
        turn = [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]
        room = self.model.config.sequence_len - len(self.tokens) - len(turn)
        if room < 1:  # the context is full: start over rather than overflow it
            write("(context full: starting a new conversation)\n")
            self.clear()
            room = self.model.config.sequence_len - len(self.tokens) - len(turn)
            if room < 1:
                raise ValueError("message is longer than the model's context")
        self.tokens += turn
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tool = self.new_tool()
        for column, _ in self.engine.generate(self.tokens, num_samples=1, max_tokens=min(self.args.max_tokens, room),
                                              temperature=self.args.temperature, top_k=self.args.top_k,
                                              seed=self.args.seed,
                                              constraints=[self.grammar.matcher()] if self.grammar else None):
            token = column[0]
            if token in self.stop_tokens:
                break
            self.tokens.append(token)
            tool.feed(token)
            write(decoder.decode(tool.shown_bytes(token)))
        write(decoder.decode(b"", final=True))
        self.tokens.append(self.assistant_end)  # also when the turn stopped at max_tokens


class RemoteChat:
    """The same over HTTP: the conversation is kept as messages and sent whole each turn (OpenAI route)."""

    def __init__(self, args):
        self.args = args
        self.url = args.url.rstrip("/") + "/v1/chat/completions"
        self.response_format = args.response_format
        self.clear()

    def clear(self):
        self.messages = []
        self.session = uuid.uuid4().hex  # X-Session-Id: the server keeps a conversation's turns on one replica

    def reply(self, text, write):
        import requests
        self.messages.append({"role": "user", "content": text})
        body = {"messages": self.messages, "stream": True, "temperature": self.args.temperature,
                "top_k": self.args.top_k, "max_tokens": self.args.max_tokens}
        if self.args.seed is not None:
            body["seed"] = self.args.seed
        if self.response_format:
            body["response_format"] = self.response_format
        key = self.args.api_key or os.environ.get("NANOCHAT_API_KEY")
        headers = {"X-Session-Id": self.session, **({"Authorization": f"Bearer {key}"} if key else {})}
        parts = []
        with requests.post(self.url, json=body, headers=headers, stream=True, timeout=600) as r:
            if r.status_code != 200:
                self.messages.pop()
                try:
                    message = r.json()["error"]["message"]
                except ValueError:
                    message = r.text
                raise RuntimeError(f"server said {r.status_code}: {message}")
            for line in r.iter_lines(decode_unicode=False):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        parts.append(piece)
                        write(piece)
        self.messages.append({"role": "assistant", "content": "".join(parts) or " "})


@dataclass
class ChatCliConfig(ArgsMixin):
    source: str = flag("sft", "model to chat with: sft|rl|mid|base under the storage root, a model directory "
                              "(Hugging Face export or nanochat layout) or a Hugging Face Hub repo id "
                              "owner/name[@revision]", aliases=["-i"])
    model_tag: str | None = flag(None, "model tag, e.g. d20 (default: the largest; not for a directory or Hub "
                                       "source)", aliases=["-g"])
    step: int | None = flag(None, "checkpoint step (default: the last)", aliases=["-s"])
    prompt: str = flag("", "one-shot: answer this prompt and exit", aliases=["-p"])
    temperature: float = flag(0.6, "sampling temperature (0: greedy)", aliases=["-t"])
    top_k: int = flag(50, "top-k sampling (0: off)", aliases=["-k"])
    max_tokens: int = flag(256, "longest reply", aliases=["-m"])
    seed: int | None = flag(None, "sampling seed (default: a random one per session)")
    storage: str | None = storage_flag()
    device_type: str | None = flag(None, "cuda | cpu | mps (default: autodetect)")
    url: str | None = flag(None, "talk to a running server (python -m serve.app) instead")
    api_key: str | None = flag(None, "Bearer key for --url (default $NANOCHAT_API_KEY)")
    json_schema: str | None = flag(None, "a JSON schema file: every reply is JSON that it accepts (constrained "
                                         "decoding)")

    @cached_property  # read once; LocalChat / RemoteChat read it at start-up, so a bad file fails there
    def response_format(self):
        return response_format(self.json_schema)


def response_format(path):
    """--json-schema FILE -> the response_format it asks for (None without one)."""
    if not path:
        return None
    try:
        with open(path) as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--json-schema {path}: {e}")
    return {"type": "json_schema", "json_schema": {"name": os.path.splitext(os.path.basename(path))[0],
                                                   "schema": schema, "strict": True}}


def main(argv=None):
    args = ChatCliConfig.parse(argv, __doc__)
    if args.seed is None and not args.url:
        args.seed = random.getrandbits(31)

    chat = RemoteChat(args) if args.url else LocalChat(args)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt:
        try:
            chat.reply(args.prompt, write)
        except (RuntimeError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        write("\n")
        return
    print("nanochat: type a message; 'clear' starts over, 'exit' quits.", flush=True)
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not text:
            continue
        if text.lower() in EXIT:
            break
        if text.lower() in CLEAR:
            chat.clear()
            print("(conversation cleared)", flush=True)
            continue
        write("Assistant: ")
        try:
            chat.reply(text, write)
        except (RuntimeError, ValueError, OSError) as e:
            write(f"[error: {e}]")
        write("\n")


if __name__ == "__main__":
    main()
