"""
nanochat's GPT for Hugging Face transformers. `python -m nanochat.export hf` copies this file into an export as
modeling_nanochat.py, so that

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

runs nanochat's architecture anywhere transformers (5.24's API: the `cache` argument) runs. It imports only torch and
transformers, never nanochat: an export must work without our code installed.

It is nanochat/gpt.py's forward written again (RoPE split halves, QK-norm times qk_scale, ReLU^2 MLP, softcap,
padded vocab, GQA, resid/x0 lambdas, gated value embeddings, smear, backout, every layer with a window), with its
module and parameter names, so the safetensors keys are our state-dict keys verbatim and weights move both ways with a
plain load_state_dict. Logits cover config.vocab_size (the padding rows are cut), after the softcap.

Windows: key j is visible from the query at position i iff j <= i and i - j <= the layer's window (S layers
short_window, L layers and the last one sequence_len), so past sequence_len tokens even L layers stop seeing the start.

The cache is transformers' DynamicCache, the one generate() makes: layer i holds layer i's keys and values (all of
them; windows are applied when attending). Smear mixes the previous token's normed embedding into each token's, which
a decode step of one token does not have: one more cache layer, index n_layer, keeps every position's normed
embedding (as its "keys", with empty values), so generate's cache operations (beam reordering, cropping, batch
expansion) keep it in step with the keys for free.

Padding: an attention_mask may pad on the left (batched generation): padded slots are invisible (to attention and
to smear), so a padded row computes what it would alone. Any other zeros in the mask are refused.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanochatConfig(PreTrainedConfig):
    """nanochat's GPTConfig under its own field names (nanochat reads config.json back by them), the padded vocabulary
    of the weights, and the names HF tooling looks for (hidden_size, num_hidden_layers, ...) as aliases. The model
    type is ours, not transformers' own "nanochat" (an older architecture): see nanochat/hf_format.py."""
    model_type = "nanochat_ray"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    use_resid_lambdas: bool = True
    use_value_embeds: bool = True
    use_smear: bool = True
    use_backout: bool = True
    qk_scale: float = 1.2
    rope_base: float = 100000.0
    softcap: float = 15.0
    ve_gate_channels: int = 12
    ve_gate_scale: float = 3.0
    short_window: int = 0
    padded_vocab_size: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per-layer window: S layers short_window (0: T/4 rounded up to a multiple of 128), L layers and the last
    layer sequence_len."""
    pattern, T = config.window_pattern.upper(), config.sequence_len
    short = config.short_window or math.ceil(T / 4 / 128) * 128
    sizes = [short if pattern[i % len(pattern)] == "S" else T for i in range(config.n_layer)]
    sizes[-1] = T
    return sizes


def apply_rotary_emb(x, cos, sin):
    """Split-halves rotation (not interleaved) of x (B, T, H, D) by cos/sin (1, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def plan_attention(past, T, window, k_valid, device):
    """(first key, mask, is_causal) for SDPA, for T new tokens after `past` cached ones; k_valid (B, past + T): the
    real (unpadded) slots, or None without padding. Without padding the common cases need no mask: a prompt within
    the window is plainly causal, a one-token decode step sees the last window + 1 keys."""
    if k_valid is None and past == 0 and T - 1 <= window:
        return 0, None, True
    if k_valid is None and T == 1:
        return max(0, past - window), None, False
    slots = torch.arange(past + T, device=device)
    diff = past + slots[:T, None] - slots[None, :]  # query position - key position, (T, past + T)
    mask = (diff >= 0) & (diff <= window)
    # padded keys are invisible; a padded query sees itself: some SDPA kernels make a fully masked row NaN, which
    # would reach real tokens through the pad's values (0 * NaN)
    if k_valid is not None:
        mask = (mask & k_valid[:, None, :]) | (diff == 0)
    return 0, mask.view(-1, 1, T, past + T), False


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        use_ve = config.use_value_embeds and has_ve(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if use_ve else None

    def forward(self, x, ve, cos, sin, plan, cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual with an input-dependent per-head gate in (0, gate scale)
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        key_start, mask, is_causal = plan
        y = F.scaled_dot_product_attention(q, k[:, :, key_start:], v[:, :, key_start:], attn_mask=mask,
                                           is_causal=is_causal, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, plan, cache):
        x = x + self.attn(norm(x), ve, cos, sin, plan, cache)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        V, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.use_resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if config.use_smear:
            self.smear_gate = nn.Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.use_backout:
            self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(V, kv_dim) for i in range(L) if config.use_value_embeds and has_ve(i, L)
        })
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def _padding(self, attention_mask, past, T):
        """(real slots (B, past + T), whether each new token has a real token before it (B, T)), or (None, None)
        without padding. Positions stay the slots': RoPE and the windows see only their differences, so where a
        left-padded row starts changes nothing."""
        if attention_mask is None or bool(attention_mask.all()):
            return None, None
        if attention_mask.dim() != 2 or attention_mask.size(1) != past + T:
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = (*, {past + T}), got "
                             f"{tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        if (valid[:, :-1] & ~valid[:, 1:]).any():
            raise ValueError("nanochat's model supports left padding only: attention_mask may have zeros only "
                             "before a row's first token")
        return valid, F.pad(valid, (1, 0))[:, past:past + T]  # is slot s - 1 a real token

    def _smear(self, x, cache, past, prev_valid):
        """x[t] += lambda * sigmoid(gate(x[t][:24])) * x[t-1]; before the first new token is the cached embedding of
        the previous position (or nothing: the first token of a sequence, or after padding, stays as it is)."""
        smear_layer = self.config.n_layer
        prev = torch.zeros_like(x[:, :1])
        if cache is not None:
            while len(cache.layers) <= smear_layer:  # a cache made from the config has the attention layers only
                cache.layers.append(DynamicLayer())
            if past > 0:
                prev = cache.layers[smear_layer].keys[:, 0, -1:]
            cache.update(x[:, None], x.new_empty(x.size(0), 1, x.size(1), 0), smear_layer)
        before = torch.cat([prev, x[:, :-1]], dim=1)
        if prev_valid is not None:
            before = before * prev_valid[..., None].to(x.dtype)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :24]))
        return x + gate * before

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        """Logits (B, T, vocab_size) after the softcap (the last logits_to_keep positions only, if > 0), the shifted
        cross-entropy with labels (-100 ignored), and the cache, extended by these tokens. kwargs: what generate
        passes besides (return_dict, output_attentions, ...), unused."""
        if input_ids is None:
            raise ValueError("nanochat's model needs input_ids (value embeddings look tokens up), not inputs_embeds")
        cfg = self.config
        T = input_ids.size(1)
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise TypeError(f"nanochat's model works with a DynamicCache (generate's default), not "
                            f"{type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        k_valid, prev_valid = self._padding(attention_mask, past, T)
        device = input_ids.device

        x = norm(self.transformer.wte(input_ids))
        D = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        freqs = torch.arange(past, past + T, dtype=torch.float32, device=device)[:, None] * inv_freq  # as our tables
        cos, sin = freqs.cos().to(x.dtype)[None, :, None], freqs.sin().to(x.dtype)[None, :, None]  # (1, T, 1, D/2)
        if cfg.use_smear:
            x = self._smear(x, cache, past, prev_valid)
        plans = {w: plan_attention(past, T, w, k_valid, device) for w in set(self.window_sizes)}

        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.use_resid_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, plans[self.window_sizes[i]], cache)
            if cfg.use_backout and i == cfg.n_layer // 2:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)[..., :cfg.vocab_size].float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
