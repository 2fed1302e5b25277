"""Engine tests: KV cache, sampling, KV-cache generation == naive generation, tool use, calculator safety."""
import threading
import time

import pytest
import torch

from conftest import TINY_VOCAB, perturbed
from nanochat.engine import Engine, KVCache, sample_next_token, use_calculator
from nanochat.gpt import GPTConfig, build_model

SMALL = dict(sequence_len=256, vocab_size=TINY_VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(build_model(GPTConfig(**SMALL)), scale=0.2).eval()


def test_kv_cache_shapes_advance_reset_prefill():
    cache = KVCache(batch_size=3, num_heads=2, seq_len=16, head_dim=8, num_layers=4)
    assert cache.k_cache.shape == (4, 3, 16, 2, 8) and cache.get_pos() == 0
    cache.advance(5)
    assert cache.get_pos() == 5 and cache.cache_seqlens.tolist() == [5, 5, 5]
    cache.reset()
    assert cache.get_pos() == 0 and cache.prev_embedding is None
    one = KVCache(batch_size=1, num_heads=2, seq_len=6, head_dim=8, num_layers=4)
    k = torch.randn(1, 6, 2, 8)
    one.begin(6)
    for layer in range(4):
        one.insert(layer, k * layer, k * -layer)
    one.advance(6)
    one.prev_embedding = torch.randn(1, 1, 64)
    cache.prefill(one)
    assert cache.get_pos() == 6
    for layer in range(4):
        for row in range(3):
            torch.testing.assert_close(cache.k_cache[layer, row, :6], k[0] * layer)
            torch.testing.assert_close(cache.v_cache[layer, row, :6], k[0] * -layer)
    assert cache.prev_embedding.shape == (3, 1, 64)


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(batch_size=1, num_heads=1, seq_len=4, head_dim=2, num_layers=1)
    with pytest.raises(ValueError, match="overflow"):
        cache.begin(5)


def test_rows_at_different_positions_match_separate_runs(model):
    # continuous batching needs rows at different positions in one cache
    seqs = [torch.randint(0, TINY_VOCAB, (1, n)) for n in (7, 12)]
    refs = [model(s)[:, -1] for s in seqs]
    cache = KVCache.for_model(model, 2, 32)
    single = [KVCache.for_model(model, 1, 32) for _ in seqs]
    for c, s in zip(single, seqs):
        model(s[:, :-1], kv_cache=c)
    for layer in range(model.config.n_layer):  # assemble a 2-row cache from the two prefixes
        for row, c in enumerate(single):
            cache.k_cache[layer, row] = c.k_cache[layer, 0]
            cache.v_cache[layer, row] = c.v_cache[layer, 0]
    cache.cache_seqlens = torch.tensor([6, 11], dtype=torch.int32)
    cache.prev_embedding = torch.cat([c.prev_embedding for c in single])
    last = torch.cat([s[:, -1:] for s in seqs])
    out = model(last, kv_cache=cache)[:, -1]
    for row in range(2):
        torch.testing.assert_close(out[row], refs[row][0], rtol=1e-4, atol=1e-4)


def test_every_way_of_filling_the_cache_gives_the_plain_forwards_logits(model):
    """Each of KVCache's attention paths against the forward without a cache: a prompt from the start, chunks that
    continue the cache (masked; past the short window), single tokens, and rows at their own positions taking
    several tokens at once."""
    assert model.window_sizes[0] == 128  # S layers: chunks below reach past their window
    idx = torch.randint(0, TINY_VOCAB, (2, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(idx)
        cache = KVCache.for_model(model, 2, 200)
        bounds = [0, 100, 137, 138, 158, 159, 200]
        out = torch.cat([model(idx[:, a:b], kv_cache=cache) for a, b in zip(bounds, bounds[1:])], dim=1)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        cache = KVCache.for_model(model, 2, 200)  # row 0 continues at 150, row 1 at 140
        model(idx[:, :150], kv_cache=cache)
        cache.cache_seqlens = torch.tensor([150, 140], dtype=torch.int32)
        cache.prev_embedding = model.token_embedding(torch.stack([idx[0, 149:150], idx[1, 139:140]]))
        for n in (8, 1, 5):
            start = cache.cache_seqlens.tolist()
            got = model(torch.stack([idx[row, p:p + n] for row, p in enumerate(start)]), kv_cache=cache)
            for row, p in enumerate(start):
                torch.testing.assert_close(got[row], ref[row, p:p + n], rtol=1e-4, atol=1e-4)

def test_sample_next_token_modes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]]).repeat(64, 1)
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).flatten().tolist() == [1] * 64
    assert sample_next_token(logits, rng, 1.0, top_k=1).flatten().tolist() == [1] * 64
    assert sample_next_token(logits, rng, 1.0, top_p=0.01).flatten().tolist() == [1] * 64
    top2 = set(sample_next_token(logits, rng, 5.0, top_k=2).flatten().tolist())
    assert top2 <= {1, 3} and len(top2) == 2
    anything = set(sample_next_token(logits, rng, 10.0).flatten().tolist())
    assert len(anything) >= 3
    ties = torch.zeros(2, 40000)
    ties[0, [5, 30000]], ties[1, [39999, 7]] = 2.0, 3.0
    assert sample_next_token(ties, rng, temperature=0.0).flatten().tolist() == [5, 7]  # the first, as argmax


@pytest.mark.parametrize("cfg", [
    GPTConfig(**SMALL),
    GPTConfig.baseline(**SMALL),
    GPTConfig(**{**SMALL, "sequence_len": 512}),  # windows of 128: generation runs past the window
])
def test_engine_greedy_equals_naive_generate(cfg, tiny_tokenizer):
    torch.manual_seed(1)
    m = perturbed(build_model(cfg), scale=0.2).eval()
    with torch.no_grad():  # zero logits for special tokens, so greedy decoding never stops early
        m.lm_head.weight[min(tiny_tokenizer.encode_special(s) for s in tiny_tokenizer.get_special_tokens()):] = 0
    engine = Engine(m, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    n = 150 if cfg.sequence_len == 512 else 40  # 16 + 150 tokens crosses the 128-token window
    naive = list(m.generate(prompt, n, temperature=0.0))
    columns = [col[0] for col, _ in engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0)]
    assert columns == naive and len(columns) == n


def test_engine_batch_rows_sampling(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    first = next(engine.generate(prompt, num_samples=16, max_tokens=1, temperature=2.0))[0]
    assert len(first) == 16 and len(set(first)) > 1  # rows sample their first token independently
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=3)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=3)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=4)
    assert a == b and a != c
    g1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0, seed=1)
    g2, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0, seed=99)
    assert g1 == g2 and g1[0] == g1[1]
    for seq in a:
        assert seq[:len(prompt)] == prompt and len(prompt) <= len(seq) <= len(prompt) + 12


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script at each new position (logits one-hot), to drive the tool state machine."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.config = GPTConfig(sequence_len=128, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.register_buffer("cos", torch.zeros(1))
        self.fed = []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None, last_only=False):
        self.fed.append(ids.tolist())
        B, T = ids.shape
        logits = torch.full((B, T, self.vocab), -10.0)
        step = len(self.fed) - 1
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        kv_cache.advance(T)
        return logits[:, -1:] if last_only else logits


def test_calculator_tool_forces_output_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    expr = tok.encode("12*3")
    forced = [sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>")]
    # the model is still stepped while forced tokens are emitted; those samples (0) must be discarded
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), *[0] * len(forced), *tok.encode(" ok"),
              sp("<|assistant_end|>")]
    model = ScriptedModel(script, tok.get_vocab_size())
    prompt = [tok.get_bos_token_id(), sp("<|assistant_start|>")]
    seqs, masks = Engine(model, tok).generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0.0)
    gen, mask = seqs[0][len(prompt):], masks[0][len(prompt):]
    k = len(expr) + 2
    assert gen[:k] == [sp("<|python_start|>"), *expr, sp("<|python_end|>")] and mask[:k] == [1] * k
    assert gen[k:k + len(forced)] == forced and mask[k:k + len(forced)] == [0] * len(forced)
    assert tok.decode(gen).endswith("36<|output_end|> ok")  # sampling resumes after the forced block
    assert sp("<|assistant_end|>") not in gen  # generate_batch drops the terminal token


def test_hostile_tool_expression_injects_nothing(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>"),
              sp("<|assistant_end|>")]
    seqs, masks = Engine(ScriptedModel(script, tok.get_vocab_size()), tok).generate_batch(
        [tok.get_bos_token_id()], max_tokens=40, temperature=0.0)
    assert sp("<|output_start|>") not in seqs[0] and all(m == 1 for m in masks[0][1:])


@pytest.mark.parametrize("expr,expected", [
    ("1 + 2", 3), ("12*3", 36), ("7/2", 3.5), ("10/2", 5), ("(4+5)*(2-7)", -45), ("1,000 * 3", 3000),
    ("-3 + 0.5", -2.5), ("'strawberry'.count('r')", 3), ("\"banana\".count(\"a\")", 3), ("17 % 5", 2),
])
def test_calculator_arithmetic(expr, expected):
    assert use_calculator(expr) == expected


HOSTILE = [
    "__import__('os').system('echo hi')", "import os", "2**1000000", "9**9**9", "10**10", "'a'*10**9",
    "[x for x in range(10**9)]", "().__class__.__bases__", "open('/etc/passwd').read()", "exec('1')",
    "eval('1+1')", "lambda: 1", "'abc'.upper()", "'x'.count('x') * 99999999999999999999",
    "1/0", "(" * 500 + "1" + ")" * 500, "1+" * 5000 + "1", "globals()", "x", "", "1 if 1 else 2",
    "'a'.__len__()", "getattr(1, 'real')", "'abc'[0]", "999999999999999 * 999999999999999",
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_calculator_rejects_hostile_expressions(expr):
    assert use_calculator(expr) is None


def test_calculator_is_bounded_and_works_off_the_main_thread():
    results = {}

    def run():
        t0 = time.perf_counter()
        results["values"] = [use_calculator(e) for e in HOSTILE] + [use_calculator("6*7")]
        results["dt"] = time.perf_counter() - t0

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert results["values"][-1] == 42 and all(v is None for v in results["values"][:-1])


def bf16_copy(model, monkeypatch):
    """The same weights in a model built for bf16 compute (as on a GPU: bf16 embeddings and rotary tables, matrices
    cast to bf16 at use)."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    copy = build_model(model.config)
    copy.load_state_dict(model.state_dict())
    monkeypatch.delenv("NANOCHAT_DTYPE")
    assert copy.transformer.wte.weight.dtype == copy.cos.dtype == torch.bfloat16
    return copy.eval()


def test_bf16_decode_takes_the_same_greedy_tokens_as_fp32(model, tiny_tokenizer, monkeypatch):
    """bf16 picks fp32's greedy token wherever fp32's choice is decided (its top two logits more than NEAR_TIE
    apart; a random tiny model has near ties, where bf16's rounding may pick the other one), and the Engine's bf16
    decode follows fp32's up to the first near tie."""
    NEAR_TIE = 0.1  # logits: bf16 keeps ~3 significant digits of values up to the softcap (15)
    prompt = tiny_tokenizer.encode("The capital of France is", prepend="<|bos|>")
    fp32, _ = Engine(model, tiny_tokenizer).generate_batch(prompt, 2, max_tokens=24, temperature=0.0)
    half = bf16_copy(model, monkeypatch)
    bf16, _ = Engine(half, tiny_tokenizer).generate_batch(prompt, 2, max_tokens=24, temperature=0.0)
    assert len(fp32[0]) == len(prompt) + 24 and fp32[0] == fp32[1] and bf16[0] == bf16[1]
    with torch.no_grad():  # teacher-forced on fp32's tokens: each generated position's logits in both precisions
        ids = torch.tensor([fp32[0]])
        want, got = model(ids)[0, len(prompt) - 1:-1], half(ids)[0, len(prompt) - 1:-1].float()
    top2 = want.topk(2).values
    decided = top2[:, 0] - top2[:, 1] > NEAR_TIE
    picked = got.argmax(dim=-1)
    assert torch.equal(picked[decided], want.argmax(dim=-1)[decided])
    assert (want.max(dim=-1).values - want.gather(1, picked[:, None])[:, 0] <= NEAR_TIE).all()
    assert decided.sum() >= 12  # (most of the positions are decided: the check is not vacuous)
    first_tie = int(decided.logical_not().nonzero()[0]) if not decided.all() else len(decided)
    assert bf16[0][:len(prompt) + first_tie] == fp32[0][:len(prompt) + first_tie]
