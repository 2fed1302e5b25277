"""
Our tokenizer as a Hugging Face fast tokenizer: tokenizer.json (byte-level BPE with the same ranks, split pattern
and special tokens) and a chat template that renders a conversation to exactly the ids of render_conversation, so
`AutoTokenizer.from_pretrained(DIR)` encodes, decodes and applies the chat template as nanochat does.

    save_hf_tokenizer(tokenizer, out_dir)   # tokenizer.json, tokenizer_config.json, special_tokens_map.json

tiktoken keeps BPE as ranks (token bytes -> rank); Hugging Face keeps a vocabulary and an ordered merge list. A
token of rank r is some pair of lower-ranked tokens merged; every such pair is listed at r (in the pieces' rank
order), which makes HF's merge-by-priority produce tiktoken's tokens. Needs `pip install -e ".[hf]"`.

    from_hf_tokenizer_json(path)            # and back: tokenizer.json -> our tokenizer (a model's export, the Hub)

The way back reads the JSON itself (no tokenizers package needed) and takes only a tokenizer.json of the shape
to_hf_tokenizer writes: anything else would be encoded differently by tiktoken than by Hugging Face.
"""
import json
import os

import tiktoken

from nanochat import storage
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

# The chat template: nanochat's format (render_conversation), in Jinja for transformers' apply_chat_template. A
# system message is folded into the first user message; assistant content is text, or a list of parts: text,
# python (a tool call) and python_output (the tool's answer). add_generation_prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set messages = messages if messages[0]['role'] != 'system' else "
    "[{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user_start|>' + message['content'] + '<|user_end|>' }}"
    "{% else %}"
    "{{ '<|assistant_start|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'python' %}{{ '<|python_start|>' + part['text'] + '<|python_end|>' }}"
    "{% elif part['type'] == 'python_output' %}{{ '<|output_start|>' + part['text'] + '<|output_end|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|assistant_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def byte_alphabet():
    """GPT-2's byte-level alphabet: each of the 256 bytes as a printable character (what HF's ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def vocab_and_merges(mergeable_ranks):
    """tiktoken's ranks -> (HF vocabulary {string: id}, merges [(left, right)] in priority order)."""
    alphabet = byte_alphabet()

    def text(token):
        return "".join(alphabet[b] for b in token)
    vocab = {text(token): rank for token, rank in mergeable_ranks.items()}
    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in mergeable_ranks and token[i:] in mergeable_ranks]
        pairs.sort(key=lambda p: (mergeable_ranks[p[0]], mergeable_ranks[p[1]]))
        merges += [(text(left), text(right)) for left, right in pairs]
    return vocab, merges


def to_hf_tokenizer(tokenizer):
    """A tokenizers.Tokenizer equal to ours (ids, special tokens included)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    enc = tokenizer.enc
    vocab, merges = vocab_and_merges(enc._mergeable_ranks)
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    if [i for _, i in specials] != list(range(len(vocab), len(vocab) + len(specials))):
        raise ValueError("special token ids must follow the merged tokens, as nanochat's tokenizer has them")
    hf.add_special_tokens([name for name, _ in specials])
    return hf


def save_hf_tokenizer(tokenizer, out_dir):
    """Write the fast tokenizer and its config (special tokens, chat template) into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    to_hf_tokenizer(tokenizer).save(paths[0])
    special = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "model_max_length": 10**9,
              "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in special.values()], **special}
    with open(paths[1], "w") as f:
        json.dump(config, f, indent=2)
    with open(paths[2], "w") as f:
        json.dump(special, f, indent=2)
    return paths


def from_hf_tokenizer_json(path):
    """Our tokenizer from a tokenizer.json of the kind save_hf_tokenizer writes: byte-level BPE whose vocabulary ids
    are the ranks and whose merges are the ones the ranks imply, one Split regex (the split pattern) before
    ByteLevel, and nanochat's special tokens right after the vocabulary. Anything else raises ValueError saying
    what does not fit."""
    data = json.loads(storage.read_bytes(path))

    def unfit(why):
        return ValueError(f"{path} is not a byte-level BPE tokenizer.json of the kind nanochat exports: {why}")
    model = data.get("model") or {}
    options = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    if model.get("type") != "BPE" or any(options.get(k) for k in ("byte_fallback", "continuing_subword_prefix",
                                                                   "end_of_word_suffix")):
        raise unfit(f"its model is not plain BPE ({options})")
    if data.get("normalizer") is not None:
        raise unfit(f"it has a normalizer ({data['normalizer'].get('type')})")
    pattern = _split_pattern(data.get("pre_tokenizer"), unfit)
    inverse = {c: b for b, c in byte_alphabet().items()}
    ranks = {}
    for text, rank in model.get("vocab", {}).items():
        if any(c not in inverse for c in text):
            raise unfit(f"vocabulary entry {text!r} is not written in the byte-level alphabet")
        ranks[bytes(inverse[c] for c in text)] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise unfit("its vocabulary ids are not 0..n-1 without gaps")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise unfit("not every byte has a token")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if merges != vocab_and_merges(ranks)[1]:
        raise unfit("its merges are not the ones its vocabulary's ranks imply (tiktoken would encode differently)")
    added = data.get("added_tokens", [])
    plain = [t["content"] for t in added if not t.get("special")]
    if plain:
        raise unfit(f"it has added tokens that are not special: {plain}")
    specials = {t["content"]: t["id"] for t in added}
    missing = [t for t in SPECIAL_TOKENS if t not in specials]
    if missing:
        raise unfit(f"it lacks nanochat's special tokens {missing}")
    if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
        raise unfit("its special token ids do not follow the vocabulary's")
    enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return RustBPETokenizer(enc, "<|bos|>")


def _split_pattern(pre_tokenizer, unfit):
    """The regex of to_hf_tokenizer's pre-tokenizer: Sequence[Split(Regex, Isolated), ByteLevel without a regex]."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if (pre_tokenizer or {}).get("type") != "Sequence" or kinds != ["Split", "ByteLevel"]:
        raise unfit(f"its pre-tokenizer is not Split then ByteLevel ({pre_tokenizer and pre_tokenizer.get('type')} "
                    f"{kinds})")
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if pattern is None or split.get("behavior") != "Isolated" or split.get("invert"):
        raise unfit(f"its Split is not an isolating regex ({split})")
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        raise unfit(f"its ByteLevel adds a prefix space or splits by its own regex ({byte_level})")
    return pattern
