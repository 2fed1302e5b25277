"""Checkpoint manager: round trips, crash safety, corruption detection, nanochat compatibility, resharding."""
import json
import math
import os
import socket
import uuid
from dataclasses import asdict

import fsspec
import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp

from conftest import reference_rms, reference_rope
from nanochat import checkpoint_manager as cm
from nanochat.checkpoint_manager import (CheckpointError, find_largest_model, find_last_step, list_steps,
                                         load_checkpoint, load_checkpoint_model, load_model, save_checkpoint)
from nanochat.gpt import GPT, GPTConfig, build_model

TINY = dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
NANOCHAT_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def make_model(seed=0, **overrides):
    """A tiny GPT with every weight random (init zeroes the projections, which would make comparisons weak)."""
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**TINY, **overrides}), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def idx():
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    return model(idx())


def save(model, checkpoint_dir, step, optimizer_data=None):
    meta = {"step": step, "model_config": asdict(model.config)}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer_data, meta)


def tmp_files(d):
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


# -----------------------------------------------------------------------------

def test_roundtrip_identical_logits(tmp_path):
    model = make_model()
    ckpt = tmp_path / "ckpt"
    save(model, str(ckpt), 7)
    assert sorted(os.listdir(ckpt)) == ["meta_000007.json", "model_000007.pt"]
    meta = json.loads((ckpt / "meta_000007.json").read_text())
    assert meta["world_size"] == 1 and set(meta["files"]) == {"model_000007.pt"}
    assert meta["files"]["model_000007.pt"]["size"] == os.path.getsize(ckpt / "model_000007.pt")
    loaded, tokenizer, meta2 = load_checkpoint_model(str(ckpt), 7, "cpu", "eval", base_dir=str(tmp_path))
    assert tokenizer is None and meta2["step"] == 7 and not loaded.training
    assert loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.transformer.wte.weight.dtype == torch.float32
    trained, _, _ = load_checkpoint_model(str(ckpt), 7, "cpu", "train", base_dir=str(tmp_path))
    assert trained.training
    other = make_model(seed=5)  # re-saving a step replaces it whole
    save(other, str(ckpt), 7)
    reloaded = load_checkpoint_model(str(ckpt), 7, "cpu", "eval", base_dir=str(tmp_path))[0]
    assert torch.equal(logits(reloaded), logits(other))


def test_meta_written_last_and_crash_keeps_previous(tmp_path, monkeypatch):
    model = make_model()
    ckpt = str(tmp_path)
    save(model, ckpt, 1)
    # crash between the model file and the meta: the step must not count
    real_write = cm._Dir.write

    def crash_on_meta(self, name, write_fn):
        if name.startswith("meta_"):
            raise KeyboardInterrupt("simulated crash")
        return real_write(self, name, write_fn)

    monkeypatch.setattr(cm._Dir, "write", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        save(model, ckpt, 2)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(ckpt, "model_000002.pt"))
    assert list_steps(ckpt) == [1] and find_last_step(ckpt) == 1
    # crash in the middle of writing a file: no temp file and no partial file left behind
    with pytest.raises(Exception):
        save_checkpoint(ckpt, 3, {"w": torch.zeros(3), "bad": lambda: None}, None, {"step": 3})
    assert not os.path.exists(os.path.join(ckpt, "model_000003.pt"))
    assert tmp_files(ckpt) == []
    assert torch.equal(logits(load_checkpoint_model(ckpt, 1, "cpu", "eval", base_dir=str(tmp_path))[0]), logits(model))
    with pytest.raises(FileNotFoundError):
        find_last_step(str(tmp_path / "empty"))


def test_corruption_detected_and_load_model_falls_back(tmp_path, caplog):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    m1 = make_model(seed=1)
    for step in (1, 2, 3):
        save(m1 if step == 1 else make_model(seed=step), str(ckpt), step)
    # step 3: truncated model file; step 2: one flipped byte (same size)
    p3 = ckpt / "model_000003.pt"
    p3.write_bytes(p3.read_bytes()[:-100])
    p2 = ckpt / "model_000002.pt"
    data = bytearray(p2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p2.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model_000003.pt.*truncated") as e3:
        load_checkpoint(str(ckpt), 3, "cpu")
    assert e3.value.path.endswith("model_000003.pt")
    with pytest.raises(CheckpointError, match="model_000002.pt.*corrupt"):
        load_checkpoint(str(ckpt), 2, "cpu")
    with caplog.at_level("WARNING", logger="nanochat"):
        model, _, meta = load_model("base", "cpu", "eval", base_dir=str(tmp_path))
    assert meta["step"] == 1
    assert torch.equal(logits(model), logits(m1))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model_000003.pt" in w for w in warnings) and any("model_000002.pt" in w for w in warnings)
    with pytest.raises(CheckpointError):  # an explicit step does not fall back
        load_model("base", "cpu", "eval", step=3, base_dir=str(tmp_path))
    # every step broken: the last error propagates
    p1 = ckpt / "model_000001.pt"
    p1.write_bytes(p1.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="model_000001.pt"):
        load_model("base", "cpu", "eval", base_dir=str(tmp_path))


def test_memory_filesystem_roundtrip(tmp_path):
    root = f"memory://ckpt-{uuid.uuid4().hex}"
    ckpt = f"{root}/base_checkpoints/d2"
    fs = fsspec.filesystem("memory")
    try:
        model = make_model()
        opt = {"format": "opaque", "state": {0: {"step": 3, "exp_avg": torch.randn(4, 5)}}}
        save(model, ckpt, 10, optimizer_data=opt)
        save(model, f"{root}/base_checkpoints/d10", 4)
        assert list_steps(ckpt) == [10] and find_last_step(ckpt) == 10
        assert find_largest_model(f"{root}/base_checkpoints") == "d10"
        model_data, opt_data, meta = load_checkpoint(ckpt, 10, "cpu", load_optimizer=True)
        assert meta["step"] == 10 and "optim_000010_rank0.pt" in meta["files"]
        assert torch.equal(opt_data["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
        loaded, _, _ = load_checkpoint_model(ckpt, 10, "cpu", "eval", base_dir=str(tmp_path))
        assert torch.equal(logits(loaded), logits(model))
        loaded, _, meta = load_model("base", "cpu", "eval", model_tag="d2", base_dir=root)
        assert meta["step"] == 10
        path = fs._strip_protocol(f"{ckpt}/model_000010.pt")
        data = bytearray(fs.cat_file(path))
        data[100] ^= 1
        fs.pipe_file(path, bytes(data))
        with pytest.raises(CheckpointError, match="model_000010.pt"):
            load_checkpoint(ckpt, 10, "cpu")
    finally:
        fs.rm(fs._strip_protocol(root), recursive=True)


def _nanochat_state_dict(model, drop=()):
    """The model's state dict as nanochat saves it from a compiled model: `_orig_mod.` prefixes, bf16 embeddings."""
    sd = {}
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        if k.startswith(("transformer.wte.", "value_embeds.")):
            v = v.to(torch.bfloat16)
        sd["_orig_mod." + k] = v.clone()
    return sd


def _write_nanochat_checkpoint(ckpt, step, state_dict, model_config):
    os.makedirs(ckpt, exist_ok=True)
    torch.save(state_dict, os.path.join(ckpt, f"model_{step:06d}.pt"))
    with open(os.path.join(ckpt, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "val_bpb": 1.0, "model_config": model_config}, f, indent=2)


def _round_embeddings_to_bf16(model):
    with torch.no_grad():  # what survives nanochat's bf16 storage, so logits compare exactly after the upcast
        for name, p in model.named_parameters():
            if name.startswith(("transformer.wte.", "value_embeds.")):
                p.copy_(p.to(torch.bfloat16).float())


def test_load_nanochat_written_checkpoint(tmp_path):
    model = make_model(window_pattern="SL")
    _round_embeddings_to_bf16(model)
    ckpt = str(tmp_path / "d2")
    config = {k: getattr(model.config, k) for k in NANOCHAT_KEYS}
    _write_nanochat_checkpoint(ckpt, 5, _nanochat_state_dict(model), config)
    loaded, _, meta = load_checkpoint_model(ckpt, 5, "cpu", "eval", base_dir=str(tmp_path))
    assert "files" not in meta  # nothing to verify, still loads
    c = loaded.config
    assert (c.window_pattern, c.use_smear, c.use_backout, c.use_value_embeds, c.use_resid_lambdas) == \
        ("SL", True, True, True, True)
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(logits(loaded), logits(model))


def test_load_old_nanochat_checkpoint(tmp_path):
    # OLD nanochat: no smear/backout weights, meta without window_pattern (full attention)
    model = make_model(window_pattern="L", use_smear=False, use_backout=False)
    _round_embeddings_to_bf16(model)
    config = {k: getattr(model.config, k) for k in NANOCHAT_KEYS if k != "window_pattern"}
    ckpt = str(tmp_path / "old")
    _write_nanochat_checkpoint(ckpt, 1, _nanochat_state_dict(model), config)
    loaded, _, _ = load_checkpoint_model(ckpt, 1, "cpu", "eval", base_dir=str(tmp_path))
    c = loaded.config
    assert (c.window_pattern, c.use_smear, c.use_backout, c.use_value_embeds) == ("L", False, False, True)
    assert torch.equal(logits(loaded), logits(model))
    # even older (ORIG): no value embeds, no resid/x0 lambdas at all, RoPE base 10k, no QK scale
    ancient = make_model(window_pattern="L", use_smear=False, use_backout=False, use_value_embeds=False,
                         use_resid_lambdas=False, rope_base=10000.0, qk_scale=1.0)
    _round_embeddings_to_bf16(ancient)
    _write_nanochat_checkpoint(ckpt, 2, _nanochat_state_dict(ancient), config)
    loaded, _, _ = load_checkpoint_model(ckpt, 2, "cpu", "eval", base_dir=str(tmp_path))
    assert not loaded.config.use_value_embeds and not loaded.config.use_resid_lambdas
    assert (loaded.config.rope_base, loaded.config.qk_scale) == (10000.0, 1.0)
    assert torch.equal(logits(loaded), logits(ancient))
    # only x0_lambdas missing: patched to its no-op value (zeros)
    with torch.no_grad():
        model.x0_lambdas.zero_()
    _write_nanochat_checkpoint(ckpt, 3, _nanochat_state_dict(model, drop=("x0_lambdas",)), config)
    loaded, _, _ = load_checkpoint_model(ckpt, 3, "cpu", "eval", base_dir=str(tmp_path))
    assert loaded.config.use_resid_lambdas
    assert torch.equal(logits(loaded), logits(model))


def reference_old_forward(sd, cfg, idx):
    """nanochat's OLD-era forward, written out from the raw state dict: RoPE base 10k, QK-norm after
    rotary with no scale, value embeddings gated by 2*sigmoid over 32 channels, resid/x0 lambdas, short windows of
    T/2, softcap 15."""
    B, T = idx.shape
    L, H, Hkv, C = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    D = C // H
    rope, rms = reference_rope(T, D), reference_rms

    pattern = cfg["window_pattern"]
    windows = [cfg["sequence_len"] // 2 if pattern[i % len(pattern)] == "S" else cfg["sequence_len"] for i in range(L)]
    windows[-1] = cfg["sequence_len"]
    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    x = x0 = rms(sd["transformer.wte.weight"][idx])
    for i in range(L):
        w = {k.removeprefix(f"transformer.h.{i}."): v for k, v in sd.items() if k.startswith(f"transformer.h.{i}.")}
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ w["attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ w["attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ w["attn.c_v.weight"].T).view(B, T, Hkv, D)
        if f"value_embeds.{i}.weight" in sd:
            gate = 2 * torch.sigmoid(h[..., :32] @ w["attn.ve_gate.weight"].T)
            v = v + gate[..., None] * sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
        q, k = rms(rope(q)), rms(rope(k))
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        allowed = (cols <= rows) & (rows - cols <= windows[i])
        att = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, T, C)
        x = x + y @ w["attn.c_proj.weight"].T
        x = x + F.relu(rms(x) @ w["mlp.c_fc.weight"].T).square() @ w["mlp.c_proj.weight"].T
    logits = (rms(x) @ sd["lm_head.weight"].T)[..., :cfg["vocab_size"]]
    return 15 * torch.tanh(logits / 15)


def test_load_old_era_nanochat_checkpoint_matches_the_old_forward(tmp_path):
    """An OLD-era checkpoint (VE gates over 32 channels) loads with OLD's constants and gives OLD's logits."""
    old_shapes = dict(n_layer=4, window_pattern="SSSL", use_smear=False, use_backout=False, ve_gate_channels=32)
    sd = make_model(**old_shapes).state_dict()  # random weights of the OLD shapes
    config = {**TINY, "n_layer": 4, "window_pattern": "SSSL"}  # what an OLD meta file says, nothing more
    ckpt = str(tmp_path / "old_era")
    _write_nanochat_checkpoint(ckpt, 7, {"_orig_mod." + k: v for k, v in sd.items()}, config)
    loaded, _, _ = load_checkpoint_model(ckpt, 7, "cpu", "eval", base_dir=str(tmp_path))
    c = loaded.config
    assert (c.ve_gate_channels, c.ve_gate_scale, c.rope_base, c.qk_scale, c.short_window) == (32, 2.0, 10000.0, 1.0, 32)
    assert loaded.window_sizes == [32, 32, 32, 64]
    # past the short window, and past sequence_len (where OLD's L layers stop seeing the start too)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), reference_old_forward(sd, config, tokens), rtol=1e-4, atol=1e-4)


def _write_byte_tokenizer(base_dir):
    """A 265-token tokenizer (256 bytes + nanochat's 9 specials), no training needed."""
    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer
    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    RustBPETokenizer(enc, "<|bos|>").save(os.path.join(base_dir, "tokenizer"))


def test_tokenizer_vocab_checked(tmp_path):
    _write_byte_tokenizer(str(tmp_path))
    save(make_model(vocab_size=265), str(tmp_path / "ok"), 1)
    _, tokenizer, _ = load_checkpoint_model(str(tmp_path / "ok"), 1, "cpu", "eval", base_dir=str(tmp_path))
    assert tokenizer is not None and tokenizer.get_vocab_size() == 265
    save(make_model(), str(tmp_path / "bad"), 1)
    with pytest.raises(ValueError, match="vocab size 265.*300"):
        load_checkpoint_model(str(tmp_path / "bad"), 1, "cpu", "eval", base_dir=str(tmp_path))


def test_load_model_from_env_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    base = tmp_path / "base_checkpoints"
    save(make_model(seed=1), str(base / "d2"), 9)
    save(make_model(seed=2), str(base / "d10"), 1)
    want = make_model(seed=3)
    save(want, str(base / "d10"), 3)
    # a step whose meta never got written (crash) does not count
    torch.save(make_model(seed=4).state_dict(), base / "d10" / "model_000004.pt")
    os.makedirs(base / "d9")  # a bare directory with a smaller depth is ignored too
    model, _, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 3
    assert torch.equal(logits(model), logits(want))
    model, _, meta = load_model("base", "cpu", "eval", model_tag="d2")
    assert meta["step"] == 9
    with pytest.raises(FileNotFoundError):
        load_model("sft", "cpu", "eval")
    with pytest.raises(ValueError, match="source"):
        load_model("pretrain", "cpu", "eval")


def test_find_largest_model_falls_back_to_mtime(tmp_path):
    for i, name in enumerate(["old_run", "new_run", "mid_run"]):
        os.makedirs(tmp_path / name)
        os.utime(tmp_path / name, (1000 + 10 * i * (name == "new_run"), 1000 + 100 * (name == "new_run")))
    assert find_largest_model(str(tmp_path)) == "new_run"
    os.makedirs(tmp_path / "d3")
    os.makedirs(tmp_path / "d12")
    assert find_largest_model(str(tmp_path)) == "d12"


# -----------------------------------------------------------------------------
# Resume on a different world size (2 gloo processes save, 1 process loads)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_save_worker(rank, world_size, port, ckpt):
    torch.set_num_threads(1)  # two processes share the test machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        # built directly on cpu: the meta-device path imports torch._dynamo, seconds per fresh process
        model = GPT(GPTConfig(**TINY))
        model.init_weights()
        opt = model.setup_optimizer()
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank, as in real training
        for _ in range(2):
            x = torch.randint(0, TINY["vocab_size"], (2, 16), generator=gen)
            model(x, x.roll(-1, 1)).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        save_checkpoint(ckpt, 2, model.state_dict(), opt.state_dict(),
                        {"step": 2, "model_config": asdict(model.config)}, rank=rank)
    finally:
        dist.destroy_process_group()


def test_optimizer_resharding_2_to_1(tmp_path):
    from nanochat.optim import consolidate_state_dicts
    ckpt = str(tmp_path / "d2")
    mp.spawn(_train_and_save_worker, args=(2, _free_port(), ckpt), nprocs=2, join=True)
    with open(os.path.join(ckpt, "meta_000002.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 2
    assert set(meta["files"]) == {"model_000002.pt", "optim_000002_rank0.pt", "optim_000002_rank1.pt"}
    shards = [torch.load(os.path.join(ckpt, f"optim_000002_rank{r}.pt"), weights_only=True) for r in range(2)]
    full = consolidate_state_dicts(shards, 2)

    model_data, opt_data, _ = load_checkpoint(ckpt, 2, "cpu", load_optimizer=True, rank=0, world_size=1)
    assert (opt_data["rank"], opt_data["world_size"]) == (0, 1)
    assert opt_data["state"].keys() == full["state"].keys() and len(full["state"]) > 0
    for i, entry in full["state"].items():
        for k, v in entry.items():
            assert torch.equal(opt_data["state"][i][k], v) if torch.is_tensor(v) else opt_data["state"][i][k] == v
    # the re-sharded state loads into a single-process optimizer for the same model
    model, _, _ = load_checkpoint_model(ckpt, 2, "cpu", "train", base_dir=str(tmp_path))
    opt = model.setup_optimizer()
    opt.load_state_dict(opt_data)
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    model(x, x).backward()
    opt.step()
    # same world size: the rank's own shard comes back untouched; a larger one is re-cut
    _, same, _ = load_checkpoint(ckpt, 2, "cpu", load_optimizer=True, rank=1, world_size=2)
    assert (same["rank"], same["world_size"]) == (1, 2)
    _, four, _ = load_checkpoint(ckpt, 2, "cpu", load_optimizer=True, rank=3, world_size=4)
    assert (four["rank"], four["world_size"]) == (3, 4)


def test_optimizer_missing_or_not_reshardable(tmp_path):
    model = make_model()
    save(model, str(tmp_path / "a"), 1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(str(tmp_path / "a"), 1, "cpu", load_optimizer=True)
    save(model, str(tmp_path / "b"), 1, optimizer_data={"state": {}, "param_groups": []})
    with pytest.raises(CheckpointError, match="cannot be re-sharded"):
        load_checkpoint(str(tmp_path / "b"), 1, "cpu", load_optimizer=True, rank=0, world_size=2)
