"""The storage layer on a local directory, memory:// and a real S3 server (moto), and the artifacts that use it."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from nanochat import storage


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://nanochat-test-{os.urandom(4).hex()}/root"
    return request.getfixturevalue("s3_root")


def test_write_read_list_remove(root):
    path = storage.join(root, "a", "b.json")
    assert not storage.exists(path) and storage.listdir(storage.join(root, "a")) == []
    storage.write_json(path, {"x": 1})
    storage.write_text(storage.join(root, "a", "c", "d.txt"), "hello")
    assert storage.read_json(path) == {"x": 1} and storage.read_text(storage.join(root, "a", "c", "d.txt")) == "hello"
    assert storage.read_json(storage.join(root, "missing.json"), default="absent") == "absent"
    entries = {name: is_dir for name, is_dir, _ in storage.entries(storage.join(root, "a"))}
    assert entries == {"b.json": False, "c": True}
    assert storage.size(path) == len(b'{"x": 1}') and storage.isfile(path)
    with storage.open_read(path) as f:
        assert json.load(f) == {"x": 1}
    storage.rename(path, storage.join(root, "a", "moved.json"))
    assert not storage.exists(path) and storage.read_json(storage.join(root, "a", "moved.json")) == {"x": 1}
    storage.remove(storage.join(root, "a", "moved.json"))
    storage.remove(storage.join(root, "a", "moved.json"))  # missing is fine
    assert storage.listdir(storage.join(root, "a")) == ["c"]


def test_failed_write_keeps_the_previous_file(root):
    path = storage.join(root, "f.bin")
    storage.write_bytes(path, b"old")

    def crash(f):
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        storage.write_atomic(path, crash)
    assert storage.read_bytes(path) == b"old"
    if not storage.is_uri(root):
        assert os.listdir(storage.local_path(root)) == ["f.bin"]  # no temp file left behind


def test_append_log_keeps_earlier_lines_and_flushes(root):
    path = storage.join(root, "run", "metrics.jsonl")
    log = storage.AppendLog(path, interval=3600)
    log.write('{"step": 1}')
    log.write('{"step": 2}')
    if storage.is_uri(root):  # object stores: nothing is sent until the interval passes or a flush
        assert not storage.exists(path)
    log.flush()
    assert storage.read_text(path).split() == ['{"step":', '1}', '{"step":', '2}']
    log.close()
    resumed = storage.AppendLog(path, interval=0)  # a resumed run appends to what is there
    resumed.write('{"step": 3}')
    assert [json.loads(line)["step"] for line in storage.read_text(path).splitlines()] == [1, 2, 3]
    resumed.close()


def test_missing_filesystem_package_names_the_extra(monkeypatch):
    with pytest.raises(storage.StorageError, match=r'pip install -e "\.\[gcs\]"'):
        storage.check_root("gs://bucket/run")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "gs://bucket/run")
    from nanochat.common import get_base_dir
    with pytest.raises(storage.StorageError, match="gcs"):
        get_base_dir()


def test_uri_root_never_touches_the_working_directory(s3_root, tmp_path, monkeypatch, tiny_tokenizer):
    from nanochat.checkpoint_manager import (CheckpointError, list_steps, load_checkpoint, load_model,
                                             save_checkpoint)
    from nanochat.common import get_base_dir
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", s3_root)
    assert get_base_dir() == s3_root
    tiny_tokenizer.save(storage.join(s3_root, "tokenizer"))
    assert get_tokenizer().encode("hello world") == tiny_tokenizer.encode("hello world")
    assert get_token_bytes().shape == (tiny_tokenizer.get_vocab_size(),)
    config = GPTConfig(sequence_len=16, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    model = build_model(config, "cpu")
    ckpt = storage.join(s3_root, "base_checkpoints", "d1")
    for step in (1, 2):
        save_checkpoint(ckpt, step, model.state_dict(), None, {"model_config": asdict(config), "step": step})
    assert list_steps(ckpt) == [1, 2]
    loaded, tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 2 and tokenizer.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # a corrupt object in the bucket is named, and loading falls back to the intact step
    storage.write_bytes(storage.join(ckpt, "model_000002.pt"), b"garbage")
    with pytest.raises(CheckpointError, match="model_000002.pt"):
        load_checkpoint(ckpt, 2, "cpu")
    assert load_model("base", "cpu", "eval")[2]["step"] == 1
    get_report().log("Base model training", {"depth": 1})
    assert "depth: 1" in storage.read_text(storage.join(s3_root, "report", "base-model-training.md"))
    assert os.listdir(tmp_path) == []  # no local directory named after the URI (no "s3:")
