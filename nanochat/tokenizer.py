"""
BPE tokenizer in the style of GPT-4: trained with rustbpe (fast, Rust), run with tiktoken (fast inference).

Also owns the chat template: render_conversation() turns a conversation into token ids plus a
supervision mask (1 = the model is trained to predict this token).
"""
import copy
import io
import pickle

import tiktoken
import torch

from nanochat import storage

SPECIAL_TOKENS = [
    "<|bos|>",              # every document starts with it (also the document delimiter)
    "<|user_start|>",       # user messages
    "<|user_end|>",
    "<|assistant_start|>",  # assistant messages
    "<|assistant_end|>",
    "<|python_start|>",     # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",     # the tool's output comes back to the assistant
    "<|output_end|>",
]

# GPT-4 split pattern, except numbers are split into chunks of at most 2 digits (not 3): slightly better bpb
# at small vocab sizes. Note rustbpe's built-in default is the {1,3} variant, so we always pass this one.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TURN_END_TOKENS = ("<|assistant_end|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")

TOKENIZER_PKL = "tokenizer.pkl"
TOKEN_BYTES_PT = "token_bytes.pt"


class _EncodingUnpickler(pickle.Unpickler):
    """Builds only what a tokenizer.pkl holds (a tiktoken Encoding from plain strings, bytes and ints): whoever can
    write the storage root must not get to run code on every node that loads it."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return tiktoken.Encoding
        raise pickle.UnpicklingError(f"it references {module}.{name}, and a tokenizer pickle may only contain a "
                                     f"tiktoken.core.Encoding")


class RustBPETokenizer:
    """Thin wrapper around a tiktoken.Encoding, with nanochat's special tokens and chat template."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self._special_cache = {}
        self.bos_token_id = self.encode_special(bos_token)

    # -------------------------------------------------------------------------
    # construction / persistence

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        import rustbpe
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            # checked here because rustbpe panics (a BaseException, not an Exception) on < 256
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + "
                             f"{n_special} special tokens = {256 + n_special}")
        trainer = rustbpe.Tokenizer()
        n_ranks_wanted = vocab_size - n_special
        trainer.train_from_iterator(text_iterator, n_ranks_wanted, pattern=SPLIT_PATTERN)
        # rustbpe returns a list of (token_bytes, rank) pairs; ranks 0..255 are the raw bytes
        mergeable_ranks = {bytes(b): rank for b, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) != n_ranks_wanted:
            # rustbpe silently stops when no pair occurs any more; a smaller vocab than asked for would
            # disagree with the model's vocab_size later on, so fail loudly here instead
            raise ValueError(f"training corpus too small: learned {len(mergeable_ranks) - 256} merges, "
                             f"wanted {n_ranks_wanted - 256} (vocab_size={vocab_size}); "
                             f"use more text or a smaller vocab_size")
        special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = storage.join(tokenizer_dir, TOKENIZER_PKL)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer at {path}") from None
        try:
            enc = _EncodingUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as e:
            raise RuntimeError(f"refusing to load tokenizer {path}: {e}") from None
        except Exception as e:
            raise RuntimeError(f"failed to load tokenizer from {path} (corrupt or incompatible file?): "
                               f"{type(e).__name__}: {e}") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise RuntimeError(f"{path} does not contain a tiktoken.Encoding (got {type(enc).__name__})")
        return cls(enc, "<|bos|>")

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl (the pickled Encoding) and token_bytes.pt (bytes per token, for bits-per-byte)."""
        pkl_path = storage.join(tokenizer_dir, TOKENIZER_PKL)
        storage.write_atomic(pkl_path, lambda f: pickle.dump(self.enc, f))
        token_bytes = self.compute_token_bytes()
        storage.write_atomic(storage.join(tokenizer_dir, TOKEN_BYTES_PT), lambda f: torch.save(token_bytes, f))
        return pkl_path

    def compute_token_bytes(self):
        """int32 tensor [V]: the raw byte length of each token, 0 for special tokens (and unused ids).
        Uses the raw bytes, not a utf-8 round-trip: partial-utf8 tokens would otherwise count as 3 bytes (U+FFFD)."""
        special_ids = {self.encode_special(s) for s in self.get_special_tokens()}
        lengths = []
        for i in range(self.get_vocab_size()):
            if i in special_ids:
                lengths.append(0)
                continue
            try:
                lengths.append(len(self.enc.decode_single_token_bytes(i)))
            except KeyError:  # gaps in some pretrained vocabs (e.g. cl100k_base)
                lengths.append(0)
        return torch.tensor(lengths, dtype=torch.int32)

    # -------------------------------------------------------------------------
    # vocab queries

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])

    def get_bos_token_id(self):
        return self.bos_token_id

    def turn_end_ids(self):
        """Tokens that end the assistant's turn when sampled: <|assistant_end|>, BOS, and the tokens that can only
        belong to another turn (<|user_start|>, <|user_end|>, <|assistant_start|>), which a reply must never show
        as text. Tool tokens keep their meaning."""
        return {self.encode_special(t) for t in TURN_END_TOKENS} | {self.get_bos_token_id()}

    def encode_special(self, text):
        """Id of a special token given its exact string (KeyError if it is not one)."""
        if text not in self._special_cache:
            self._special_cache[text] = self.enc.encode_single_token(text)
        return self._special_cache[text]

    # -------------------------------------------------------------------------
    # encode / decode

    def _to_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int], or list[str] -> list[list[int]]. Special-token strings inside the text are encoded
        as ordinary text (so user data can never inject control tokens). prepend/append: an id or a special string."""
        head = [] if prepend is None else [self._to_id(prepend)]
        tail = [] if append is None else [self._to_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode expects str or list of str, got {type(text).__name__}")

    def encode_with_special(self, text):
        """str -> list[int], with special-token strings in the text encoded as those tokens: the model's raw input,
        for callers that speak in tokens (a completions endpoint, a tokenize endpoint)."""
        return self.enc.encode(text, allowed_special="all")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_single_token_bytes(self, id):
        return self.enc.decode_single_token_bytes(id)

    # -------------------------------------------------------------------------
    # chat template

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a chat conversation ({"messages": [{"role", "content"}, ...]} or the bare message list).
        Returns (ids, mask), equal length, truncated to max_tokens; mask=1 marks tokens the model is trained on:
        assistant text, python tool calls and <|assistant_end|>; never the prompt, tool outputs or <|assistant_start|>."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        messages = list(messages)  # shallow copy: we never modify the caller's messages in place
        if messages and messages[0].get("role") == "system":
            # no system role in the template: fold it into the first user message
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = dict(messages[1])
            merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [merged] + messages[2:]
        if not messages:
            raise ValueError("conversation has no messages")

        ids, mask = [], []

        def add(token_ids, m):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        S = self.encode_special
        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}, expected {expected!r}: "
                                 f"roles must alternate user, assistant, user, ... (after an optional system)")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} content must be a str, got {type(content).__name__}")
                add(S("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(S("<|user_end|>"), 0)
                continue
            add(S("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    ptype = part.get("type")
                    if ptype == "text":
                        add(self.encode(part["text"]), 1)
                    elif ptype == "python":  # the tool call is the model's own output: supervised
                        add(S("<|python_start|>"), 1)
                        add(self.encode(part["text"]), 1)
                        add(S("<|python_end|>"), 1)
                    elif ptype == "python_output":  # comes from the tool at inference time: not supervised
                        add(S("<|output_start|>"), 0)
                        add(self.encode(part["text"]), 0)
                        add(S("<|output_end|>"), 0)
                    else:
                        raise ValueError(f"unknown assistant content part type {ptype!r} in message {i}")
            else:
                raise ValueError(f"assistant message {i} content must be a str or a list of parts, "
                                 f"got {type(content).__name__}")
            add(S("<|assistant_end|>"), 1)

        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for generating the last assistant turn: drop it, render the rest, open an assistant turn."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion expects the last message to be the assistant's")
        messages.pop()
        ids, _ = self.render_conversation(conversation)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view: each token in green (mask 1, trained on) or red (mask 0), separated by '|'."""
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        out = []
        for token_id, m in zip(ids, mask):
            text = self.decode([token_id])
            if with_token_id:
                text += f"{gray}({token_id})"
            out.append(f"{green if m == 1 else red}{text}{reset}")
        return "|".join(out)


# -----------------------------------------------------------------------------
# convenience loaders used by the rest of nanochat

def _tokenizer_dir(base_dir=None):
    if base_dir is None:
        from nanochat.common import get_base_dir
        base_dir = get_base_dir()
    return storage.join(base_dir, "tokenizer")


def get_tokenizer(base_dir=None):
    tokenizer_dir = _tokenizer_dir(base_dir)
    try:
        return RustBPETokenizer.from_directory(tokenizer_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer not found at {storage.join(tokenizer_dir, TOKENIZER_PKL)}; train one "
                                f"first with: python -m ray_jobs.tok_train") from None


def get_token_bytes(device="cpu", base_dir=None):
    """int32 tensor [V] of bytes per token (0 for specials), as written by RustBPETokenizer.save()."""
    path = storage.join(_tokenizer_dir(base_dir), TOKEN_BYTES_PT)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"token bytes not found at {path}; train the tokenizer first with: "
                                f"python -m ray_jobs.tok_train") from None
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
