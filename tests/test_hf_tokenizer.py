"""nanochat/hf_tokenizer.py against transformers: the exported fast tokenizer gives our ids (held text of the shared
data, the shipped corpus, odd strings), decodes byte for byte, and its chat template renders our ids. And back:
tokenizer.json -> our tokenizer encodes and renders as the original, and a tokenizer.json of another kind is refused."""
import gzip
import json

import pydoc_data.topics
import pytest
from transformers import AutoTokenizer

from conftest import SHARED_DATA
from nanochat.dataset import FALLBACK_VAL
from nanochat.hf_tokenizer import from_hf_tokenizer_json, save_hf_tokenizer
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

ODD = ["", " ", "  leading and trailing  ", "Hello world! 123 + 4567 = 4690.", "don't we'll they've I'M",
       "Ünïcödé: 你好世界, 안녕하세요, Привет, 🚀✨\t tabs\r\n\r\nend", "x" * 300, "1234567890" * 5,
       "\u200b\ufeff zero width", "a\n\n\n\nb", "émoji 👩‍👩‍👧‍👦 family"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ours, the directory it was exported to): a 4096-token vocabulary trained on Python's docs."""
    ours = RustBPETokenizer.train_from_iterator(iter(pydoc_data.topics.topics.values()), 4096)
    out = tmp_path_factory.mktemp("hf_tokenizer")
    save_hf_tokenizer(ours, str(out))
    return ours, str(out)


@pytest.fixture(scope="module")
def pair(exported):
    """(ours, the exported one loaded by transformers)."""
    ours, out = exported
    return ours, AutoTokenizer.from_pretrained(out)


def check_texts(pair, texts):
    ours, hf = pair
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text[:80]
        assert hf.decode(ids) == text  # byte for byte
    return len(texts)


def test_odd_strings_and_the_shipped_corpus(pair):
    with gzip.open(FALLBACK_VAL, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]  # every held-out document of the shipped corpus
    assert len(docs) > 50 and check_texts(pair, ODD + docs) == len(ODD) + len(docs)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the held real text)")
def test_the_held_text_of_the_shared_data(pair):
    with gzip.open(SHARED_DATA / "pretrain" / "tinyshakespeare.txt.gz", "rt", encoding="utf-8") as f:
        shakespeare = f.read()
    texts = [shakespeare[i:i + 20000] for i in range(0, len(shakespeare), 20000)]
    for rel in ("chat/fastchat_reference_conversations.jsonl.gz", "gsm8k/test.jsonl.gz"):
        with gzip.open(SHARED_DATA / rel, "rt", encoding="utf-8") as f:
            texts.append(f.read())  # the raw JSON lines: quotes, escapes, digits, newlines
    check_texts(pair, texts)


def test_special_token_strings_in_text(pair):
    """Our encode() reads '<|bos|>' in text as text; Hugging Face reads it as the special token (as it does for every
    chat template) unless told split_special_tokens=True, which then gives our ids."""
    ours, hf = pair
    text = "a literal <|bos|> and <|user_start|> in text"
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert ours.encode_special("<|bos|>") in hf.encode(text, add_special_tokens=False)


def test_special_tokens_keep_their_ids(pair):
    ours, hf = pair
    for name in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(name) == ours.encode_special(name)
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|assistant_end|>"
    assert len(hf) == ours.get_vocab_size()


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "What is 12*34, plus 5?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12*34+5"},
                                       {"type": "python_output", "text": "413"},
                                       {"type": "text", "text": "It is 413."}]},
     {"role": "user", "content": "Thanks! Now 7*7?"},
     {"role": "assistant", "content": [{"type": "python", "text": "7*7"}, {"type": "python_output", "text": "49"},
                                       {"type": "text", "text": "49."}]}],
]


def chat_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_chat_template_renders_our_ids(pair, messages):
    ours, hf = pair
    assert chat_ids(hf, messages) == ours.render_conversation(messages)[0]
    # the prompt for the next reply: everything before the last assistant turn, then an open assistant turn
    assert chat_ids(hf, messages[:-1], add_generation_prompt=True) == ours.render_for_completion(messages)


# -----------------------------------------------------------------------------
# And back: tokenizer.json -> ours

def test_tokenizer_json_back_to_ours_encodes_and_renders_the_same(exported):
    ours, out = exported
    back = from_hf_tokenizer_json(f"{out}/tokenizer.json")
    assert back.enc._mergeable_ranks == ours.enc._mergeable_ranks and back.enc._pat_str == ours.enc._pat_str
    with gzip.open(FALLBACK_VAL, "rt", encoding="utf-8") as f:
        texts = ODD + [json.loads(line)["text"] for line in f]
    assert back.encode(texts) == ours.encode(texts)
    assert back.encode("a literal <|bos|> stays text") == ours.encode("a literal <|bos|> stays text")
    assert [back.encode_special(t) for t in SPECIAL_TOKENS] == [ours.encode_special(t) for t in SPECIAL_TOKENS]
    assert back.get_vocab_size() == ours.get_vocab_size() and back.turn_end_ids() == ours.turn_end_ids()
    for messages in CONVERSATIONS:
        assert back.render_conversation(messages) == ours.render_conversation(messages)
        assert back.render_for_completion(messages) == ours.render_for_completion(messages)
    assert back.compute_token_bytes().equal(ours.compute_token_bytes())


def _drop_a_rank(d):
    vocab = d["model"]["vocab"]
    del vocab[next(t for t, i in vocab.items() if i == 300)]


def _swap_two_merges(d):
    merges = d["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]


def _gpt2_style_pre_tokenizer(d):
    d["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["model"].update(type="WordPiece"), "its model is not plain BPE"),
    (lambda d: d.update(normalizer={"type": "NFC"}), "it has a normalizer"),
    (_gpt2_style_pre_tokenizer, "its pre-tokenizer is not Split then ByteLevel"),
    (_drop_a_rank, "ids are not 0..n-1 without gaps"),
    (_swap_two_merges, "its merges are not the ones its vocabulary's ranks imply"),
    (lambda d: d["model"]["vocab"].update({"A\n": 4000}), "is not written in the byte-level alphabet"),
    (lambda d: d.update(added_tokens=d["added_tokens"][:-1]), r"lacks nanochat's special tokens \['<\|output_end"),
])
def test_a_tokenizer_json_of_another_kind_is_refused(exported, tmp_path, change, message):
    _, out = exported
    with open(f"{out}/tokenizer.json") as f:
        data = json.load(f)
    change(data)
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=message):
        from_hf_tokenizer_json(str(tmp_path / "tokenizer.json"))
