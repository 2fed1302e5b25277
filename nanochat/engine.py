"""
Inference engine: a preallocated KV cache, batched sampling, and the calculator tool.

Engine.generate prefills the prompt once (batch 1), copies the cache to `num_samples` rows, then decodes all rows
in parallel, streaming one column of tokens per step. Tool use: when a row emits <|python_end|>, the expression
since <|python_start|> is evaluated by a restricted calculator and `<|output_start|>result<|output_end|>` is forced
into that row (forced tokens carry mask 0, so training code can tell them from sampled ones).
"""
import ast
import math
import operator
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.gpt import attention, attention_mask


class KVCache:
    """Keys/values for every layer, laid out (L, B, T_max, H_kv, D) as in nanochat. Each row keeps its own
    position (cache_seqlens), so rows may sit at different positions (continuous batching). The forward uses it
    through the cache interface (gpt.NoCache states it)."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device="cpu", dtype=torch.float32):
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.span = (0, 0)  # host copy of (min, max) of cache_seqlens; None: unknown (read it from the device)
        self.prev_embedding = None  # (B, 1, C): last token's normed embedding, needed by smear during decode
        self.n_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, seq_len
        self.step = None  # this forward's (T, lo, hi, flat write index or None), set by begin()
        self.plans = {}  # window -> (first key, key stop, mask, is_causal) in this forward, shared by its layers
        self.queries = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer,
                   device=model.get_device(), dtype=model.cos.dtype)

    @property
    def cache_seqlens(self):
        return self._cache_seqlens

    @cache_seqlens.setter
    def cache_seqlens(self, value):  # set from outside: the host copy of the positions no longer holds
        self._cache_seqlens, self.span = value, None

    def position_range(self):
        """(lo, hi) of the rows' positions: kept on the host while every change goes through this class (the Engine
        never waits on the device for it), else read from the device."""
        if self.span is None:  # host sync (once, after positions were set from outside)
            self.span = tuple(int(p) for p in torch.aminmax(self.cache_seqlens))
        return self.span

    def get_pos(self):
        lo, hi = self.position_range()
        return lo if lo == hi else int(self.cache_seqlens[0])  # host sync: rows at different positions

    def begin(self, T):
        """Before a forward of T new tokens per row: a check that they fit, their positions (a slice when every row
        is at the same position, as in the Engine) and where insert() writes them (there a slice; else one flat
        index per new token)."""
        lo, hi = self.position_range()
        if hi + T > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {hi + T - 1} >= cache length {self.max_seq_len}")
        positions, flat = slice(lo, lo + T), None
        if lo != hi:  # a layer's rows are contiguous, in the cache and in a view of some of its rows
            positions = self.cache_seqlens.long()[:, None] + torch.arange(T, device=self.cache_seqlens.device)
            rows = torch.arange(self.batch_size, device=positions.device)[:, None]
            flat = (rows * self.max_seq_len + positions).view(-1)
        self.step, self.plans = (T, lo, hi, flat), {}
        self.queries = None if lo == hi else positions  # the queries' positions as a tensor, for masks
        return positions, hi + T

    def insert(self, layer_idx, k, v):
        """Write k, v (B, T, H, D) at each row's current position (as begin() set it); return the layer's keys and
        values."""
        T, lo, _, flat = self.step
        k_layer, v_layer = self.k_cache[layer_idx], self.v_cache[layer_idx]
        if flat is None:
            k_layer[:, lo:lo + T] = k
            v_layer[:, lo:lo + T] = v
        else:
            B, _, H, D = k.shape
            k_layer.view(-1, H, D).index_copy_(0, flat, k.reshape(B * T, H, D).to(k_layer.dtype))
            v_layer.view(-1, H, D).index_copy_(0, flat, v.reshape(B * T, H, D).to(v_layer.dtype))
        return k_layer, v_layer

    def attend(self, layer_idx, q, k, v, window):
        """Insert k, v; attention of q (B, T, Hq, D) over the keys of its row within window, this forward's
        included."""
        start, stop, mask, is_causal = self.plans[window] if window in self.plans else self._plan(window)
        k_layer, v_layer = self.insert(layer_idx, k, v)
        return attention(q, k_layer[:, start:stop], v_layer[:, start:stop], mask=mask, is_causal=is_causal)

    def _plan(self, window):
        """Which keys the layers of one window read in this forward, and how they mask them."""
        T, lo, hi, _ = self.step
        if lo == hi == 0 and T - 1 <= window:  # a prompt from the start, within the window: plain causal
            plan = (0, T, None, True)
        elif lo == hi and T == 1:  # decode, rows in step (the Engine): the window is a slice of the cache
            plan = (max(0, hi - window), hi + 1, None, False)
        else:  # a mask (slots past a row's own position are masked too)
            if self.queries is None:  # rows in step: their positions once per forward
                self.queries = torch.arange(lo, lo + T, device=self.cache_seqlens.device)[None]
            plan = (0, hi + T, attention_mask(self.queries, hi + T, window), False)
        self.plans[window] = plan
        return plan

    def previous(self, x):
        """Each token's previous token in x (B, T, C), the kept one before a row's first (None on a fresh cache);
        keeps each row's last."""
        prev, self.prev_embedding = self.prev_embedding, x[:, -1:]
        return None if prev is None else torch.cat([prev, x[:, :-1]], dim=1)

    def last_rows(self, x):
        """(B, T, ...) -> (B, 1, ...): every row's last position (rows here are never padded)."""
        return x[:, -1:]

    def advance(self, n):
        self._cache_seqlens += n
        lo, hi = self.position_range()
        self.span, self.step = (lo + n, hi + n), None

    def reset(self):
        self._cache_seqlens.zero_()
        self.span, self.prev_embedding, self.step = (0, 0), None, None

    def prefill(self, other):
        """Copy a (batch-1) cache into every row of this one."""
        assert other.n_layers == self.n_layers and other.k_cache.shape[3:] == self.k_cache.shape[3:]
        pos = other.get_pos()
        assert pos <= self.max_seq_len, f"prompt of {pos} tokens does not fit a cache of {self.max_seq_len}"
        self.k_cache[:, :, :pos] = other.k_cache[:, :1, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :1, :pos]
        self._cache_seqlens.fill_(pos)
        self.span = (pos, pos)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding[:1].expand(self.batch_size, -1, -1).clone()


# -----------------------------------------------------------------------------
# Calculator tool: a whitelisting evaluator over the AST instead of eval(). It runs fine off the main thread (no
# signals), and every operation is bounded, so no expression can hang or exhaust memory.

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_ABS = 10**15  # results beyond this are refused (no huge-integer blowups)
_MAX_STR = 10_000
_MAX_NODES = 100


def _calc_eval(node):
    if isinstance(node, ast.Expression):
        return _calc_eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        if isinstance(node.value, str) and len(node.value) > _MAX_STR:
            raise ValueError("string too long")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _calc_eval(node.left), _calc_eval(node.right)
        if not all(isinstance(x, (int, float)) for x in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, float) and not math.isfinite(result) or abs(result) > _MAX_ABS:
            raise ValueError("result out of range")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        operand = _calc_eval(node.operand)
        if not isinstance(operand, (int, float)):
            raise ValueError("unary op on non-number")
        return _UNOPS[type(node.op)](operand)
    # the one string operation allowed: 'text'.count('x') (used by SpellingBee)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        target, arg = _calc_eval(node.func.value), _calc_eval(node.args[0])
        if isinstance(target, str) and isinstance(arg, str):
            return target.count(arg)
    raise ValueError(f"disallowed expression: {type(node).__name__}")


def use_calculator(expr):
    """Evaluate a calculator expression from the model; None when it is not a safe, small arithmetic or
    str.count expression. Never raises, never hangs."""
    if not isinstance(expr, str) or len(expr) > 1000:
        return None
    expr = expr.replace(",", "")
    if "**" in expr or "__" in expr:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        if sum(1 for _ in ast.walk(tree)) > _MAX_NODES:
            return None
        result = _calc_eval(tree)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return result


# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Sample one token per row from logits (B, V) -> (B, 1). temperature 0 = argmax (the first of tied maxima),
    taken from max(): on a CPU, argmax over a 32K vocabulary costs ~3x as much."""
    if temperature == 0.0:
        return logits.max(dim=-1, keepdim=True).indices
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(F.softmax(vals, dim=-1), 1, generator=rng)
        return idx.gather(1, choice)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(probs, 1, generator=rng)
        return sorted_idx.gather(1, choice)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)


class ToolUse:
    """The calculator tool of one row, for the Engine and the serving scheduler alike: feed() every token the row
    takes; between <|python_start|> and <|python_end|> it collects the expression, and at the end queues
    <|output_start|>result<|output_end|>, which the row then takes (next_forced) instead of sampling."""

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.forced = deque()
        self.in_python, self.expr = False, []
        self.special = {special(s) for s in tokenizer.get_special_tokens()}
        self.readable = {self.python_start: b"<<", self.output_start: b"", self.output_end: b">>"}

    def next_forced(self):
        """The next token the tool forces into the row, or None (sample)."""
        return self.forced.popleft() if self.forced else None

    def feed(self, token):
        if token == self.python_start:
            self.in_python, self.expr = True, []
        elif token == self.python_end and self.in_python:
            self.in_python = False
            result = use_calculator(self.tokenizer.decode(self.expr))
            if result is not None:
                self.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
        elif self.in_python:
            self.expr.append(token)

    def shown_bytes(self, token, raw=False):
        """A token's bytes as text shown to people (call after feed): raw, the token as it is; else the calculator's
        use reads as an annotation, <<12*3=36>> (<<12*3>> when it gave no result), and other special tokens as
        nothing."""
        if raw or token not in self.special:
            return self.tokenizer.decode_single_token_bytes(token)
        if token == self.python_end:
            return b"=" if self.forced else b">>"
        return self.readable.get(token, b"")


class RowState:
    """Per-row decoding state of the Engine: tokens so far and the tool."""

    def __init__(self, tokens, tokenizer):
        self.current_tokens = list(tokens)
        self.tool = ToolUse(tokenizer)
        self.completed = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                 constraints=None):
        """Stream (token_column, mask_column) lists of length num_samples, one per decode step. constraints: one per
        row, or None: an object whose apply(logits_row) forbids tokens (to -inf, in place) before each sample and
        whose advance(token) takes the row's token after (constrained decoding, e.g. JSON under a schema)."""
        assert isinstance(tokens, list) and len(tokens) > 0 and isinstance(tokens[0], int)
        model, tok = self.model, self.tokenizer
        device = model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        stop_tokens = tok.turn_end_ids()

        # prefill once at batch 1, then fan the cache out to num_samples rows
        prefill_cache = KVCache.for_model(model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill_cache, last_only=True)[:, -1, :].expand(num_samples, -1)
        cache_len = len(tokens) + max_tokens if max_tokens is not None else model.config.sequence_len
        kv_cache = KVCache.for_model(model, num_samples, max(cache_len, len(tokens) + 1))
        kv_cache.prefill(prefill_cache)
        del prefill_cache

        rows = [RowState(tokens, tok) for _ in range(num_samples)]
        num_generated = 0
        while True:
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if all(r.completed for r in rows):
                break
            if kv_cache.get_pos() >= kv_cache.max_seq_len:
                break
            if constraints is not None:
                logits = logits.clone()  # (the first step's rows are one expanded row)
                for i, (row, constraint) in enumerate(zip(rows, constraints)):
                    if constraint is not None and not row.completed:
                        constraint.apply(logits[i])
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()  # the host sync
            column, masks = [], []
            for i, (row, sampled_token) in enumerate(zip(rows, sampled)):
                forced = row.tool.next_forced()
                token = sampled_token if forced is None else forced
                column.append(token)
                masks.append(1 if forced is None else 0)
                row.current_tokens.append(token)
                if constraints is not None and constraints[i] is not None and not row.completed and \
                        token not in stop_tokens:
                    constraints[i].advance(token)
                if token in stop_tokens:
                    row.completed = True
                row.tool.feed(token)
            yield column, masks
            num_generated += 1
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            logits = model(ids, kv_cache=kv_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: (sequences, masks), each a list of num_samples token lists including the prompt
        (mask 0) and excluding the terminating token."""
        stop_tokens = self.tokenizer.turn_end_ids()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks
