"""serve.chat_cli on a local checkpoint: one-shot (-p) and interactive (stdin piped), as real subprocesses.
The --url mode is tested against the running server in test_serve.py."""
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from test_serve import make_storage


@pytest.fixture(scope="module")
def storage(tiny_tokenizer, tmp_path_factory):
    return make_storage(tmp_path_factory.mktemp("cli_storage"), tiny_tokenizer)


def greedy_conversation(storage, users, max_tokens):
    """The replies greedy decoding gives to `users` in one conversation, kept as tokens like the CLI keeps it."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    model, tok, _ = load_model("sft", "cpu", "eval", base_dir=storage)
    S = tok.encode_special
    tokens, replies = [tok.get_bos_token_id()], []
    for user in users:
        tokens += [S("<|user_start|>"), *tok.encode(user), S("<|user_end|>"), S("<|assistant_start|>")]
        out, _ = Engine(model, tok).generate_batch(tokens, 1, max_tokens=max_tokens, temperature=0.0)
        replies.append(tok.decode(out[0][len(tokens):]))
        tokens = out[0] + [S("<|assistant_end|>")]
    return replies


def test_one_shot_and_interactive(storage):
    cmd = [sys.executable, "-m", "serve.chat_cli", "--storage", storage, "-t", "0", "-m", "12"]
    # both processes at once: each pays the torch import, so overlap them
    one_shot = subprocess.Popen(cmd + ["-p", "Hi there"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    interactive = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    out_i, err_i = interactive.communicate(b"Hello\n\nHow are you\n/clear\nHi there\nexit\nnever read\n", timeout=300)
    out_1, err_1 = one_shot.communicate(timeout=300)
    assert one_shot.returncode == 0, err_1.decode()
    assert interactive.returncode == 0, err_i.decode()

    first, second = greedy_conversation(storage, ["Hello", "How are you"], 12)
    (fresh,) = greedy_conversation(storage, ["Hi there"], 12)
    assert out_1.decode() == fresh + "\n"
    text = out_i.decode()
    assert "(conversation cleared)" in text
    # each reply sits between "Assistant: " and the next prompt (replies may hold any character, newlines too)
    turns = [part.split("\n\nUser: ")[0] for part in text.split("Assistant: ")[1:]]
    assert turns == [first, second, fresh]  # the second turn saw the first; after /clear it starts over


def test_json_schema_replies_validate_locally_and_through_a_server(storage, tiny_tokenizer, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from bench.bench_serve import LocalServer
    from serve.api import make_api
    from serve.app import ServeConfig
    from serve.service import ChatService
    from test_serve import tiny_chat_model
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer", "n"], "additionalProperties": False}
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(schema))
    cmd = [sys.executable, "-m", "serve.chat_cli", "-t", "1.0", "-m", "100", "--json-schema", str(path), "-p", "Is it?"]
    local = subprocess.Popen(cmd + ["--storage", storage], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    service = ChatService(ServeConfig(), tiny_chat_model(tiny_tokenizer), tiny_tokenizer)
    try:
        with LocalServer(make_api(service)) as srv:
            remote = subprocess.run(cmd + ["--url", srv.url], cwd=REPO_ROOT, capture_output=True, timeout=300)
    finally:
        service.close()
    out_local, err_local = local.communicate(timeout=300)
    for out, err, code in ((out_local, err_local, local.returncode), (remote.stdout, remote.stderr, remote.returncode)):
        assert code == 0, err.decode()
        jsonschema.validate(json.loads(out.decode()), schema), out
    bad = subprocess.run(cmd[:-2] + ["--json-schema", str(tmp_path / "missing.json"), "-p", "x", "--storage", storage],
                         cwd=REPO_ROOT, capture_output=True, timeout=300)
    assert bad.returncode != 0 and b"missing.json" in bad.stderr
