"""
Grammar-constrained decoding on our tokenizer: what each installed grammar library costs per generated token.

For each library (llguidance, xgrammar, outlines-core: whichever import) and each schema, it measures
- tokenizer: one-off preparation of the tokenizer side (once per served model);
- compile: turning a JSON schema into a matcher the first time (a request with a new schema pays it);
- mask: computing the next-token mask into a preallocated int32 bitmask, per token (p50, p90, p99, mean in us), along
  two paths: `doc`, the tokens of a realistic JSON document (what a trained model would write), and `random`,
  tokens sampled from seeded random logits under the mask (a long, unusual path: mostly inside strings);
- advance: moving the matcher past the chosen token, per token.
Then serve/structured.py's own per-token cost (mask + unpacking + -inf into a padded logits row). (Footprint, not
measured here: llguidance and outlines-core are single wheels without dependencies; xgrammar requires torch,
transformers and triton.)

    python -m bench.bench_structured [--vocab-sizes 8192 65536] [--random-tokens 256] [--seeds 3] [--skip ...]

The tokenizers are trained here (a few seconds) on the shipped fallback corpus, Python's bundled documentation and
the standard library's sources (65536 merges need more text than the prose alone). Last line: one JSON object.
"""
import argparse
import gzip
import importlib
import json
import pathlib
import statistics
import sysconfig
import time

import pydoc_data.topics
import torch

from nanochat.dataset import FALLBACK_TRAIN, FALLBACK_VAL
from nanochat.tokenizer import RustBPETokenizer
from serve import structured

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "role": {"enum": ["admin", "editor", "viewer"]},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["customer", "items", "total"],
         "properties": {"customer": {"type": "object", "additionalProperties": False, "required": ["name", "email"],
                                     "properties": {"name": {"type": "string"}, "email": {"type": "string"}}},
                        "items": {"type": "array", "minItems": 1,
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["sku", "qty", "price"],
                                            "properties": {"sku": {"type": "string"},
                                                           "qty": {"type": "integer", "minimum": 1},
                                                           "price": {"type": "number"}}}},
                        "total": {"type": "number"}}}
ANY_OBJECT = {"type": "object"}
CASES = {  # schema, a document it accepts (written as json.dumps writes it: the separators all libraries allow)
    "person": (PERSON, {"name": "Elizabeth Bennet", "age": 20, "role": "editor",
                        "tags": ["second daughter", "lively", "walks to Netherfield in the mud"]}),
    "order": (ORDER, {"customer": {"name": "Captain Ahab", "email": "ahab@pequod.example"},
                      "items": [{"sku": "HARPOON-7", "qty": 3, "price": 129.5},
                                {"sku": "ROPE-100M", "qty": 12, "price": 8.25}], "total": 487.5}),
    "json_object": (ANY_OBJECT, {"title": "Moby Dick", "year": 1851, "chapters": 135,
                                 "characters": [{"name": "Ishmael", "role": "narrator"},
                                                {"name": "Queequeg", "role": "harpooneer"}],
                                 "whale": {"color": "white", "caught": False}, "notes": None}),
}


def training_text():
    docs = [json.loads(line)["text"] for path in (FALLBACK_TRAIN, FALLBACK_VAL) for line in gzip.open(path, "rt")]
    docs += list(pydoc_data.topics.topics.values())
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return docs + [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))]


class LLGuidance:
    name, module = "llguidance", "llguidance"

    def __init__(self, tokenizer, end_ids):
        import llguidance
        self.llg = llguidance
        enc = tokenizer.enc
        self.tok = llguidance.LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks,
                                                       special_tokens=enc._special_tokens, pattern=enc._pat_str,
                                                       eos_token=list(end_ids))

    def matcher(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False,
                                                                                 "item_separator": ", ",
                                                                                 "key_separator": ": "})
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m, bitmask):
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, m, token):
        assert m.consume_token(token), m.get_error()


class XGrammar:
    name, module = "xgrammar", "xgrammar"

    def __init__(self, tokenizer, end_ids):
        import xgrammar
        self.xgr = xgrammar
        V = tokenizer.get_vocab_size()
        specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
        # special tokens get an empty string: xgrammar then never allows them inside the grammar
        vocab = [b"" if i in specials else tokenizer.decode_single_token_bytes(i) for i in range(V)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=V, stop_token_ids=list(end_ids))
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def matcher(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask.view(1, -1))

    def advance(self, m, token):
        assert m.accept_token(token)


class OutlinesCore:
    name, module = "outlines-core", "outlines_core"

    def __init__(self, tokenizer, end_ids):
        import outlines_core
        self.oc = outlines_core
        specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
        tokens = {}
        for i in range(tokenizer.get_vocab_size()):
            if i not in specials:
                tokens.setdefault(tokenizer.decode_single_token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(min(end_ids), tokens)  # one end token: the Vocabulary takes one

    def matcher(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, m, token):
        m.advance(token, return_tokens=False)


def run_path(lib, schema, choose, vocab_size, max_tokens):
    """Walk one path: compile, then mask + choose + advance until choose says stop. Returns timings."""
    t0 = time.perf_counter()
    m = lib.matcher(schema)
    compile_s = time.perf_counter() - t0
    bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    mask_ns, advance_ns = [], []
    for step in range(max_tokens):
        t0 = time.perf_counter_ns()
        lib.fill(m, bitmask)
        mask_ns.append(time.perf_counter_ns() - t0)
        token = choose(step, structured.unpack_bitmask(bitmask, vocab_size))
        if token is None:
            break
        t0 = time.perf_counter_ns()
        lib.advance(m, token)
        advance_ns.append(time.perf_counter_ns() - t0)
    return compile_s, mask_ns, advance_ns


def follow(tokens, end_ids):
    def choose(step, allowed):
        if step == len(tokens):
            assert any(allowed[e] for e in end_ids), "the end token is not allowed after the whole document"
            return None
        assert allowed[tokens[step]], f"token {step} of the document is not allowed"
        return tokens[step]
    return choose


def sample(seed, end_ids):
    gen = torch.Generator().manual_seed(seed)

    def choose(step, allowed):
        logits = torch.randn(allowed.shape[0], generator=gen).masked_fill(~allowed, float("-inf"))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        return None if token in end_ids else token
    return choose


def summary(ns):
    """Per-token microseconds. On a shared box a few steps are preempted for milliseconds: the median and p90 are
    the stable figures, the mean and p99 show the tail."""
    us = sorted(x / 1000 for x in ns)

    def q(f):
        return round(us[min(len(us) - 1, int(len(us) * f))], 1)
    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": round(statistics.fmean(us), 1), "n": len(us)}


def module_cost(tokenizer, end_ids, schema, tokens, width, rounds):
    """serve/structured.py per token: fill the mask and apply it to a logits row (masked_fill -inf)."""
    grammar = structured.GrammarCompiler(tokenizer, end_ids=end_ids).compile_schema(schema)
    logits = torch.randn(width)
    ns = []
    for _ in range(rounds):
        matcher = grammar.matcher()
        for token in tokens:
            t0 = time.perf_counter_ns()
            matcher.apply(logits)
            ns.append(time.perf_counter_ns() - t0)
            matcher.advance(token)
    return summary(ns)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[8192, 65536],
                        help="tokenizer vocabularies to train and measure at (65536 is nanochat's)")
    parser.add_argument("--random-tokens", type=int, default=256, help="token budget of each random-logits path")
    parser.add_argument("--seeds", type=int, default=3, help="random-logits paths per schema")
    parser.add_argument("--rounds", type=int, default=5, help="walks of each document path (compile: the median)")
    parser.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar", "outlines-core"],
                        help="libraries to measure (those that do not import are reported as missing)")
    parser.add_argument("--skip", nargs="*", default=["outlines-core:json_object"],
                        help="LIBRARY:CASE pairs not to run (outlines-core builds a DFA index of the bounded-depth "
                             "any-object regex: about 40 s at an 8192 vocab on the 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    libraries = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}
    text = training_text()
    results = {}
    for vocab_size in args.vocab_sizes:
        t0 = time.perf_counter()
        tokenizer = RustBPETokenizer.train_from_iterator(iter(text), vocab_size)
        print(f"vocab {vocab_size}: tokenizer trained in {time.perf_counter() - t0:.1f}s")
        end_ids = [tokenizer.encode_special("<|assistant_end|>")]
        V = tokenizer.get_vocab_size()
        for name in args.libraries:
            try:
                importlib.import_module(libraries[name].module)  # import time (xgrammar: seconds) not counted
                t0 = time.perf_counter()
                lib = libraries[name](tokenizer, end_ids)
                tokenizer_s = time.perf_counter() - t0
            except ImportError as e:
                print(f"  {name}: not installed ({e})")
                results.setdefault(str(vocab_size), {})[name] = "not installed"
                continue
            row = {"tokenizer_s": round(tokenizer_s, 3)}
            for case, (schema, doc) in CASES.items():
                if f"{name}:{case}" in args.skip:
                    row[case] = "skipped"
                    continue
                tokens = tokenizer.encode(json.dumps(doc))
                compiles, mask_ns, advance_ns = [], [], []
                for _ in range(args.rounds):
                    c, m, a = run_path(lib, schema, follow(tokens, end_ids), V, len(tokens) + 1)
                    compiles.append(c)
                    mask_ns += m
                    advance_ns += a
                compile_s = statistics.median(compiles)
                rand_mask, rand_advance = [], []
                for seed in range(args.seeds):
                    _, m, a = run_path(lib, schema, sample(seed, end_ids), V, args.random_tokens)
                    rand_mask += m
                    rand_advance += a
                row[case] = {"compile_ms": round(compile_s * 1000, 1), "mask_doc_us": summary(mask_ns),
                             "mask_random_us": summary(rand_mask), "advance_us": summary(advance_ns + rand_advance)}
                doc_us, rand_us = row[case]["mask_doc_us"], row[case]["mask_random_us"]
                print(f"  {name:13s} {case:11s} compile {compile_s * 1000:8.1f} ms | mask/token p50 (p90) doc "
                      f"{doc_us['p50']:6.1f} ({doc_us['p90']:6.1f}) us, random {rand_us['p50']:6.1f} "
                      f"({rand_us['p90']:6.1f}) us | advance p50 {row[case]['advance_us']['p50']:5.1f} us")
            print(f"  {name:13s} tokenizer side {tokenizer_s * 1000:.0f} ms")
            results.setdefault(str(vocab_size), {})[name] = row
        width = (V + 63) // 64 * 64 + 64  # a padded logits row wider than the tokenizer
        schema, doc = CASES["order"]
        cost = module_cost(tokenizer, end_ids, schema, tokenizer.encode(json.dumps(doc)), width, args.rounds)
        print(f"  serve/structured.py: mask + apply to a {width}-wide logits row, p50 {cost['p50']:.1f} us/token "
              f"(p90 {cost['p90']:.1f})")
        results[str(vocab_size)]["serve.structured_apply_us"] = cost
    print(json.dumps(results))


if __name__ == "__main__":
    main()
