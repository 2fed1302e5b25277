"""Models from outside the storage root (nanochat/hub.py, checkpoint_manager.load_directory): local directories and
Hub repos (a local FakeHub) of Hugging Face exports and of nanochat's layout; which files are fetched, resuming and
retrying interrupted downloads, checksums, offline use, clear errors, and the consumers (training stages' output,
chat CLI, evals). Nothing leaves 127.0.0.1: huggingface_hub's HTTP client refuses any other host here."""
import hashlib
import json
import logging
import os
import shutil
import sys

import httpx2
import pytest
import torch
from huggingface_hub import constants, set_client_factory
from safetensors.torch import load_file, save_file
from huggingface_hub.utils._http import default_client_factory  # (private) to put huggingface_hub's own back

from conftest import perturbed
from fake_hub import FakeHub, git_blob_sha1, write_hf_export, write_nanochat_layout
from nanochat import hub as nhub
from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.gpt import GPTConfig, build_model
from nanochat.hub import HubError

CONFIG = dict(sequence_len=64, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)  # the tiny tokenizer's


def tiny_model(seed):
    torch.manual_seed(seed)
    return perturbed(build_model(GPTConfig(**CONFIG)), seed=seed).eval()


@torch.no_grad()
def logits(model):
    return model(torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1)))


def same_model(loaded, original):
    return torch.equal(logits(loaded), logits(original))


@pytest.fixture(scope="module")
def models():
    return {100: tiny_model(1), 200: tiny_model(2)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, models, tiny_tokenizer):
    """Directories of each layout: Hugging Face exports of step 200 (one file, three shards), nanochat's layout
    with steps 100 and 200 (tokenizer at the root, as nanochat publishes it, or in tokenizer/)."""
    root = tmp_path_factory.mktemp("exports")
    return {"hf": write_hf_export(models[200], tiny_tokenizer, str(root / "tiny-hf"), step=200),
            "hf-shards": write_hf_export(models[200], tiny_tokenizer, str(root / "tiny-shards"), step=200, shards=3),
            "nanochat": write_nanochat_layout(models, tiny_tokenizer, str(root / "tiny-nc")),
            "nanochat-sub": write_nanochat_layout(models, tiny_tokenizer, str(root / "tiny-nc-sub"),
                                                  tokenizer_subdir=True)}


def only_local(request):
    if request.url.host != "127.0.0.1":
        raise AssertionError(f"a test tried to reach {request.url}")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub as HF_ENDPOINT, a fresh Hugging Face cache, online; any request off 127.0.0.1 fails."""
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in [("HF_HUB_CACHE", str(tmp_path / "hf-cache")), ("HF_HUB_OFFLINE", False),
                        ("HF_HUB_DISABLE_XET", True), ("HF_HUB_DISABLE_TELEMETRY", True),
                        ("HF_HUB_DISABLE_IMPLICIT_TOKEN", True)]:
        monkeypatch.setattr(constants, name, value)
    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [only_local]}, follow_redirects=True,
                                             timeout=None))
    yield fake
    set_client_factory(default_client_factory)
    fake.close()


def cached(repo_id, commit, name):
    return os.path.join(constants.HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}", "snapshots", commit, name)


# -----------------------------------------------------------------------------
# What a source is, and which files it needs

def test_sources_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert nhub.parse("owner/name") == nhub.Source(repo_id="owner/name")
    assert nhub.parse("owner/name@v2").revision == "v2"
    assert nhub.parse("hf://owner/name@refs/pr/1") == nhub.Source(repo_id="owner/name", revision="refs/pr/1")
    os.makedirs("owner/name")  # an existing directory wins over the repo id it looks like ...
    assert nhub.parse("owner/name") == nhub.Source(path=str(tmp_path / "owner" / "name"))
    assert nhub.parse("hf://owner/name").repo_id == "owner/name"  # ... unless the Hub is asked for explicitly
    assert nhub.source_name("owner/name") == "name" and nhub.source_name("hf://someone/d32@main") == "d32"
    assert nhub.pin("owner/name") == str(tmp_path / "owner" / "name")  # absolute: workers run elsewhere
    for missing in ("./exports/d20", "/no/such/dir", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            nhub.parse(missing)
    for bad in ("d20", "owner/name@", "hf://just-a-name"):
        with pytest.raises(ValueError, match="owner/name"):
            nhub.parse(bad)
    with pytest.raises(ValueError, match="base|mid|sft|rl"):
        load_model("sftt", "cpu", "eval")


def test_only_the_needed_files_are_picked():
    steps = [f"{kind}_{s:06d}.{ext}" for s in (100, 200, 300) for kind, ext in (("model", "pt"), ("meta", "json"))]
    steps += ["optim_000300_rank0.pt", "meta_000400.json", "README.md", "tokenizer/tokenizer.pkl",
              "tokenizer/token_bytes.pt", "report.md"]  # step 400 has no model file: not a step
    assert nhub.select_files(steps) == ["meta_000300.json", "model_000300.pt", "tokenizer/token_bytes.pt",
                                        "tokenizer/tokenizer.pkl"]
    assert nhub.select_files(steps, 100)[:2] == ["meta_000100.json", "model_000100.pt"]
    with pytest.raises(HubError, match=r"no checkpoint step 400; its steps: \[100, 200, 300\]"):
        nhub.select_files(steps, 400)
    export = ["config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002"
              ".safetensors", "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "modeling_nanochat.py", "README.md", "model_000650.pt", "meta_000650.json",
              "extras/big.safetensors"]
    assert nhub.select_files(export) == sorted(export[:8])
    with pytest.raises(HubError, match="neither a Hugging Face export"):
        nhub.select_files(["README.md", "weights.bin"])


# -----------------------------------------------------------------------------
# Loading from the Hub

def test_hf_export_from_the_hub_then_offline_then_with_the_hub_down(hub, exports, models, tiny_tokenizer, caplog):
    commit = hub.add_repo("me/tiny-chat", exports["hf-shards"])
    model, tokenizer, meta = load_model("me/tiny-chat", "cpu", "eval")
    assert same_model(model, models[200]) and not model.training
    assert tokenizer.encode("Hello world, 123!") == tiny_tokenizer.encode("Hello world, 123!")
    assert tokenizer.get_bos_token_id() == tiny_tokenizer.get_bos_token_id()
    assert meta["step"] == 200 and meta["source"] == "me/tiny-chat" and meta["model_config"]["n_layer"] == 2
    fetched = {p.split("/", 5)[5] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    shards = {n for n in os.listdir(exports["hf-shards"]) if n.endswith(".safetensors")}
    assert len(shards) > 1 and fetched == shards | {
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}  # not modeling_nanochat.py
    assert nhub.pin("me/tiny-chat") == f"hf://me/tiny-chat@{commit}"

    hub.requests.clear()  # offline: from the cache, not a single request
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert same_model(load_model("me/tiny-chat", "cpu", "eval")[0], models[200])
        assert nhub.pin("me/tiny-chat") == "hf://me/tiny-chat"
    assert hub.requests == []

    hub.close()  # the Hub unreachable: a warning, then the cache
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert same_model(load_model("me/tiny-chat", "cpu", "eval")[0], models[200])
    assert "cannot be reached" in caplog.text
    with pytest.raises(HubError, match="not .*in the Hugging Face cache"):
        load_model("me/never-downloaded", "cpu", "eval")


def test_nanochat_layout_from_the_hub_fetches_one_step(hub, exports, models):
    hub.add_repo("karpathy/tiny-d2", exports["nanochat"])
    model, tokenizer, meta = load_model("karpathy/tiny-d2", "cpu", "eval")
    assert same_model(model, models[200]) and meta["step"] == 200 and tokenizer.get_vocab_size() == 320
    fetched = {p.split("/", 5)[5] for m, p, _ in hub.requests if m in ("GET", "HEAD") and "/resolve/" in p}
    assert fetched == {"model_000200.pt", "meta_000200.json", "tokenizer.pkl", "token_bytes.pt"}
    model, _, meta = load_model("karpathy/tiny-d2", "cpu", "train", step=100)
    assert same_model(model.eval(), models[100]) and meta["step"] == 100
    with pytest.raises(HubError, match=r"no checkpoint step 300; its steps: \[100, 200\]"):
        load_model("karpathy/tiny-d2", "cpu", "eval", step=300)


def test_local_directories_of_both_layouts(exports, models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a directory never asks the Hub
    model, tokenizer, meta = load_model(exports["hf"], "cpu", "eval")
    assert same_model(model, models[200]) and meta["step"] == 200 and meta["model_tag"] == "d2"
    monkeypatch.chdir(os.path.dirname(exports["nanochat-sub"]))
    model, _, meta = load_model("./tiny-nc-sub", "cpu", "eval")  # tokenizer in tokenizer/
    assert same_model(model, models[200]) and meta["step"] == 200
    assert same_model(load_model("tiny-nc", "cpu", "eval", step=100)[0], models[100])  # tokenizer at the root
    with pytest.raises(ValueError, match="export of step 200, not of step 100"):
        load_model(exports["hf"], "cpu", "eval", step=100)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face export"):
        load_model(str(tmp_path / "empty"), "cpu", "eval")


def test_without_the_hf_extra_errors_name_it(exports, models, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'need huggingface_hub: pip install -e "\.\[hf\]"'):
        load_model("owner/name", "cpu", "eval")
    with pytest.raises(ImportError, match=r'export needs safetensors: pip install -e "\.\[hf\]"'):
        load_model(exports["hf"], "cpu", "eval")
    assert same_model(load_model(exports["nanochat"], "cpu", "eval")[0], models[200])  # needs neither


# -----------------------------------------------------------------------------
# Interrupted downloads, corrupt files, missing repos

def test_a_closed_connection_resumes_with_a_range_request(hub, exports, models, monkeypatch):
    """huggingface_hub itself: the rest of the file from its last whole chunk (10 MB on the Hub; 4 KiB here)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    commit = hub.add_repo("me/tiny-chat", exports["hf"])
    hub.cut("model.safetensors", 10000)
    model, _, _ = load_model("me/tiny-chat", "cpu", "eval")
    assert hub.gets("model.safetensors") == [None, "bytes=8192-"]
    with open(cached("me/tiny-chat", commit, "model.safetensors"), "rb") as f:
        assert f.read() == hub.repos["me/tiny-chat"]["files"]["model.safetensors"]
    assert same_model(model, models[200])


def test_a_reset_connection_is_retried_a_bounded_number_of_times(hub, exports, models, caplog):
    """huggingface_hub gives up on a reset connection (and drops the partial file): nanochat.hub tries again."""
    hub.add_repo("me/tiny-chat", exports["hf"])
    hub.cut("model.safetensors", 10000, reset=True)
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert same_model(load_model("me/tiny-chat", "cpu", "eval")[0], models[200])
    assert "ReadError: [Errno 104] Connection reset by peer; trying again (1/3)" in caplog.text
    assert hub.gets("model.safetensors") == [None, None]  # from the start again
    hub.add_repo("me/tiny-chat-2", exports["hf"])  # (not cached yet)
    hub.requests.clear()
    hub.cut("tokenizer.json", 100, reset=True, times=5)
    with pytest.raises(HubError, match=r"hf://me/tiny-chat-2 from .* failed 2 times; last: ReadError"):
        nhub.locate("me/tiny-chat-2", max_attempts=2)
    assert hub.gets("tokenizer.json") == [None, None]


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])  # an LFS file (sha256), a git one (sha1)
def test_a_file_that_fails_its_checksum_is_named_deleted_and_downloaded_again(hub, exports, models, name):
    commit = hub.add_repo("me/tiny-chat", exports["hf"])
    hub.corrupt(name)
    with pytest.raises(HubError, match=f"the downloaded {name} does not match the Hub's record") as e:
        load_model("me/tiny-chat", "cpu", "eval")
    assert e.value.path == name and not os.path.exists(cached("me/tiny-chat", commit, name))
    data = hub.repos["me/tiny-chat"]["files"][name]
    etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)
    assert not os.path.exists(os.path.join(constants.HF_HUB_CACHE, "models--me--tiny-chat", "blobs", etag))
    hub.repair(name)
    assert same_model(load_model("me/tiny-chat", "cpu", "eval")[0], models[200])
    assert hub.gets(name) == [None, None]


def test_a_missing_repo_or_revision_is_a_clear_error(hub, exports):
    hub.add_repo("me/tiny-chat", exports["hf"])
    with pytest.raises(HubError, match=f"no model repo nobody/nothing on {hub.url}: it does not exist, or it is "
                                       f"private") as e:
        load_model("nobody/nothing", "cpu", "eval")
    assert e.value.__suppress_context__ and e.value.__cause__ is None  # not a stack of HTTP internals
    with pytest.raises(HubError, match="me/tiny-chat on .* has no revision 'v9'"):
        load_model("me/tiny-chat@v9", "cpu", "eval")
    with pytest.raises(HubError, match="no model repo"):
        nhub.pin("nobody/nothing")


def test_a_repo_updated_during_the_download_is_not_mixed_up(hub, exports, monkeypatch):
    """The files are picked and checked against the commit model_info saw; if the branch moved on meanwhile, the
    load fails rather than check one commit's files against another's record."""
    first = hub.add_repo("me/tiny-chat", exports["hf"])
    download = nhub._download

    def push_then_download(*args):
        hub.add_repo("me/tiny-chat", exports["hf-shards"])
        return download(*args)
    monkeypatch.setattr(nhub, "_download", push_then_download)
    with pytest.raises(HubError, match=f"changed while it was being downloaded \\(commit {first}, now"):
        load_model("me/tiny-chat", "cpu", "eval")


def broken(directory, how):
    """A copy of an export with one thing wrong."""
    out = directory + "-" + how
    shutil.copytree(directory, out, dirs_exist_ok=True)
    weights, config_path = os.path.join(out, "model.safetensors"), os.path.join(out, "config.json")
    if how == "truncated":
        os.truncate(weights, os.path.getsize(weights) - 100)
    elif how == "garbage":
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 16)
    elif how == "missing-tensor":
        state = load_file(weights)
        del state["lm_head.weight"]
        save_file(state, weights)
    else:
        with open(config_path) as f:
            config = json.load(f)
        if how == "llama":
            config["model_type"] = "llama"
        else:
            del config["rope_base"]
        with open(config_path, "w") as f:
            json.dump(config, f)
    return out


@pytest.mark.parametrize("how, message", [
    ("truncated", r"model.safetensors is truncated or corrupt"), ("garbage", r"model.safetensors is truncated"),
    ("missing-tensor", r"do not fit its config.json: missing \['lm_head.weight'\]"),
    ("llama", "is a 'llama' model, not a nanochat export"), ("no-rope", r"lacks the model config fields \['rope_")])
def test_a_broken_export_raises_checkpoint_error_naming_it(exports, how, message):
    directory = broken(exports["hf"], how)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(directory, "cpu", "eval")
    assert e.value.path.startswith(directory)


# -----------------------------------------------------------------------------
# The consumers: training stages, the chat CLI, evals

def test_training_stages_name_their_output_after_a_directory_or_repo(hub, exports, tmp_path, monkeypatch):
    from nanochat import chat_rl, chat_train
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    commit = hub.add_repo("me/tiny-chat", exports["hf"])
    cfg = chat_train.SFTConfig(source=exports["hf"]).resolved()
    assert cfg.source == exports["hf"]
    assert chat_train.output_dir(cfg) == str(tmp_path / "chatsft_checkpoints" / "tiny-hf")
    cfg = chat_train.MidTrainConfig(source=exports["hf"], model_tag="mine").resolved()
    assert chat_train.output_dir(cfg) == str(tmp_path / "mid_checkpoints" / "mine")
    cfg = chat_rl.RLConfig(source="me/tiny-chat").resolved()  # pinned: every worker trains from one commit
    assert cfg.source == f"hf://me/tiny-chat@{commit}"
    assert chat_rl.output_dir(cfg) == str(tmp_path / "chatrl_checkpoints" / "tiny-chat")


def test_chat_cli_on_an_export_directory(exports, models):
    from nanochat.engine import Engine
    from serve.chat_cli import ChatCliConfig, LocalChat
    argv = ["-i", exports["hf"], "-t", "0", "-m", "6", "--seed", "0", "--device-type", "cpu"]
    chat = LocalChat(ChatCliConfig.parse(argv))  # (the flag once took only sft|rl|mid|base)
    out = []
    chat.reply("Hello", out.append)
    tok = chat.tokenizer
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>"), *tok.encode("Hello"),
              tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    seqs, _ = Engine(models[200], tok).generate_batch(prompt, 1, max_tokens=6, temperature=0.0)
    reply = []
    for t in seqs[0][len(prompt):]:
        if t in tok.turn_end_ids():
            break
        reply.append(t)
    assert "".join(out) == tok.decode(reply)


def test_evals_resolve_a_hub_repo_once_and_measure_bpb_with_its_tokenizer(hub, exports, models, tmp_path):
    from ray_jobs.eval_pool import ActorContext, bpb_work, resolve_checkpoint
    commit = hub.add_repo("karpathy/tiny-d2", exports["nanochat"])
    source, tag, step = resolve_checkpoint("karpathy/tiny-d2", base_dir=str(tmp_path))
    assert (source, tag, step) == (f"hf://karpathy/tiny-d2@{commit}", "tiny-d2", 200)
    hub.requests.clear()
    model, tokenizer, meta = load_model(source, "cpu", "eval", tag, step)  # what each replica does
    assert same_model(model, models[200]) and not [r for r in hub.requests if r[0] == "GET" and "resolve" in r[1]]
    # the storage root (tmp_path) has no tokenizer: bits per byte use the model's own
    ctx = ActorContext(model, tokenizer, meta, "cpu", str(tmp_path))
    nats, nbytes = bpb_work(ctx, "val", "fallback", 1, 2 * 64, 0, 1)
    assert nats > 0 and nbytes > 0
