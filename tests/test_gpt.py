"""Model tests: nanochat-compatible shapes and sizes, each architecture piece, the baseline, masks, dtypes."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import perturbed, reference_rms, reference_rope
from nanochat.gpt import GPT, GPTConfig, attention_mask, build_model, flex_sliding_window_attention

SMALL = dict(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture(autouse=True)
def seeded():
    """Inputs drawn from torch's global generator are the same on every run, whatever ran before."""
    torch.manual_seed(0)


def meta_model(**kw):
    with torch.device("meta"):
        return GPT(GPTConfig(**kw))


def test_default_config_is_nanochat_d12_with_its_state_dict():
    model = meta_model()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["transformer.wte.weight"] == (32768, 768)
    assert sd["lm_head.weight"] == (32768, 768)
    assert sd["transformer.h.0.attn.c_q.weight"] == (768, 768)
    assert sd["transformer.h.0.mlp.c_fc.weight"] == (3072, 768)
    assert sd["resid_lambdas"] == (12,) and sd["x0_lambdas"] == (12,)
    assert sd["smear_gate.weight"] == (1, 24) and sd["smear_lambda"] == (1,) and sd["backout_lambda"] == (1,)
    # value embeddings (and their gates) on odd layers for L=12, last layer included
    ve_layers = sorted(int(k.split(".")[1]) for k in sd if k.startswith("value_embeds."))
    assert ve_layers == [1, 3, 5, 7, 9, 11]
    assert sd["transformer.h.11.attn.ve_gate.weight"] == (6, 12)
    assert "transformer.h.10.attn.ve_gate.weight" not in sd
    assert model.window_sizes == [512, 512, 512, 2048] * 3  # S = T/4 (rounded up to 128), L = T
    # no rotary buffers in the checkpoint
    assert "cos" not in sd and "sin" not in sd


@pytest.mark.parametrize("cfg,expected,flops", [
    (dict(), dict(wte=25.2, value_embeds=151.0, lm_head=25.2, transformer_matrices=84.9, total=286.3), 7.60e8),
    (dict(n_layer=24, n_head=12, n_kv_head=12, n_embd=1536),
     dict(wte=50.3, value_embeds=604.0, lm_head=50.3, transformer_matrices=679.5, total=1384.1), 4.775e9),
])
def test_param_counts_and_flops_match_spec_table(cfg, expected, flops):
    model = meta_model(**cfg)
    counts = model.num_scaling_params()
    for key, millions in expected.items():
        assert round(counts[key] / 1e6, 1) == millions, key
    assert counts["scaling"] == counts["transformer_matrices"] + counts["lm_head"]
    assert model.estimate_flops() == pytest.approx(flops, rel=2e-3)


def test_vocab_padding_and_logit_crop():
    model = build_model(GPTConfig(**{**SMALL, "vocab_size": 301}))
    assert model.transformer.wte.weight.shape[0] == 320 and model.lm_head.weight.shape[0] == 320
    logits = model(torch.randint(0, 301, (2, 10)))
    assert logits.shape == (2, 10, 301)
    assert logits.abs().max() <= 15.0  # softcap


def test_meta_construction_and_init_weights():
    model = meta_model(**SMALL)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL))
    C = SMALL["n_embd"]
    s = math.sqrt(3) / math.sqrt(C)
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        assert block.attn.c_q.weight.abs().max() <= s
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.05)
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert torch.isfinite(model.cos).all() and model.cos.shape == (10 * 512, 8)


def nanochat_initial_state(config, seed):
    """nanochat's init_weights written out: its random draws in its order (wte, lm_head, per block q, k, v, c_fc,
    then the smear gate, the value embeddings in layer order, the value-embedding gates in layer order); zeros and
    constants draw nothing. The scalars as nanochat computes them, in float64 rounded once."""
    torch.manual_seed(seed)
    V = math.ceil(config.vocab_size / 64) * 64
    C, L = config.n_embd, config.n_layer
    kv_dim = config.n_kv_head * (C // config.n_head)
    s = 3**0.5 * C**-0.5
    state = {"transformer.wte.weight": torch.empty(V, C).normal_(0, 0.8),
             "lm_head.weight": torch.empty(V, C).normal_(0, 0.001)}
    for i in range(L):
        for name, rows in (("q", C), ("k", kv_dim), ("v", kv_dim)):
            state[f"transformer.h.{i}.attn.c_{name}.weight"] = torch.empty(rows, C).uniform_(-s, s)
        state[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.empty(4 * C, C).uniform_(-0.4 * s, 0.4 * s)
        state[f"transformer.h.{i}.attn.c_proj.weight"] = torch.zeros(C, C)
        state[f"transformer.h.{i}.mlp.c_proj.weight"] = torch.zeros(C, 4 * C)
    state["smear_gate.weight"] = torch.empty(1, 24).uniform_(0, 0.02)
    with_ve = [i for i in range(L) if i % 2 == (L - 1) % 2]  # alternating layers, the last included
    for i in with_ve:
        state[f"value_embeds.{i}.weight"] = torch.empty(V, kv_dim).uniform_(-s, s)
    for i in with_ve:
        state[f"transformer.h.{i}.attn.ve_gate.weight"] = torch.empty(config.n_kv_head, 12).uniform_(0, 0.02)
    state["resid_lambdas"] = torch.tensor([1.15 - (0.10 * i / max(L - 1, 1)) for i in range(L)])
    state["x0_lambdas"] = torch.tensor([0.20 - (0.15 * i / max(L - 1, 1)) for i in range(L)])
    state["smear_lambda"], state["backout_lambda"] = torch.zeros(1), torch.full((1,), 0.2)
    return state


@pytest.mark.parametrize("config", [GPTConfig(**SMALL), GPTConfig.from_depth(3, vocab_size=301, sequence_len=64),
                                    GPTConfig(**{**SMALL, "n_kv_head": 1, "n_layer": 5})])
def test_same_seed_gives_nanochats_initial_weights(config):
    expected = nanochat_initial_state(config, seed=42)
    torch.manual_seed(42)
    ours = build_model(config).state_dict()
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_each_piece_can_be_turned_off():
    full = set(meta_model(**SMALL).state_dict())
    cases = {
        "use_resid_lambdas": {"resid_lambdas", "x0_lambdas"},
        "use_smear": {"smear_gate.weight", "smear_lambda"},
        "use_backout": {"backout_lambda"},
        "use_value_embeds": {k for k in full if k.startswith("value_embeds.") or "ve_gate" in k},
    }
    for flag, removed in cases.items():
        keys = set(meta_model(**SMALL, **{flag: False}).state_dict())
        assert keys == full - removed, flag
    assert build_model(GPTConfig(**SMALL, window_pattern="L")).window_sizes == [512] * 4


def reference_baseline_forward(model, idx):
    """An independent, plain implementation of the seed's baseline GPT, to pin down GPTConfig.baseline()."""
    cfg = model.config
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    rope, rms = reference_rope(T, D), reference_rms

    x = rms(model.transformer.wte.weight[idx])
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for blk in model.transformer.h:
        h = rms(x)
        q = rms(rope((h @ blk.attn.c_q.weight.T).view(B, T, H, D)))
        k = rms(rope((h @ blk.attn.c_k.weight.T).view(B, T, Hkv, D)))
        v = (h @ blk.attn.c_v.weight.T).view(B, T, Hkv, D)
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, -1)
        x = x + y @ blk.attn.c_proj.weight.T
        h = rms(x)
        x = x + F.relu(h @ blk.mlp.c_fc.weight.T).square() @ blk.mlp.c_proj.weight.T
    logits = rms(x) @ model.lm_head.weight.T
    return 15 * torch.tanh(logits[..., :cfg.vocab_size] / 15)


def test_baseline_is_exactly_the_seed_model():
    model = perturbed(build_model(GPTConfig.baseline(**SMALL)))
    assert set(model.state_dict()) == (
        {"transformer.wte.weight", "lm_head.weight"}
        | {f"transformer.h.{i}.{m}.weight" for i in range(4)
           for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")})
    idx = torch.randint(0, 300, (2, 33))
    torch.testing.assert_close(model(idx), reference_baseline_forward(model, idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [GPTConfig(**SMALL), GPTConfig.baseline(**SMALL)])
def test_causality(cfg):
    model = perturbed(build_model(cfg))
    idx = torch.randint(0, 300, (1, 40))
    idx2 = idx.clone()
    idx2[0, 25:] = (idx2[0, 25:] + 7) % 300
    a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_sliding_window_limits_context():
    model = perturbed(build_model(GPTConfig(**SMALL)))  # window 128 on layers 0-2, full on layer 3
    assert model.window_sizes == [128, 128, 128, 512]
    full = build_model(GPTConfig(**{**SMALL, "window_pattern": "L"}))
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, 300, (1, 200))
    a, b = model(idx), full(idx)
    torch.testing.assert_close(a[:, :129], b[:, :129])  # within the window nothing changes
    assert (a[:, 129:] - b[:, 129:]).abs().max() > 1e-3


def reference_nanochat_forward(model, idx):
    """nanochat's current GPT written out independently: smear, x0 / residual lambdas, gated value embeddings, QK
    norm and scale, backout, softcap, and its windows: every layer sees keys i - w .. i, with w = sequence_len for L
    layers and the last layer, and T/4 rounded up to 128 (or short_window) for S layers."""
    cfg = model.config
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    rope, rms = reference_rope(T, D, base=cfg.rope_base), reference_rms
    short = cfg.short_window or -(-cfg.sequence_len // 4 // 128) * 128
    windows = [short if cfg.window_pattern[i % len(cfg.window_pattern)] == "S" else cfg.sequence_len
               for i in range(cfg.n_layer)]
    windows[-1] = cfg.sequence_len
    gap = torch.arange(T)[:, None] - torch.arange(T)[None, :]

    x = rms(model.transformer.wte.weight[idx])
    gate = model.smear_lambda * torch.sigmoid(x[:, 1:, :24] @ model.smear_gate.weight.T)
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_half = x, None
    for i, blk in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        h = rms(x)
        q = (h @ blk.attn.c_q.weight.T).view(B, T, H, D)
        k = (h @ blk.attn.c_k.weight.T).view(B, T, Hkv, D)
        v = (h @ blk.attn.c_v.weight.T).view(B, T, Hkv, D)
        if str(i) in model.value_embeds:
            g = cfg.ve_gate_scale * torch.sigmoid(h[..., :cfg.ve_gate_channels] @ blk.attn.ve_gate.weight.T)
            v = v + g[..., None] * model.value_embeds[str(i)].weight[idx].view(B, T, Hkv, D)
        q, k = rms(rope(q)) * cfg.qk_scale, rms(rope(k)) * cfg.qk_scale
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        att = att.masked_fill(~((gap >= 0) & (gap <= windows[i])), float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, -1) @ blk.attn.c_proj.weight.T
        h = rms(x)
        x = x + F.relu(h @ blk.mlp.c_fc.weight.T).square() @ blk.mlp.c_proj.weight.T
        if i == cfg.n_layer // 2:
            x_half = x
    x = rms(x - model.backout_lambda * x_half)
    logits = x @ model.lm_head.weight.T
    return 15 * torch.tanh(logits[..., :cfg.vocab_size] / 15)


WINDOWED = dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL")


@pytest.mark.parametrize("short_window", [0, 64])  # today's T/4 rounded up to 128, and OLD nanochat's T/2 style
@pytest.mark.parametrize("length", [200, 256, 282, 768])  # below, at, 1.1x and 3x sequence_len
def test_windows_match_nanochat_at_every_length(length, short_window):
    """Past sequence_len an L layer stops seeing the start too (nanochat's window is sequence_len, not 'all'):
    the training forward and a KV-cache decode both give the reference logits."""
    from nanochat.engine import KVCache
    model = perturbed(build_model(GPTConfig(**WINDOWED, short_window=short_window)), scale=0.1).eval()
    assert model.window_sizes == [short_window or 128] * 3 + [256]
    idx = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = reference_nanochat_forward(model, idx)
        torch.testing.assert_close(model(idx), ref, rtol=1e-4, atol=1e-4)
        # KV cache: prefill most of it in one go, then decode the rest one token at a time
        cache = KVCache.for_model(model, 2, length)
        split = length - 24
        outs = [model(idx[:, :split], kv_cache=cache)]
        outs += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(split, length)]
        torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-4, atol=1e-4)


def test_attention_mask_semantics():
    m = attention_mask(torch.arange(6)[None], 6, 2)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == (j <= i and i - j <= 2)


def test_flex_attention_path_matches_masked_sdpa():
    # the CUDA fast path for sliding windows; FlexAttention also compiles on CPU, so it is checked here
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 256, 4, 16), torch.randn(1, 256, 2, 16), torch.randn(1, 256, 2, 16)
    y = flex_sliding_window_attention(q, k, v, 128)
    mask = attention_mask(torch.arange(256)[None], 256, 128)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(y, ref.transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_training_through_the_flex_path_matches_the_masked_path(monkeypatch):
    """What a CUDA training forward runs for S layers (FlexAttention), forced on CPU: the same loss. (FlexAttention
    has no backward on CPU; the kernels' gradients are the one part only a GPU run checks.)"""
    from nanochat import gpt
    model = perturbed(build_model(GPTConfig(**{**SMALL, "sequence_len": 256}))).train()
    idx, targets = torch.randint(0, 300, (2, 256)), torch.randint(0, 300, (2, 256))
    assert model.window_sizes[0] < 255  # the S layers do take the windowed path here
    losses = []
    for forced in (False, True):
        monkeypatch.setattr(gpt, "flex_wanted", lambda idx, training: forced and training)
        with torch.no_grad():
            losses.append(model(idx, targets, loss_reduction="none"))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)


def test_loss_reductions_and_ignore_index():
    model = perturbed(build_model(GPTConfig(**SMALL)))
    idx = torch.randint(0, 300, (2, 16))
    tgt = torch.randint(0, 300, (2, 16))
    per_token = model(idx, tgt, loss_reduction="none")
    assert per_token.shape == (32,)
    torch.testing.assert_close(model(idx, tgt), per_token.mean())
    tgt[:, :8] = -1
    masked = model(idx, tgt, loss_reduction="none")
    assert torch.all(masked.view(2, 16)[:, :8] == 0)
    torch.testing.assert_close(model(idx, tgt), masked.view(2, 16)[:, 8:].mean())


def test_backward_reaches_every_parameter():
    # no DDP: gradient sync happens in the optimizer, so every parameter must get a gradient on every step
    model = perturbed(build_model(GPTConfig(**SMALL)))
    idx = torch.randint(0, 300, (2, 16))
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_naive_generate_greedy_and_seeded():
    model = perturbed(build_model(GPTConfig(**SMALL)))
    prompt = [1, 2, 3, 4]
    greedy = list(model.generate(prompt, 8, temperature=0.0))
    assert greedy == list(model.generate(prompt, 8, temperature=0.0, seed=7))
    s1 = list(model.generate(prompt, 8, temperature=1.0, seed=1))
    assert s1 == list(model.generate(prompt, 8, temperature=1.0, seed=1))
    assert len(greedy) == 8 and all(0 <= t < 300 for t in s1)
    assert list(model.generate(prompt, 8, temperature=1.0, top_k=1)) == greedy


def test_compute_dtype_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    model = build_model(GPTConfig(**SMALL))
    assert model.transformer.wte.weight.dtype == torch.bfloat16 and model.cos.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32  # fp32 master weights, cast in forward
    logits = model(torch.randint(0, 300, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert build_model(GPTConfig(**SMALL)).transformer.wte.weight.dtype == torch.float32


def test_from_dict_rejects_unknown_keys_and_fills_defaults():
    cfg = GPTConfig.from_dict(dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                                   window_pattern="SSSL"))
    assert cfg.use_smear and cfg.qk_scale == 1.2
    with pytest.raises(ValueError, match="bogus"):
        GPTConfig.from_dict(dict(bogus=1))


@pytest.mark.parametrize("depth,n_embd,n_head", [(4, 256, 2), (12, 768, 6), (20, 1280, 10), (24, 1536, 12)])
def test_depth_dial(depth, n_embd, n_head):
    cfg = GPTConfig.from_depth(depth)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (depth, n_embd, n_head, n_head)
    assert cfg.n_embd // cfg.n_head == 128


def test_setup_optimizer_groups_follow_nanochat():
    model = build_model(GPTConfig(**{**SMALL, "n_embd": 192, "n_head": 3, "n_kv_head": 3}))
    opt = model.setup_optimizer(weight_decay=0.1)
    scale = (192 / 768) ** -0.5
    by_first = {id(g["params"][0]): g for g in opt.param_groups}
    assert by_first[id(model.lm_head.weight)]["lr"] == pytest.approx(0.008 * scale)
    assert by_first[id(model.transformer.wte.weight)]["lr"] == pytest.approx(0.3 * scale)
    assert by_first[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert {id(p) for g in muon for p in g["params"]} == {id(p) for p in model.transformer.h.parameters()}
    assert all(len({p.shape for p in g["params"]}) == 1 and g["weight_decay"] == 0.1 for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_plain_process_training_step_reduces_loss():
    # the nanochat core must train without Ray: this is how GPU benchmarks run
    torch.manual_seed(0)
    model = build_model(GPTConfig(**{**SMALL, "sequence_len": 64}))
    opt = model.setup_optimizer()
    data = torch.randint(0, 300, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(15):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
