"""The export (nanochat/export.py, the writing of nanochat/hf_format.py) and nanochat/hf_modeling.py against
transformers: an export loaded by AutoModelForCausalLM gives our logits (every architecture piece, the baseline,
nanochat-written checkpoints of both eras) at lengths across the windows and past sequence_len; generate() with its
cache gives the Engine's tokens, samples and beams as without a cache, and left-padded batches as each row alone;
without trust_remote_code transformers asks for it and never builds its own "nanochat"; the tokenizer renders our chat
ids; shards and bf16 load; exports of model type "nanochat" still load; the CLI exports a checkpoint, refuses bad
input and never leaves half an export."""
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from conftest import REPO_ROOT, perturbed
from nanochat import hf_format
from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.export import main, parse_size
from nanochat.gpt import GPTConfig, build_model
from nanochat.hf_format import export_hf
from test_checkpoint_manager import NANOCHAT_KEYS, _nanochat_state_dict, _round_embeddings_to_bf16, \
    _write_nanochat_checkpoint

TINY = dict(sequence_len=64, vocab_size=320, n_layer=4, n_head=2, n_kv_head=1, n_embd=64, short_window=16)
# 1 token; within the short window (16: a query sees 17 keys); one past it; past sequence_len (64: 65 keys) and more
LENGTHS = (1, 7, 17, 18, 40, 65, 66, 100)
MODELING = os.path.join(REPO_ROOT, "nanochat", "hf_modeling.py")


def tiny_model(config, seed=0):
    """A tiny GPT with every weight random, and smear strong enough that getting it wrong changes the tokens."""
    torch.manual_seed(seed)
    model = perturbed(build_model(config), seed=seed)
    if config.use_smear:
        with torch.no_grad():
            model.smear_lambda.fill_(0.8)
    return model.eval()


def tokens(n, batch=2, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def load_hf(directory):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


@torch.no_grad()
def max_logit_deltas(ours, hf, ids, lengths=LENGTHS):
    """{length: max |ours - hf|} of the logits of the first `length` tokens."""
    deltas = {}
    for T in lengths:
        a, b = ours(ids[:, :T]), hf(ids[:, :T]).logits
        assert a.shape == b.shape == (ids.size(0), T, TINY["vocab_size"])
        deltas[T] = (a - b).abs().max().item()
    return deltas


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tokenizer):
    """{name: (our model, its export loaded by transformers, the export's directory)} for every architecture piece on
    (GPTConfig's defaults) and the baseline."""
    out = {}
    for name, config in {"full": GPTConfig(**TINY), "baseline": GPTConfig.baseline(**TINY)}.items():
        model = tiny_model(config)
        directory = str(tmp_path_factory.mktemp("exports") / name)
        export_hf(model, tiny_tokenizer, directory, meta={"source": "sft", "model_tag": "d4", "step": 3})
        out[name] = (model, load_hf(directory), directory)
    return out


# -----------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("name", ["full", "baseline"])
def test_logits_match_ours_across_windows_and_past_sequence_len(exports, name):
    ours, hf, _ = exports[name]
    assert type(hf).__name__ == "NanochatForCausalLM" and hf.dtype == torch.float32
    deltas = max_logit_deltas(ours, hf, tokens(max(LENGTHS)))
    print(f"\nmax |dlogits| fp32, {name}: " + ", ".join(f"T={T}: {d:.2e}" for T, d in deltas.items()))
    assert max(deltas.values()) < 1e-4, deltas


def test_the_cache_in_chunks_matches_one_forward(exports):
    """Prefill, one-token steps and a multi-token chunk on a cache (the masked path) across both windows."""
    ours, hf, _ = exports["full"]
    ids = tokens(90, batch=1)
    with torch.no_grad():
        want = ours(ids)
        cache, got = DynamicCache(config=hf.config), []
        for start, stop in [(0, 10)] + [(t, t + 1) for t in range(10, 40)] + [(40, 47), (47, 90)]:
            got.append(hf(ids[:, start:stop], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 90
    assert (torch.cat(got, dim=1) - want).abs().max().item() < 1e-4


def test_labels_give_our_loss(exports):
    ours, hf, _ = exports["full"]
    ids = tokens(40)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored, as in transformers
    with torch.no_grad():
        loss = hf(ids, labels=labels).loss
        targets = ids[:, 1:].clone()
        targets[0, :4] = -1  # our ignore index
        assert abs(loss.item() - ours(ids[:, :-1], targets).item()) < 1e-5


class NoTurnEnds:
    """The tokenizer, with no token that ends a turn (the Engine then decodes max_tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def turn_end_ids(self):
        return set()


def test_generate_greedy_gives_the_engines_tokens(exports, tiny_tokenizer):
    ours, hf, _ = exports["full"]
    prompt = tiny_tokenizer.encode("The quick brown fox", prepend=tiny_tokenizer.get_bos_token_id())
    n = 70  # well past the short window (16) and sequence_len (64)
    # neither side stops at an end-of-turn token the random model may pick: both decode exactly n tokens
    engine = [column[0] for column, _ in Engine(ours, NoTurnEnds(tiny_tokenizer)).generate(prompt, max_tokens=n,
                                                                                           temperature=0.0)]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=None, do_sample=False,
                      return_dict_in_generate=True, output_logits=True)
    assert len(engine) == n and out.sequences[0, len(prompt):].tolist() == engine
    with torch.no_grad():  # and every step's logits are our full forward's
        want = ours(out.sequences[:, :-1])[0, len(prompt) - 1:]
    assert (torch.cat(out.logits) - want).abs().max().item() < 1e-4


def test_sampling_and_beams_with_the_cache_match_without(exports, tiny_tokenizer):
    _, hf, _ = exports["full"]
    prompt = torch.tensor([tiny_tokenizer.encode("Hello world!", prepend=tiny_tokenizer.get_bos_token_id())])
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(hf.generate(prompt, max_new_tokens=40, do_sample=True, temperature=1.0, use_cache=use_cache,
                                eos_token_id=None))
    assert runs[0].shape[1] == prompt.shape[1] + 40 and torch.equal(*runs)
    beams = [hf.generate(prompt, max_new_tokens=30, num_beams=3, do_sample=False, use_cache=use_cache,
                         eos_token_id=None) for use_cache in (True, False)]
    assert torch.equal(*beams)


def test_left_padded_batch_generates_as_each_row_alone(exports, tiny_tokenizer):
    _, hf, _ = exports["full"]
    bos, pad = tiny_tokenizer.get_bos_token_id(), hf.generation_config.pad_token_id
    prompts = [tiny_tokenizer.encode(t, prepend=bos) for t in ("The quick brown fox", "Hello there, how are you doing")]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert mask.min() == 0  # really padded
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    for row, p in zip(batch, prompts):
        alone = hf.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=None)[0]
        assert row[width:].tolist() == alone[len(p):].tolist()
    with pytest.raises(ValueError, match="left padding only"):
        hf(ids, attention_mask=mask.flip(1))


def test_chat_template_renders_our_ids(exports, tiny_tokenizer):
    hf_tok = AutoTokenizer.from_pretrained(exports["full"][2], trust_remote_code=True)
    conversation = [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                          {"type": "python", "text": "12*34"},
                                          {"type": "python_output", "text": "408"},
                                          {"type": "text", "text": "It is 408."}]},
        {"role": "user", "content": "And 7*7?"},
        {"role": "assistant", "content": [{"type": "python", "text": "7*7"}, {"type": "python_output", "text": "49"},
                                          {"type": "text", "text": "49."}]},
    ]

    def ids(messages, **kwargs):
        out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    assert ids(conversation[:-1], add_generation_prompt=True) == tiny_tokenizer.render_for_completion(conversation)
    assert ids(conversation) == tiny_tokenizer.render_conversation(conversation)[0]


# -----------------------------------------------------------------------------
# The files

def test_export_layout_config_and_the_way_back(exports, tiny_tokenizer, tmp_path):
    ours, hf, directory = exports["full"]
    assert hf.get_input_embeddings() is hf.transformer.wte and hf.get_output_embeddings() is hf.lm_head
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")  # the modes of a plain mkdir / open: the export's too (not mkdtemp's 0700)
    modes = {os.stat(tmp_path / "dir").st_mode, os.stat(tmp_path / "file").st_mode}
    assert {os.stat(directory).st_mode, os.stat(os.path.join(directory, "model.safetensors")).st_mode} == modes
    assert sorted(os.listdir(directory)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "modeling_nanochat.py", "special_tokens_map.json", "tokenizer.json",
                                            "tokenizer_config.json"]
    with open(os.path.join(directory, "modeling_nanochat.py"), "rb") as a, open(MODELING, "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in asdict(ours.config)} == asdict(ours.config)
    assert config["model_type"] == hf_format.MODEL_TYPE == hf.config.model_type == "nanochat_ray"
    assert config["padded_vocab_size"] == ours.padded_vocab_size
    assert config["auto_map"] == {"AutoConfig": "modeling_nanochat.NanochatConfig",
                                  "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"}
    eos = tiny_tokenizer.encode_special("<|assistant_end|>")
    assert (config["bos_token_id"], config["eos_token_id"]) == (tiny_tokenizer.get_bos_token_id(), eos)
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["NanochatForCausalLM"]
    assert config["nanochat"] == {"source": "sft", "model_tag": "d4", "step": 3}
    with open(os.path.join(directory, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"][0] == eos and set(generation["eos_token_id"]) == tiny_tokenizer.turn_end_ids()
    assert generation["pad_token_id"] == eos
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ours.state_dict())  # our keys, verbatim
    back, _, meta = load_model(directory, "cpu", "eval")  # and nanochat loads the export as it was
    assert meta["step"] == 3 and torch.equal(back(tokens(20)), ours(tokens(20)))


def refuse_their_nanochat(monkeypatch):
    """Fail the test if transformers ever builds its own model type "nanochat" (an older architecture)."""
    from transformers.models.nanochat import modeling_nanochat as theirs

    def built(*args, **kwargs):
        pytest.fail("transformers built its own NanoChatForCausalLM from our export")
    monkeypatch.setattr(theirs.NanoChatForCausalLM, "__init__", built)


@pytest.mark.parametrize("how, kwargs, stdin", [("trust_remote_code=False", {"trust_remote_code": False}, ""),
                                                ("no terminal", {}, ""), ("answered no", {}, "n\n"),
                                                ("answered yes", {}, "y\n")])
def test_without_trust_remote_code_transformers_asks_for_it(exports, monkeypatch, how, kwargs, stdin):
    """Our model type is one transformers does not know, so without trust_remote_code=True it asks on stdin whether to
    run the export's code: no answer (no terminal) or "n" is an error asking for trust_remote_code=True, "y" our
    model. Never transformers' own "nanochat" built from our weights."""
    _, hf, directory = exports["full"]
    refuse_their_nanochat(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    if how != "answered yes":
        with pytest.raises(ValueError, match=r"Please pass the argument `trust_remote_code=True`"):
            AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        return
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model).__name__ == "NanochatForCausalLM" and model.config.model_type == "nanochat_ray"
    with torch.no_grad():
        assert torch.equal(model(tokens(40)).logits, hf(tokens(40)).logits)


def test_the_tokenizer_loads_without_trust_remote_code(exports, tiny_tokenizer, monkeypatch):
    """AutoTokenizer reads config.json too: without trust_remote_code (and no terminal to answer transformers'
    question) it still loads the export's tokenizer."""
    refuse_their_nanochat(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    hf_tok = AutoTokenizer.from_pretrained(exports["full"][2])
    text = "The quick brown fox, 12*34 = 408."
    assert hf_tok.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)


def test_exports_of_model_type_nanochat_still_load(exports, tmp_path):
    """Exports written before the model type was ours say "nanochat" (config.json and modeling_nanochat.py): nanochat
    loads them back, and transformers with trust_remote_code=True runs their code, as before."""
    ours, hf, directory = exports["full"]
    old = str(tmp_path / "old-model-type")
    shutil.copytree(directory, old)
    for name, before, after in [("config.json", '"model_type": "nanochat_ray"', '"model_type": "nanochat"'),
                                ("modeling_nanochat.py", 'model_type = "nanochat_ray"', 'model_type = "nanochat"')]:
        with open(os.path.join(old, name)) as f:
            text = f.read()
        assert text.count(before) == 1
        with open(os.path.join(old, name), "w") as f:
            f.write(text.replace(before, after))
    back, _, meta = load_model(old, "cpu", "eval")
    ids = tokens(40)
    with torch.no_grad():
        assert meta["step"] == 3 and torch.equal(back(ids), ours(ids))
        model = load_hf(old)
        assert type(model).__name__ == "NanochatForCausalLM" and model.config.model_type == "nanochat"
        assert torch.equal(model(ids).logits, hf(ids).logits)


def test_shards_and_their_index_load(exports, tiny_tokenizer, tmp_path):
    ours, hf, _ = exports["full"]
    directory = str(tmp_path / "sharded")
    summary = export_hf(ours, tiny_tokenizer, directory, max_shard_bytes=parse_size("150KB"))
    shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    assert summary["shards"] == len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f)
    state = ours.state_dict()
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name in shards:
        with safe_open(os.path.join(directory, name), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())
            size = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert size <= 150_000 or len(list(f.keys())) == 1
    ids = tokens(70)
    with torch.no_grad():
        assert torch.equal(load_hf(directory)(ids).logits, hf(ids).logits)


def test_bf16_export_loads_close(exports, tiny_tokenizer, tmp_path):
    ours, _, _ = exports["full"]
    directory = str(tmp_path / "bf16")
    export_hf(ours, tiny_tokenizer, directory, dtype=torch.bfloat16)
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    hf = load_hf(directory)
    assert hf.dtype == torch.bfloat16
    deltas = max_logit_deltas(ours, hf, tokens(100), lengths=(1, 18, 100))
    print(f"\nmax |dlogits| bf16 vs our fp32: {deltas}")
    assert max(deltas.values()) < 0.1, deltas


def test_a_crash_leaves_nothing_and_force_replaces(exports, tiny_tokenizer, tmp_path, monkeypatch):
    ours, _, _ = exports["baseline"]
    out = tmp_path / "out"

    def crash(*args):
        raise KeyboardInterrupt("simulated crash")
    with monkeypatch.context() as m:
        m.setattr(hf_format, "save_hf_tokenizer", crash)
        with pytest.raises(KeyboardInterrupt):
            export_hf(ours, tiny_tokenizer, str(out))
    assert os.listdir(tmp_path) == []  # no export, no temp directory
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        export_hf(ours, tiny_tokenizer, str(out))
    assert os.listdir(out) == ["old.txt"]
    export_hf(ours, tiny_tokenizer, str(out), force=True)
    assert "old.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 mb") == 1_500_000
    assert parse_size("1234") == 1234
    for bad in ("lots", "0MB", "-1GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -----------------------------------------------------------------------------
# The command line

def test_cli_exports_a_checkpoint_end_to_end(tiny_tokenizer, tmp_path):
    root, out = tmp_path / "root", tmp_path / "hf"
    model = tiny_model(GPTConfig(**TINY), seed=3)
    save_checkpoint(str(root / "base_checkpoints" / "d4"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": asdict(model.config)})
    tiny_tokenizer.save(str(root / "tokenizer"))
    run = subprocess.run([sys.executable, "-m", "nanochat.export", "hf", "--source", "base", "--base-dir", str(root),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported base d4 step 5 to ") and " MB, " in lines[0]
    with open(out / "config.json") as f:
        assert json.load(f)["nanochat"] == {"source": "base", "model_tag": "d4", "step": 5}
    deltas = max_logit_deltas(model, load_hf(str(out)), tokens(70), lengths=(1, 70))
    assert max(deltas.values()) < 1e-4


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["hf", "--source", "pretrain", "--base-dir", str(tmp_path), "--out", str(tmp_path / "a")])
    assert "nanochat.export: error: --source 'pretrain' is not" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["hf", "--source", "base", "--base-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "b")])
    assert "no checkpoints found" in str(e.value.code)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["hf", "--source", "base", "--out", str(tmp_path / "c")])
    assert "is not empty; pass --force" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # argparse: the only format is hf
        main(["gguf", "--source", "base", "--out", str(tmp_path / "d")])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c"] and os.listdir(tmp_path / "c") == ["x"]


@pytest.mark.parametrize("era", ["current", "old"])
def test_cli_exports_nanochat_written_checkpoints(tiny_tokenizer, tmp_path, era):
    """Checkpoints as nanochat writes them (compiled-model prefixes, bf16 embeddings, a meta with only the classic
    keys): the current model, and an OLD-era one (VE gates over 32 channels) whose constants must reach config.json."""
    shapes = dict(window_pattern="SSSL") if era == "current" else \
        dict(window_pattern="SSSL", use_smear=False, use_backout=False, ve_gate_channels=32)
    model = tiny_model(GPTConfig(**{**TINY, **shapes}))
    _round_embeddings_to_bf16(model)
    config = {k: getattr(model.config, k) for k in NANOCHAT_KEYS}
    _write_nanochat_checkpoint(str(tmp_path / "base_checkpoints" / "d4"), 2, _nanochat_state_dict(model), config)
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    main(["hf", "--source", "base", "--base-dir", str(tmp_path), "--out", str(tmp_path / "hf")])
    with open(tmp_path / "hf" / "config.json") as f:
        exported = json.load(f)
    constants = ("ve_gate_channels", "ve_gate_scale", "rope_base", "qk_scale", "short_window", "use_smear")
    want = (12, 3.0, 100000.0, 1.2, 0, True) if era == "current" else (32, 2.0, 10000.0, 1.0, 32, False)
    assert tuple(exported[k] for k in constants) == want
    loaded, _, _ = load_model("base", "cpu", "eval", base_dir=str(tmp_path))
    deltas = max_logit_deltas(loaded, load_hf(str(tmp_path / "hf")), tokens(100), lengths=(1, 40, 100))
    assert max(deltas.values()) < 1e-4, deltas
