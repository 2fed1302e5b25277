"""
GPT model, nanochat's current reference architecture:
- rotary embeddings (no positional embeddings), QK-norm after rotary with a QK scale
- RMSNorm without parameters, no biases, ReLU^2 MLP, untied embedding / lm_head, logit softcap, padded vocab
- GQA via n_kv_head
- newer pieces, each switchable in GPTConfig: per-layer residual/x0 scalars, gated value embeddings on
  alternating layers, sliding-window attention pattern, smear (previous-token mixing) and backout (subtract the
  mid-network residual). With all of them off (GPTConfig.baseline()) this is the seed's baseline model.
State-dict keys and shapes match nanochat's, so weights move both ways.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import cuda_runtime
from nanochat.common import get_compute_dtype
from nanochat.lm_loss import fused_loss_applies, lm_head_loss


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers, L = window of sequence_len, S = short window; last layer L
    # Newer architecture pieces (defaults = nanochat's current model). A nanochat meta file does not name these,
    # so the defaults must stay equal to nanochat's behaviour.
    use_resid_lambdas: bool = True  # x = resid_lambda[i] * x + x0_lambda[i] * x0 before each block
    use_value_embeds: bool = True  # gated value embeddings on alternating layers (last layer included)
    use_smear: bool = True  # mix the previous token's embedding into the current one
    use_backout: bool = True  # subtract the mid-network residual before the final norm
    qk_scale: float = 1.2  # multiply q and k after QK-norm (1.0 = off)
    rope_base: float = 100000.0
    softcap: float = 15.0
    # value-embedding gate: gate_scale * sigmoid(ve_gate(x[..., :gate_channels])); OLD nanochat used 2x on 32
    ve_gate_channels: int = 12
    ve_gate_scale: float = 3.0
    short_window: int = 0  # tokens of an S layer's window; 0 = T/4 rounded up to 128 (OLD nanochat used T/2)

    @classmethod
    def baseline(cls, **kwargs):
        """The seed's baseline: RoPE (base 10k), QK-norm, ReLU^2, GQA, untied, softcap; every newer piece off."""
        base = dict(window_pattern="L", use_resid_lambdas=False, use_value_embeds=False, use_smear=False,
                    use_backout=False, qk_scale=1.0, rope_base=10000.0)
        return cls(**{**base, **kwargs})

    @classmethod
    def from_depth(cls, depth, aspect_ratio=64, head_dim=128, **kwargs):
        """The single --depth dial: width = depth * aspect_ratio rounded up to a whole number of heads."""
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, **kwargs)

    @classmethod
    def from_dict(cls, d):
        """Build from a meta file's model_config; unknown keys are an error, missing keys take the defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**d)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # split-halves rotation (not interleaved); x is (B, T, H, D), cos/sin (B|1, T, 1, D/2) or (T, 1, D/2)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class Linear(nn.Linear):
    """Linear whose fp32 master weight is cast to the activation dtype: explicit mixed precision, no autocast."""

    def forward(self, x):
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(dtype=x.dtype))  # (a no-op .to still costs ~1 us)


# -----------------------------------------------------------------------------
# Attention. A key j is visible from a query at absolute position i iff j <= i and i - j <= window.

def attention_mask(q_pos, k_len, window):
    """Boolean mask (B|1, 1, Tq, k_len) for queries at absolute positions q_pos (B|1, Tq). With a KV cache, slots
    past a row's own position are never visible, so stale or empty cache entries need no extra masking."""
    diff = q_pos[:, :, None] - torch.arange(k_len, device=q_pos.device)[None, None, :]
    return ((diff >= 0) & (diff <= window))[:, None]


def attention(q, k, v, mask=None, is_causal=False):
    """SDPA of q (B, Tq, Hq, D) over k, v (B, Tk, H, D) -> (B, Tq, Hq, D), GQA when H < Hq."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = cuda_runtime.attention(q, k, v, mask=mask, is_causal=is_causal, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def flex_wanted(idx, training):
    """FlexAttention for sliding windows only when training on CUDA: training shapes are fixed, while evals vary in
    length and would compile again for each. A dry run's fake device cannot run compiled kernels: it takes the masked
    path, which has the same shapes and saves no more for the backward."""
    return idx.is_cuda and training and cuda_runtime.faked() is None


_flex_cache = {}


def flex_sliding_window_attention(q, k, v, window):
    """CUDA fast path for sliding windows: FlexAttention with a block-sparse mask, never materializing T x T. q, k, v
    and the output laid out as attention()'s."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T = q.size(1)
    key = (T, window, q.device)
    if key not in _flex_cache:
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki <= window)
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
        _flex_cache[key] = (torch.compile(flex_attention, dynamic=False), block_mask)
    fn, block_mask = _flex_cache[key]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1)).transpose(1, 2)


class NoCache:
    """What a forward continues from, here nothing: training and evaluation, every row from position 0.

    Every cache has this interface (engine.KVCache: rows in step or each at its own position; paged_cache.PackedBatch:
    several requests' new tokens end to end in one row), so the forward has one path:
      begin(T) -> (positions, end): before a forward of T new tokens per row; the tokens' absolute positions (a slice
          when every row's are the same, else a (B|1, T) tensor) and one past the highest. The one host sync of a
          forward, if it has one, is here.
      attend(layer_idx, q, k, v, window) -> (B, T, Hq, D): store the new keys and values k, v (B, T, H, D) where
          they go, and attend each query over the keys it sees (its row's, within window).
      previous(x) -> (B, T, C), or None when every row starts here: each token's previous token in x (B, T, C) or,
          for a row's first, the one the cache kept; keeps each row's last for the next forward (smear).
      last_rows(x) -> (B, 1, ...): each row's last position.
      advance(T): after the forward, the rows hold their new tokens."""

    def __init__(self, flex):
        self.flex, self.masks = flex, {}

    def begin(self, T):
        return slice(0, T), T

    def attend(self, layer_idx, q, k, v, window):
        T = q.size(1)
        if T - 1 <= window:  # within the window: plain causal
            return attention(q, k, v, is_causal=True)
        if self.flex:
            return flex_sliding_window_attention(q, k, v, window)
        if window not in self.masks:  # one mask per window, shared by its layers
            self.masks[window] = attention_mask(torch.arange(T, device=q.device)[None], T, window)
        return attention(q, k, v, mask=self.masks[window])

    def previous(self, x):
        return None

    def last_rows(self, x):
        return x[:, -1:]

    def advance(self, T):
        pass


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head (GQA)"
        self.qk_scale = config.qk_scale
        C, D = config.n_embd, self.head_dim
        self.c_q = Linear(C, self.n_head * D, bias=False)
        self.c_k = Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = Linear(C, C, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        use_ve = config.use_value_embeds and has_ve(layer_idx, config.n_layer)
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if use_ve else None

    def forward(self, x, ve, cos_sin, window, cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual with an input-dependent per-head gate in (0, gate scale)
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale
        return self.c_proj(cache.attend(self.layer_idx, q, k, v, window).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, cache):
        x = x + self.attn(norm(x), ve, cos_sin, window, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        """Runs on the meta device in normal use: shapes only. Real values come from init_weights()."""
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        V = math.ceil(config.vocab_size / pad_vocab_size_to) * pad_vocab_size_to
        self.padded_vocab_size = V
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, V, bias=False)
        if config.use_resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.use_smear:
            self.smear_gate = Linear(24, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.use_backout:
            self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(V, kv_dim)
            for i in range(config.n_layer) if config.use_value_embeds and has_ve(i, config.n_layer)
        })
        # rotary tables over-computed 10x so eval prompts / long generations rarely need a rebuild
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _compute_window_sizes(config):
        """Per-layer left window: a query at position i sees keys i - window .. i. L layers (and the last layer)
        get sequence_len, S layers config.short_window, else T/4 rounded up to a multiple of 128. Every layer has a
        window, as nanochat's do: past sequence_len tokens, even L layers stop seeing the start."""
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= {"S", "L"}, f"window_pattern must use only S and L, got {pattern!r}"
        T = config.sequence_len
        short = config.short_window or math.ceil(T / 4 / 128) * 128
        sizes = [short if pattern[i % len(pattern)] == "S" else T for i in range(config.n_layer)]
        sizes[-1] = T
        return sizes

    def _precompute_rotary(self, seq_len, device=None):
        D = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        dtype = get_compute_dtype(torch.device(device).type if device is not None else "cpu")
        return freqs.cos().to(dtype), freqs.sin().to(dtype)  # (seq_len, D/2)

    @torch.no_grad()
    def init_weights(self):
        cfg = self.config
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # The random draws come in nanochat's order (blocks, smear gate, value embeddings, value-embedding gates),
        # so the same seed gives the same initial weights as nanochat.
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform bound with std 1/sqrt(C)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                torch.nn.init.uniform_(lin.weight, -s, s)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        if cfg.use_resid_lambdas:
            d = max(cfg.n_layer - 1, 1)  # stronger residual and more x0 early; in float64, rounded once, as nanochat
            self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / d for i in range(cfg.n_layer)]))
            self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / d for i in range(cfg.n_layer)]))
        if cfg.use_smear:
            torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            torch.nn.init.zeros_(self.smear_lambda)
        if cfg.use_backout:
            torch.nn.init.constant_(self.backout_lambda, 0.2)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        device = self.transformer.wte.weight.device
        self.cos, self.sin = self._precompute_rotary(self.rotary_seq_len, device)
        # embeddings live in the compute dtype (bf16 on GPU saves memory); fp16 keeps fp32 for the grad scaler
        dtype = get_compute_dtype(device.type)
        if dtype != torch.float16:  # (.data, not Module.to: also works on the fake tensors of a dry run)
            for p in [self.transformer.wte.weight, *self.value_embeds.parameters()]:
                p.data = p.data.to(dtype)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Sizing helpers

    def num_scaling_params(self):
        """Parameter counts by kind. Scaling params (Kaplan-style) = transformer matrices + lm_head."""
        wte = self.transformer.wte.weight.numel()
        ve = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        matrices = sum(p.numel() for p in self.transformer.h.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"wte": wte, "value_embeds": ve, "lm_head": lm_head, "transformer_matrices": matrices,
                "scalars": total - wte - ve - lm_head - matrices, "total": total,
                "scaling": matrices + lm_head}

    def estimate_flops(self):
        """Training FLOPs per token (fwd + bwd): 6 per matmul weight plus the attention score/value matmuls."""
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        cfg = self.config
        H, D, T = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.sequence_len
        attn = sum(12 * H * D * min(w, T) for w in self.window_sizes)
        return 6 * n_matmul + attn

    def setup_optimizer(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5):
        """MuonAdamW with nanochat's groups: Muon for every transformer.h matrix (grouped by shape), AdamW for
        embeddings, lm_head and scalars with lr scaled by (C/768)^-0.5."""
        from nanochat.optim import MuonAdamW
        scale = (self.config.n_embd / 768) ** -0.5
        adam = dict(kind="adamw", eps=1e-10)
        groups = [
            dict(adam, params=[self.lm_head.weight], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
            dict(adam, params=[self.transformer.wte.weight], lr=embedding_lr * scale, betas=(0.8, 0.995),
                 weight_decay=0.001),
        ]
        if len(self.value_embeds):
            groups.append(dict(adam, params=list(self.value_embeds.parameters()), lr=embedding_lr * scale * 0.5,
                               betas=(0.8, 0.995), weight_decay=0.01))
        if self.config.use_resid_lambdas:
            groups.append(dict(adam, params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95),
                               weight_decay=0.05))
            groups.append(dict(adam, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0))
        smear = [p for n, p in self.named_parameters() if n.split(".")[0] in ("smear_gate", "smear_lambda",
                                                                               "backout_lambda")]
        if smear:
            groups.append(dict(adam, params=smear, lr=0.2, betas=(0.8, 0.95), weight_decay=0.0))
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must belong to exactly one group"
        return MuonAdamW(groups)

    # -------------------------------------------------------------------------

    def _rotary(self, positions, end):
        """cos/sin of the tokens' absolute positions (a slice, or a (B|1, T) tensor), shaped to broadcast against
        (B, T, H, D/2); the tables grow when end (one past the highest position) passes them."""
        if end > self.cos.size(0):
            self.rotary_seq_len = end + 128
            self.cos, self.sin = self._precompute_rotary(self.rotary_seq_len, self.cos.device)
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)

    def _smear(self, x, cache):
        """x[t] += lambda * sigmoid(gate(x[t][:24])) * x[t-1]. Before a row's first token is the cache's embedding of
        the row's last token, or nothing (the first token of a sequence stays as it is)."""
        def gate(cur):
            return self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(cur[..., :24]))
        previous = cache.previous(x)  # normed, pre-smear embeddings
        if previous is None:  # the first token has nothing before it (and stays out of the gate's matmul)
            cur = x[:, 1:]
            return torch.cat([x[:, :1], cur + gate(cur) * x[:, :-1]], dim=1) if x.size(1) > 1 else x
        return x + gate(x) * previous

    def token_embedding(self, idx):
        """The normed input embedding of tokens (what smear mixes, and what a KV cache keeps of a row's last
        token)."""
        return norm(self.transformer.wte(idx).to(self.cos.dtype))

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """Logits (B, T, vocab), or the loss with targets. kv_cache: continue its rows (and extend them); a
        PackedBatch: idx is one row of its rows' new tokens end to end. last_only: logits at each row's last position
        only (B, 1, vocab; a PackedBatch's rows: R, 1, vocab), all that sampling needs. Every cache kind, and NoCache
        without one, takes the same path (see NoCache for their interface)."""
        T = idx.size(1)
        cfg = self.config
        cache = NoCache(flex_wanted(idx, self.training)) if kv_cache is None else kv_cache
        positions, end = cache.begin(T)  # (the one host sync of a forward, if any)
        cos_sin = self._rotary(positions, end)
        x = self.token_embedding(idx)
        if cfg.use_smear:
            x = self._smear(x, cache)

        x0 = x
        backout_layer = cfg.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.use_resid_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], cache)
            if cfg.use_backout and i == backout_layer:
                x_backout = x
        cache.advance(T)
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        if last_only:
            x = cache.last_rows(x)
        if targets is not None and fused_loss_applies(x, self.lm_head.weight, loss_reduction):
            return lm_head_loss(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), cfg.vocab_size,
                                cfg.softcap)
        logits = self.lm_head(x)[..., :cfg.vocab_size].float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive reference generation: batch 1, full re-forward every step. Yields token ids."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                next_id = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()


def build_model(config, device="cpu"):
    """Meta-device construction, then real storage on `device`, then init_weights()."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
