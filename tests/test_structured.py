"""Structured outputs (serve/structured.py): sampling under a grammar matcher, from random logits or a tiny random
model, gives text that json.loads and jsonschema accept; bad schemas are clear errors; budgets, end tokens, padded
logits and batched bitmasks behave."""
import json

import jsonschema
import pytest
import torch

from conftest import perturbed
from nanochat.gpt import GPTConfig, build_model
from serve import structured

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "tags"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "role": {"enum": ["admin", "editor", "viewer"]},
                         "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 6}}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["customer", "items", "paid"],
         "$defs": {"item": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
         "properties": {"customer": {"type": "object", "additionalProperties": False, "required": ["name", "vip"],
                                     "properties": {"name": {"type": "string", "maxLength": 10},
                                                    "vip": {"type": "boolean"}}},
                        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"$ref": "#/$defs/item"}},
                        "paid": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1000}, {"type": "null"}]}}}
SEEDS = range(4)


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    return structured.GrammarCompiler(tiny_tokenizer)


def random_logits(seed, width):
    """Seeded N(0, 1) logits: a model that knows nothing."""
    gen = torch.Generator().manual_seed(seed)
    return lambda tokens: torch.randn(width, generator=gen)


def generate(matcher, next_logits, budget, seed=0):
    """Sample under the matcher until it takes an end token or the budget runs out: (token ids, ended)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(budget):
        logits = matcher.apply(next_logits(tokens))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        matcher.advance(token)
        if matcher.is_end(token):
            return tokens, True
        tokens.append(token)
    return tokens, False


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "nested-order"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_logits_sample_json_the_schema_accepts(compiler, tiny_tokenizer, schema, seed):
    matcher = compiler.compile_schema(schema).matcher()
    tokens, ended = generate(matcher, random_logits(seed, compiler.vocab_size), budget=600, seed=seed)
    assert ended and matcher.done and matcher.ended
    value = json.loads(tiny_tokenizer.decode(tokens))
    jsonschema.validate(value, schema)
    assert list(value) == list(schema["properties"])  # properties come in the schema's order


def test_tiny_random_model_writes_a_valid_object_through_padded_logits(tiny_tokenizer):
    """A real forward pass whose logits are wider than the tokenizer (vocab padded to 384): the padding never wins."""
    torch.manual_seed(0)
    V = tiny_tokenizer.get_vocab_size()
    model = perturbed(build_model(GPTConfig(sequence_len=256, vocab_size=V + 64, n_layer=2, n_head=2, n_kv_head=2,
                                            n_embd=32)), scale=0.5).eval()
    compiler = structured.GrammarCompiler(tiny_tokenizer)
    prompt = tiny_tokenizer.render_for_completion([{"role": "user", "content": "Who are you?"},
                                                   {"role": "assistant", "content": ""}])

    @torch.no_grad()
    def next_logits(tokens):
        return model(torch.tensor([prompt + tokens]))[0, -1]
    for seed in range(2):
        matcher = compiler.compile_schema(PERSON).matcher()
        tokens, ended = generate(matcher, next_logits, budget=200, seed=seed)
        assert ended and max(tokens) < V
        jsonschema.validate(json.loads(tiny_tokenizer.decode(tokens)), PERSON)


def test_json_object_mode_gives_a_json_object(compiler, tiny_tokenizer):
    grammar = compiler.compile_response_format({"type": "json_object"})
    objects = []
    for seed in SEEDS:
        matcher = grammar.matcher()
        tokens, ended = generate(matcher, random_logits(seed, compiler.vocab_size), budget=4000, seed=seed)
        assert ended
        objects.append(json.loads(tiny_tokenizer.decode(tokens)))
    assert all(isinstance(o, dict) for o in objects) and any(objects)  # not only {}


def test_json_schema_response_format(compiler, tiny_tokenizer):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    grammar = compiler.compile_response_format(response_format)
    assert grammar is compiler.compile_schema(PERSON)  # one compiled grammar per schema text
    tokens, ended = generate(grammar.matcher(), random_logits(0, compiler.vocab_size), budget=600)
    assert ended
    jsonschema.validate(json.loads(tiny_tokenizer.decode(tokens)), PERSON)
    assert compiler.compile_response_format({"type": "text"}) is None


def test_tool_arguments_are_an_object_from_an_empty_output(compiler, tiny_tokenizer):
    parameters = {"properties": {"city": {"type": "string", "maxLength": 8},
                                 "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
    grammar = compiler.compile_schema(parameters, object_only=True)
    tokens, ended = generate(grammar.matcher(), random_logits(1, compiler.vocab_size), budget=300, seed=1)
    args = json.loads(tiny_tokenizer.decode(tokens))
    assert ended and isinstance(args, dict)
    jsonschema.validate(args, parameters)
    with pytest.raises(structured.SchemaError, match="must describe an object.*'array'"):
        compiler.compile_schema({"type": "array"}, object_only=True)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}},
     "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a"}}},
     "regex parse error.*unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                     "maximum": 1}}}, "minimum.*greater than maximum"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                             "schema": {"type": "object", "if": {"type": "object"}}}},
     "Unimplemented keys.*if"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "must be a JSON object, got list"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"maximum": float("nan")}}}, "not plain JSON"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name must be a non-empty string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}}, "strict must be a boolean"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "xml"}, "must be 'text', 'json_object' or 'json_schema', got 'xml'"),
    ("json", "response_format must be an object, got str"),
])
def test_bad_response_formats_are_clear_errors(compiler, response_format, message):
    with pytest.raises(structured.SchemaError, match=message) as info:
        compiler.compile_response_format(response_format)
    assert isinstance(info.value, ValueError) and "<state>" not in str(info.value)


def test_non_strict_ignores_unimplemented_keywords(compiler, tiny_tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"],
              "additionalProperties": False, "if": {"required": ["n"]}, "then": {}}
    grammar = compiler.compile_response_format({"type": "json_schema",
                                                "json_schema": {"name": "loose", "schema": schema}})
    tokens, ended = generate(grammar.matcher(), random_logits(0, compiler.vocab_size), budget=100)
    assert ended and json.loads(tiny_tokenizer.decode(tokens))["n"] <= 99


def test_budget_before_completion_is_not_done(compiler, tiny_tokenizer):
    matcher = compiler.compile_schema(PERSON).matcher()
    tokens, ended = generate(matcher, random_logits(0, compiler.vocab_size), budget=5)
    assert len(tokens) == 5 and not ended
    assert not matcher.done and not matcher.accepting and not matcher.ended
    with pytest.raises(json.JSONDecodeError):
        json.loads(tiny_tokenizer.decode(tokens))


def test_end_tokens_only_at_completion_and_no_other_special_tokens(compiler, tiny_tokenizer):
    specials = {tiny_tokenizer.encode_special(s) for s in tiny_tokenizer.get_special_tokens()}
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    matcher = compiler.compile_schema({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                       "required": ["ok"], "additionalProperties": False}).matcher()
    for token in tiny_tokenizer.encode('{"ok": true'):
        allowed = matcher.allowed()
        assert not allowed[list(specials)].any()  # not even the end token: the object is not complete
        matcher.advance(token)
    assert not matcher.done
    with pytest.raises(structured.GrammarViolation, match=f"token {end} is not allowed"):
        compiler.compile_schema(PERSON).matcher().advance(end)
    matcher.advance(tiny_tokenizer.encode("}")[0])
    assert matcher.done and matcher.accepting
    assert matcher.allowed().nonzero().flatten().tolist() == [end]
    matcher.advance(end)
    assert matcher.ended


def test_end_tokens_are_configurable(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    compiler = structured.grammar_compiler(tiny_tokenizer, end_ids=[bos])
    assert structured.grammar_compiler(tiny_tokenizer, end_ids=[bos]) is compiler  # tokenizer side built once
    matcher = compiler.compile_schema({"enum": ["yes", "no"]}).matcher()
    for token in tiny_tokenizer.encode('"no"'):
        matcher.advance(token)
    assert matcher.done and matcher.allowed().nonzero().flatten().tolist() == [bos]
    assert matcher.is_end(bos) and not matcher.is_end(tiny_tokenizer.encode_special("<|assistant_end|>"))


def test_apply_masks_padding_and_batched_bitmask_matches_rows(compiler, tiny_tokenizer):
    V = compiler.vocab_size
    width = V + 64
    a = compiler.compile_schema(PERSON).matcher()
    b = compiler.compile_schema({"type": "object"}).matcher()
    b.advance(tiny_tokenizer.encode("{")[0])
    logits = torch.randn(3, width)
    expected = logits.clone()
    a.apply(expected[0])
    b.apply(expected[1])
    assert torch.isinf(expected[:2, V:]).all() and torch.isfinite(expected[2]).all()
    assert torch.isfinite(expected[0]).sum() == a.allowed().sum() > 0
    bitmask = structured.allocate_bitmask(3, V)  # row 2 has no grammar: all allowed
    a.fill_bitmask(bitmask[0])
    b.fill_bitmask(bitmask[1])
    structured.apply_bitmask(logits, bitmask)
    assert torch.equal(logits[:2], expected[:2])
    assert torch.equal(logits[2, :V], expected[2, :V]) and torch.isinf(logits[2, V:]).all()
    with pytest.raises(ValueError, match="int32 CPU tensor"):
        a.fill_bitmask(torch.zeros(3, dtype=torch.int32))
    # the scheduler's way: the matchers of some rows of a batch, in one pass; the other rows untouched
    batch = torch.randn(4, width)
    expected = batch.clone()
    a.apply(expected[3])
    b.apply(expected[1])
    assert structured.mask_rows(batch, [3, 1], [a, b]) is batch
    assert torch.equal(batch, expected)
    low = torch.randn(3, width).to(torch.bfloat16)  # not numpy's: the masked_fill_ path (as on an accelerator)
    expected = low.float()
    structured.apply_bitmask(low, bitmask)
    structured.apply_bitmask(expected, bitmask)
    assert torch.equal(torch.isinf(low), torch.isinf(expected)) and torch.isinf(low).sum() > 0


def test_unpack_bitmask_bit_order():
    words = torch.tensor([[0b101 | -2**31, 1]], dtype=torch.int32)  # tokens 0, 2, 31 (the sign bit) and 32
    assert structured.unpack_bitmask(words, 70)[0].nonzero().flatten().tolist() == [0, 2, 31, 32]
    assert structured.unpack_bitmask(words, 3)[0].tolist() == [True, False, True]
    assert torch.equal(structured.forbidden_tokens(words, 70), ~structured.unpack_bitmask(words, 70))
