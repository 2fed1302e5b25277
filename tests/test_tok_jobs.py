"""ray_jobs/tok_train.py and tok_eval.py, run in-process on the shared Ray: train on the shipped corpus, load the
result with nanochat's own loaders, evaluate compression."""
import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, get_token_bytes, get_tokenizer
from ray_jobs import tok_eval, tok_train


@pytest.fixture
def root(tmp_path, monkeypatch):
    """The jobs' --storage root; the environment names another, which they must leave alone."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))
    yield tmp_path / "root"
    assert not (tmp_path / "elsewhere").exists()


def test_tok_train_then_eval(ray_local, root, capsys):
    # 2048 tokens: at 512 byte-level BPE only reaches ~2.1 bytes/token on prose
    result = tok_train.main(["--data", "fallback", "--vocab-size", "2048", "--max-chars", "300000",
                             "--storage", str(root)])
    assert (root / "tokenizer" / "tokenizer.pkl").is_file() and (root / "tokenizer" / "token_bytes.pt").is_file()
    assert 300_000 <= result["train_chars"] < 320_000 and result["vocab_size"] == 2048
    assert result["num_special_tokens"] == 9 and result["token_bytes_min"] == 1 and result["token_bytes_max"] > 4

    tok = get_tokenizer(str(root))  # nanochat's own loader
    assert tok.get_vocab_size() == 2048 and tok.get_bos_token_id() == 2048 - len(SPECIAL_TOKENS)
    text = "It is a truth universally acknowledged... 안녕하세요 🚀 x² = 42"
    assert tok.decode(tok.encode(text)) == text
    token_bytes = get_token_bytes(base_dir=str(root))
    assert token_bytes.shape == (2048,) and token_bytes.dtype == torch.int32 and (token_bytes[-9:] == 0).all()

    out = tok_eval.main(["--data", "fallback", "--storage", str(root)])
    table = capsys.readouterr().out
    for name in ["news", "korean", "code", "math", "science", "train-docs", "val-docs"]:
        assert name in table
    ours = out["ratios"]["ours"]
    assert min(ours["news"], ours["train-docs"], ours["val-docs"]) > 2.5  # English prose
    assert ours["korean"] < ours["news"]  # trained on English only
    for label in ["gpt2", "gpt4"]:  # compared when tiktoken can load them, else skipped with a note
        assert label in out["ratios"] or any(note.startswith(label) for note in out["skipped"])
    # both jobs write their report card sections
    assert "- vocab_size: 2048" in (root / "report" / "tokenizer-training.md").read_text()
    assert "- ours bytes/token (news): " in (root / "report" / "tokenizer-evaluation.md").read_text()


def test_tok_train_too_little_text_hints_at_vocab_size(ray_local, root):
    with pytest.raises(ValueError, match="corpus too small(.|\n)*lower --vocab-size"):
        tok_train.main(["--data", "fallback", "--vocab-size", "32768", "--max-chars", "20000",
                        "--storage", str(root)])
    assert not (root / "tokenizer").exists()
