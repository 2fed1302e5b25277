"""Tokenizer tests: hermetic (a tiny tokenizer trained on a toy corpus), plus one optional real-data check."""
import copy
import gzip
import json
import os
import pickle
import random

import pytest
import torch

from conftest import SHARED_DATA
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, get_token_bytes, get_tokenizer

N_MERGES = 60
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + N_MERGES

TOY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! Hello there, how are you doing today? I am doing well, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 34))\n",
    "In 2024 the temperature was 21.5 degrees; in 2025 it rose to 23.75 degrees.",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요.",
    "Émojis are fun 😀🎉 and café naïve résumé are words with accents.",
    "the theory of the thing is that there is nothing other than the other thing",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
] * 20



@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(TOY_CORPUS), VOCAB_SIZE)


def test_vocab_size_exact(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)


def test_split_pattern_uses_two_digit_numbers():
    assert r"\p{N}{1,2}" in SPLIT_PATTERN and r"\p{N}{1,3}" not in SPLIT_PATTERN


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        RustBPETokenizer.train_from_iterator(iter(TOY_CORPUS), 256 + len(SPECIAL_TOKENS) - 1)


def test_corpus_too_small_for_vocab_raises():
    with pytest.raises(ValueError, match="corpus too small"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab"]), 1000)


@pytest.mark.parametrize("text", [
    "",
    "hello world",
    "Unseen words: zyzzyva quixotic!",
    "안녕하세요 세계",
    "emoji 🚀🔥 and 漢字 and ñ",
    "def f(x):\n\treturn x ** 2  # comment\n\n",
    "  leading and trailing spaces   \n\n\r\n",
    "numbers 1234567890 3.14159",
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert tok.decode(ids) == text
    assert tok(text) == ids  # __call__ is encode


def test_merges_compress(tok):
    text = TOY_CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_special_tokens_distinct_single_ids_at_top(tok):
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    n_ranks = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert ids == list(range(n_ranks, VOCAB_SIZE))  # in SPECIAL_TOKENS order, after all mergeable ranks
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tok.id_to_token(i) == s
        assert tok.decode([i]) == s
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    with pytest.raises(KeyError):
        tok.encode_special("<|not_a_special|>")


def test_special_strings_in_text_are_plain_text(tok):
    specials = set(tok.encode_special(s) for s in SPECIAL_TOKENS)
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"hi {s} there")
        assert len(ids) > 3
        assert not specials & set(ids)
        assert tok.decode(ids) == f"hi {s} there"


def test_prepend_append(tok):
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    base = tok.encode("hello world")
    assert tok.encode("hello world", prepend=bos) == [bos] + base
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + base
    assert tok.encode("hello world", append=end) == base + [end]
    assert tok.encode("hello world", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + base + [end]
    rows = tok.encode(["a b", "c d"], prepend="<|bos|>", append=end)
    assert rows == [[bos] + tok.encode("a b") + [end], [bos] + tok.encode("c d") + [end]]


def test_batch_encode_matches_single(tok):
    texts = ["hello world", "", "안녕 😀", "def f():\n    pass\n"] * 5
    batch = tok.encode(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    with pytest.raises(TypeError):
        tok.encode(123)


def test_tokenizer_pickles(tok):
    # Ray ships tokenizers between processes by pickling
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode(TOY_CORPUS[2]) == tok.encode(TOY_CORPUS[2])
    assert tok2.get_bos_token_id() == tok.get_bos_token_id()


# -----------------------------------------------------------------------------
# chat template

def _span(ids, mask, tok, start, end):
    """Mask values of the first <start> ... <end> block (inclusive)."""
    a = ids.index(tok.encode_special(start))
    b = ids.index(tok.encode_special(end), a)
    return mask[a:b + 1]


def test_render_masks(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    original = copy.deepcopy(conv)
    ids, mask = tok.render_conversation(conv)
    assert conv == original  # input not mutated
    assert len(ids) == len(mask)
    S = tok.encode_special
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    expected_ids, expected_mask = [S("<|bos|>")], [0]
    for m in conv["messages"]:
        body = tok.encode(m["content"])
        if m["role"] == "user":
            expected_ids += [S("<|user_start|>")] + body + [S("<|user_end|>")]
            expected_mask += [0] * (len(body) + 2)
        else:
            expected_ids += [S("<|assistant_start|>")] + body + [S("<|assistant_end|>")]
            expected_mask += [0] + [1] * len(body) + [1]
    assert ids == expected_ids
    assert mask == expected_mask
    # only assistant content + assistant_end are supervised
    supervised = [i for i, m in zip(ids, mask) if m == 1]
    assert tok.decode(supervised) == "It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"


def test_system_message_merged(tok):
    with_system = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]}
    original = copy.deepcopy(with_system)
    merged = {"messages": [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
    ]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system == original


def test_tool_parts(tok):
    conv = {"messages": [
        {"role": "user", "content": "Compute 12*34"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "The answer is 408."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert set(_span(ids, mask, tok, "<|python_start|>", "<|python_end|>")) == {1}
    assert set(_span(ids, mask, tok, "<|output_start|>", "<|output_end|>")) == {0}
    a = ids.index(tok.encode_special("<|assistant_start|>"))
    assert mask[a] == 0
    assert ids[-1] == tok.encode_special("<|assistant_end|>") and mask[-1] == 1
    supervised = tok.decode([i for i, m in zip(ids, mask) if m == 1])
    assert supervised == "Let me compute.<|python_start|>12*34<|python_end|>The answer is 408.<|assistant_end|>"
    assert tok.decode(ids).count("408") == 2


def test_unknown_part_type_raises(tok):
    conv = {"messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": [{"type": "image", "text": "?"}]}]}
    with pytest.raises(ValueError, match="image"):
        tok.render_conversation(conv)


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "answer " * 200}]}
    ids, mask = tok.render_conversation(conv, max_tokens=32)
    assert len(ids) == len(mask) == 32
    full_ids, _ = tok.render_conversation(conv)
    assert ids == full_ids[:32]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "hi"}], "role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "system"),
    ([], "no messages"),
    ([{"role": "user", "content": ["not", "a", "str"]}], "str"),
])
def test_bad_conversations_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]}
    original = copy.deepcopy(conv)
    ids = tok.render_for_completion(conv)
    assert conv == original
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert "Paris" not in tok.decode(ids)
    prompt_ids, _ = tok.render_conversation({"messages": conv["messages"][:1]})
    assert ids == prompt_ids + [tok.encode_special("<|assistant_start|>")]
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": conv["messages"][:1]})


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]})
    s = tok.visualize_tokenization(ids, mask)
    assert "<|bos|>" in s and "<|assistant_end|>" in s
    assert s.count("\033[92m") == sum(mask)  # green = supervised
    assert s.count("\033[91m") == len(mask) - sum(mask)


# -----------------------------------------------------------------------------
# persistence

def test_save_and_load(tok, tmp_path):
    tok_dir = tmp_path / "tokenizer"
    tok.save(str(tok_dir))
    assert sorted(os.listdir(tok_dir)) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left behind
    for loaded in (RustBPETokenizer.from_directory(str(tok_dir)), get_tokenizer(base_dir=str(tmp_path))):
        assert loaded.get_vocab_size() == tok.get_vocab_size()
        assert loaded.get_bos_token_id() == tok.get_bos_token_id()
        for text in TOY_CORPUS[:8] + ["unseen 😀 text <|bos|>"]:
            assert loaded.encode(text) == tok.encode(text)
        conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        assert loaded.render_conversation(conv) == tok.render_conversation(conv)

    token_bytes = get_token_bytes(base_dir=str(tmp_path))
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    for s in SPECIAL_TOKENS:
        assert token_bytes[tok.encode_special(s)] == 0
    assert torch.all(token_bytes[:256] == 1)
    assert torch.all(token_bytes[256:VOCAB_SIZE - len(SPECIAL_TOKENS)] >= 2)  # merges are >= 2 bytes
    for text in ["안녕하세요 😀 naïve", TOY_CORPUS[2], "partial utf-8 tokens: 漢字"]:
        ids = tok.encode(text)
        assert token_bytes[ids].sum().item() == len(text.encode("utf-8"))


def test_get_tokenizer_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        get_tokenizer(base_dir=str(missing))
    assert str(missing / "tokenizer" / "tokenizer.pkl") in str(e.value)
    assert "tok_train" in str(e.value)
    with pytest.raises(FileNotFoundError):
        get_token_bytes(base_dir=str(missing))


def test_corrupt_pickle_names_file(tmp_path):
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.pkl").write_bytes(b"this is not a pickle")
    with pytest.raises(RuntimeError) as e:
        get_tokenizer(base_dir=str(tmp_path))
    assert str(tok_dir / "tokenizer.pkl") in str(e.value)
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(RuntimeError, match="tokenizer.pkl"):
        RustBPETokenizer.from_directory(str(tok_dir))


class _RunsCode:
    """A pickle payload that would run a shell command when loaded by plain pickle."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_tokenizer_pickle_cannot_run_code(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(RuntimeError, match=r"refusing to load .*tokenizer.pkl: it references (posix|os)\.system"):
        get_tokenizer(base_dir=str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    # what nanochat (and upstream nanochat) write, a pickled tiktoken Encoding, still loads
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps(tiny_tokenizer.enc))
    assert get_tokenizer(base_dir=str(tmp_path)).encode("hello world") == tiny_tokenizer.encode("hello world")


# -----------------------------------------------------------------------------
# real text (optional: needs the shared data directory next to the repo)

def _load_pretrain_docs(pretrain_dir):
    """Documents from parquet shards if any (column "text"), else paragraphs of the Gutenberg jsonl.gz."""
    shards = sorted(pretrain_dir.glob("*.parquet"))
    if shards:
        import pyarrow.parquet as pq
        return [t for s in shards[:2] for t in pq.read_table(s, columns=["text"]).column("text").to_pylist()]
    docs = []
    with gzip.open(pretrain_dir / "gutenberg_nltk.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            docs += [p for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    return docs


@pytest.mark.skipif(not (SHARED_DATA / "pretrain").is_dir(), reason=f"shared data not found at {SHARED_DATA}/pretrain")
def test_compression_on_real_text():
    docs = _load_pretrain_docs(SHARED_DATA / "pretrain")
    random.Random(0).shuffle(docs)
    train, held_out = docs[:4000], docs[-1000:]
    tok = RustBPETokenizer.train_from_iterator(iter(train), 4096)
    n_bytes = sum(len(d.encode("utf-8")) for d in held_out)
    n_tokens = sum(len(ids) for ids in tok.encode(held_out, num_threads=2))
    ratio = n_bytes / n_tokens
    assert ratio > 3.0, f"compression {ratio:.2f} bytes/token"
    assert all(tok.decode(tok.encode(d)) == d for d in held_out[:50])
