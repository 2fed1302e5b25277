"""CORE: prompt rendering and answer spans for each task type, few-shot and shuffle seeds, per-example results (vs a
by-hand unpadded computation, deterministic), real shared task files, centering math, bundle loading and the
locked bundle download from a local HTTP server."""
import gzip
import http.server
import io
import json
import random
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA, perturbed
from nanochat import core_eval as ce
from nanochat.gpt import GPTConfig, build_model

SHARED_CORE = SHARED_DATA / "core"
needs_shared = pytest.mark.skipif(not SHARED_CORE.is_dir(), reason="../shared/data/core (CORE task files) is absent")
TINY = dict(sequence_len=256, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(build_model(GPTConfig(**TINY), "cpu")).eval()


class CharTokenizer:
    """One token per character, BOS = 0: spans can be checked by counting characters."""

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + [ord(c) for c in text]


# -----------------------------------------------------------------------------
# Rendering

def test_render_multiple_choice():
    shot = {"query": "Sky?", "choices": ["blue", "green"], "gold": 0}
    item = {"query": "Grass?", "choices": ["red", "green"], "gold": 1}
    assert ce.render_prompts_mc(item, "\nAnswer: ", [shot]) == [
        "Sky?\nAnswer: blue\n\nGrass?\nAnswer: red", "Sky?\nAnswer: blue\n\nGrass?\nAnswer: green"]
    assert ce.render_prompts_mc(item, " ") == ["Grass? red", "Grass? green"]


def test_render_schema():
    shot = {"context_options": ["Ann hid it because Ann", "Ann hid it because Bob"], "continuation": "was shy.",
            "gold": 1}
    item = {"context_options": ["Cat ate because cat", "Cat ate because dog"], "continuation": "was hungry.",
            "gold": 0}
    assert ce.render_prompts_schema(item, " ", [shot]) == [
        "Ann hid it because Bob was shy.\n\nCat ate because cat was hungry.",
        "Ann hid it because Bob was shy.\n\nCat ate because dog was hungry."]


def test_render_language_modeling():
    shot = {"context": "  2+2 =\n", "continuation": "4"}
    item = {"context": " 3+3 = ", "continuation": "6"}
    # contexts are trimmed; the prompt without the continuation is stripped (no dangling delimiter space)
    assert ce.render_prompts_lm(item, " ", [shot]) == ["2+2 = 4\n\n3+3 =", "2+2 = 4\n\n3+3 = 6"]
    assert ce.render_prompts_lm({"context": "Q: x", "continuation": "Paris"}, "\nAnswer: ") == [
        "Q: x\nAnswer:", "Q: x\nAnswer: Paris"]


# -----------------------------------------------------------------------------
# Spans

def test_common_length():
    assert ce.common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert ce.common_length([[1, 2, 3], [1, 2, 3]], "left") == 3
    assert ce.common_length([[9, 2, 3], [1, 8, 2, 3]], "right") == 2
    assert ce.common_length([[1], [2]], "right") == 0


def test_spans_per_task_type():
    tok = CharTokenizer()
    # MC: the span starts where the choices first differ (a shared answer start is not scored)
    tokens, starts, ends = ce.batch_sequences_mc(tok, ["Q: red apple", "Q: red pear"])
    assert tokens[0][0] == 0 and starts == [1 + len("Q: red ")] * 2 and ends == [13, 12]
    # schema: the span is the common suffix
    tokens, starts, ends = ce.batch_sequences_schema(tok, ["Ann was shy.", "Bobby was shy."])
    assert ends == [13, 15] and starts == [13 - len(" was shy."), 15 - len(" was shy.")]
    # LM: one sequence, the span is what the continuation added
    tokens, starts, ends = ce.batch_sequences_lm(tok, ["2+2 =", "2+2 = 4"])
    assert tokens == [[0] + [ord(c) for c in "2+2 = 4"]] and starts == [6] and ends == [8]
    with pytest.raises(AssertionError):
        ce.batch_sequences_lm(tok, ["2+2 =", "2+3 = 4"])


def test_spans_with_the_real_tokenizer(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    item = {"query": "The dog sleeps in the", "choices": ["sun.", "car.", "sun and rain."], "gold": 0}
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
    tokens, starts, ends = ce.prepare_example(tiny_tokenizer, [item], 0, meta)
    assert all(t[0] == bos for t in tokens) and ends == [len(t) for t in tokens]
    assert len({tuple(t[:starts[0]]) for t in tokens}) == 1  # the context is shared
    assert len({t[starts[0]] for t in tokens[:2]}) == 2  # and "sun."/"car." differ right at the span start
    lm = {"context": "What is 12*3?", "continuation": "36"}
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    (seq,), (s,), (e,) = ce.prepare_example(tiny_tokenizer, [lm], 0, meta)
    assert tiny_tokenizer.decode(seq[s:e]).strip() == "36" and seq[:s] == tiny_tokenizer.encode(
        "What is 12*3?", prepend=bos)


def test_stack_sequences_right_pads_with_bos():
    ids = ce.stack_sequences([[5, 6, 7], [5]], pad_token_id=9)
    assert ids.tolist() == [[5, 6, 7], [5, 9, 9]] and ids.dtype == torch.long


# -----------------------------------------------------------------------------
# Seeds

def test_fewshot_sampling_and_task_shuffle(tmp_path):
    picks = ce.fewshot_indices(50, 7, 10)
    assert picks == random.Random(1234 + 7).sample([i for i in range(50) if i != 7], 10)
    assert 7 not in picks and picks == ce.fewshot_indices(50, 7, 10)
    assert ce.fewshot_indices(50, 7, 0) == [] and sorted(ce.fewshot_indices(4, 0, 10)) == [1, 2, 3]
    rows = [{"i": i} for i in range(30)]
    plain, gz = tmp_path / "t.jsonl", tmp_path / "u.jsonl.gz"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    expected = list(rows)
    random.Random(1337).shuffle(expected)
    assert ce.load_task_data(str(plain)) == expected == ce.load_task_data(str(gz))
    assert ce.load_task_data(str(gz), max_per_task=5) == expected[:5]


# -----------------------------------------------------------------------------
# Per-example results

MC_DATA = [{"query": f"Item {i}: the colour is", "choices": ["red", "blue", "dark green"], "gold": i % 3}
           for i in range(6)]
SCHEMA_DATA = [{"context_options": [f"Ann {i} met Bob because Ann", f"Ann {i} met Bob because Bob"],
                "continuation": "was lonely.", "gold": i % 2} for i in range(6)]
LM_DATA = [{"context": f"The number after {i} is", "continuation": f" {i + 1}"} for i in range(6)]


def by_hand(model, tokenizer, data, idx, meta):
    """The same decision from unpadded, one-sequence-at-a-time forward passes."""
    tokens, starts, ends = ce.prepare_example(tokenizer, data, idx, meta)
    outs = []
    for t, s, e in zip(tokens, starts, ends):
        ids = torch.tensor([t])
        logits = model(ids)[0]
        if meta["task_type"] == "language_modeling":
            return bool((logits[s - 1:e - 1].argmax(-1) == ids[0, s:e]).all())
        outs.append(F.cross_entropy(logits[s - 1:e - 1], ids[0, s:e]).item())
    return min(range(len(outs)), key=outs.__getitem__) == data[idx]["gold"]


@pytest.mark.parametrize("task_type,data,k", [("multiple_choice", MC_DATA, 2), ("schema", SCHEMA_DATA, 1),
                                              ("language_modeling", LM_DATA, 3)])
def test_evaluate_example_matches_by_hand_and_is_deterministic(model, tiny_tokenizer, task_type, data, k):
    meta = {"task_type": task_type, "num_fewshot": k, "continuation_delimiter": " "}
    results = [ce.evaluate_example(model, tiny_tokenizer, data, i, meta, "cpu") for i in range(len(data))]
    assert all(isinstance(r, bool) for r in results)
    assert results == [ce.evaluate_example(model, tiny_tokenizer, data, i, meta, "cpu") for i in range(len(data))]
    assert results == [by_hand(model, tiny_tokenizer, data, i, meta) for i in range(len(data))]
    assert ce.evaluate_task(model, tiny_tokenizer, data, "cpu", meta) == pytest.approx(sum(results) / len(data))


def test_lm_exact_match_with_an_oracle_model(tiny_tokenizer):
    """A 'model' that predicts the true next token everywhere gets every LM example right; shifted by one, none."""
    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, ids):
            nxt = torch.roll(ids, -1, dims=1) + self.shift
            return F.one_hot(nxt % 320, 320).float() * 10
    meta = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": " "}
    assert ce.evaluate_task(Oracle(0), tiny_tokenizer, LM_DATA, "cpu", meta) == 1.0
    assert ce.evaluate_task(Oracle(1), tiny_tokenizer, LM_DATA, "cpu", meta) == 0.0


@needs_shared
def test_real_task_files(model, tiny_tokenizer):
    """A few examples of one task of each type (and a few-shot LM task) from the shared CORE files."""
    tasks = {t["label"]: t for t in ce.load_bundle(str(SHARED_CORE))}
    assert len(tasks) == 22
    assert {label for label, t in tasks.items() if t["data_path"] is None} == {
        "hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert tasks["arc_easy"]["random_baseline"] == 25 and tasks["boolq"]["random_baseline"] == 62
    assert tasks["copa"]["random_baseline"] == 50 and tasks["jeopardy"]["random_baseline"] == 0
    assert tasks["arc_easy"]["task_meta"] == {"task_type": "multiple_choice",
                                              "dataset_uri": "world_knowledge/arc_easy.jsonl", "num_fewshot": 10,
                                              "continuation_delimiter": "\nAnswer: "}
    assert tasks["copa"]["task_meta"]["continuation_delimiter"] == " "
    for label in ("copa", "openbook_qa", "winograd", "lambada_openai", "bigbench_operators"):
        task = tasks[label]
        data = ce.load_task_data(task["data_path"], max_per_task=4)
        results = [ce.evaluate_example(model, tiny_tokenizer, data, i, task["task_meta"], "cpu") for i in range(4)]
        assert ce.evaluate_task(model, tiny_tokenizer, data, "cpu", task["task_meta"]) == sum(results) / 4
    hs = [json.loads(line) for line in gzip.open(SHARED_CORE / "samples" / "hellaswag_small.jsonl.gz", "rt")]
    tokens, starts, ends = ce.prepare_example(tiny_tokenizer, hs, 0, {"task_type": "multiple_choice",
                                                                      "num_fewshot": 2, "continuation_delimiter": " "})
    assert len(tokens) == len(hs[0]["choices"]) and len(set(starts)) == 1 and all(s < e for s, e in zip(starts, ends))


# -----------------------------------------------------------------------------
# Parity with nanochat's evaluate_example on prompts longer than the model's context

REF_TEMPLATES = {  # nanochat renders its prompts with Jinja; these templates say the same thing
    "multiple_choice": "{% for ex in shots %}{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}\n\n{% endfor %}"
                       "{{ item.query }}{{ d }}{{ option }}",
    "schema": "{% for ex in shots %}{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}"
              "{{ option }}{{ d }}{{ item.continuation }}",
    "language_modeling": "{% for ex in shots %}{{ ex.context | trim }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}"
                         "{{ item.context | trim }}{{ d }}{% if full %}{{ item.continuation }}{% endif %}",
}


def reference_example(model, tokenizer, data, idx, meta):
    """nanochat's evaluate_example rules, written out: few-shot draw, Jinja prompts, spans from the common
    prefix / suffix, the left crop when the model exposes max_seq_len, BOS padding, nanochat's forward (the
    independent reference of test_gpt), lowest mean loss with Python's min/index tie-breaking."""
    from jinja2 import Template

    from test_gpt import reference_nanochat_forward
    item, kind, d = data[idx], meta["task_type"], meta["continuation_delimiter"]
    shots = []
    if meta["num_fewshot"] > 0:
        pool = [i for i in range(len(data)) if i != idx]
        shots = [data[i] for i in random.Random(1234 + idx).sample(pool, meta["num_fewshot"])]
    template = Template(REF_TEMPLATES[kind])
    if kind == "language_modeling":
        prompts = [template.render(shots=shots, d=d, item=item, full=False).strip(),
                   template.render(shots=shots, d=d, item=item, full=True)]
    else:
        options = item["choices"] if kind == "multiple_choice" else item["context_options"]
        prompts = [template.render(shots=shots, d=d, item=item, option=o) for o in options]
    bos = tokenizer.get_bos_token_id()
    seqs = [[bos] + tokenizer.encode(p) for p in prompts]
    if kind == "language_modeling":
        spans, seqs = [(len(seqs[0]), len(seqs[1]))], seqs[1:]
    elif kind == "multiple_choice":
        start = next((i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1), min(map(len, seqs)))
        spans = [(start, len(s)) for s in seqs]
    else:
        tail = next((i for i in range(min(map(len, seqs))) if len({s[-1 - i] for s in seqs}) > 1),
                    min(map(len, seqs)))
        spans = [(len(s) - tail, len(s)) for s in seqs]
    limit = getattr(model, "max_seq_len", None)
    if limit is not None:
        cuts = [max(0, len(s) - limit) for s in seqs]
        spans = [(a - c, b - c) for (a, b), c in zip(spans, cuts)]
        seqs = [s[c:] for s, c in zip(seqs, cuts)]
    ids = torch.full((len(seqs), max(map(len, seqs))), bos, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    gpt = getattr(model, "inner", model)
    with torch.no_grad():
        logits = reference_nanochat_forward(gpt, ids)
    losses = F.cross_entropy(logits.transpose(1, 2)[:, :, :-1], ids[:, 1:], reduction="none")
    if kind == "language_modeling":
        a, b = spans[0]
        return bool((logits[0, a - 1:b - 1].argmax(-1) == ids[0, a:b]).all())
    means = [losses[i, a - 1:b - 1].mean().item() for i, (a, b) in enumerate(spans)]
    return means.index(min(means)) == item["gold"]


class CroppedModel(torch.nn.Module):
    """A model that says how long a sequence it takes (nanochat crops prompts from the left for such models)."""

    def __init__(self, inner, max_seq_len):
        super().__init__()
        self.inner, self.max_seq_len = inner, max_seq_len

    def forward(self, ids):
        return self.inner(ids)


WORDS = "red blue green quick brown fox jumps over lazy dog alpha beta gamma delta one two three".split()
LONG_MC = [{"query": f"Question {i}: which word follows {WORDS[i % 16]} {WORDS[(i * 7) % 16]}?",
            "choices": [WORDS[(i + j) % 16] for j in range(3)] + ([WORDS[i % 16]] if i % 5 == 0 else []),
            "gold": 3 if i % 5 == 0 else i % 3} for i in range(14)]  # every fifth: a tied pair (0 and 3)
LONG_SCHEMA = [{"context_options": [f"{WORDS[i % 16]} met {WORDS[(i + 3) % 16]} so", f"{WORDS[(i + 5) % 16]} left so"],
                "continuation": f"the {WORDS[(i * 3) % 16]} {WORDS[(i * 5) % 16]} stayed.", "gold": i % 2}
               for i in range(14)]
LONG_LM = [{"context": f"Count {i}: {' '.join(WORDS[(i + j) % 16] for j in range(4))} then ",
            "continuation": f"{WORDS[(i + 4) % 16]} {i}"} for i in range(14)]


@pytest.mark.parametrize("task_type,data,k,delimiter", [("multiple_choice", LONG_MC, 10, "\nAnswer: "),
                                                        ("schema", LONG_SCHEMA, 8, " "),
                                                        ("language_modeling", LONG_LM, 10, " ")])
@pytest.mark.parametrize("max_seq_len", [None, 96])  # no crop (our GPT, like nanochat's), and the left crop
def test_core_matches_nanochat_rules_past_the_context(tiny_tokenizer, task_type, data, k, delimiter, max_seq_len):
    from test_gpt import WINDOWED
    config = GPTConfig(**{**WINDOWED, "sequence_len": 64, "vocab_size": 320, "short_window": 16})
    gpt = perturbed(build_model(config), scale=0.1).eval()
    model = gpt if max_seq_len is None else CroppedModel(gpt, max_seq_len)
    meta = {"task_type": task_type, "num_fewshot": k, "continuation_delimiter": delimiter}
    tokens, _, _ = ce.prepare_example(tiny_tokenizer, data, 0, meta)
    assert min(map(len, tokens)) > 2 * config.sequence_len  # the few-shot prompts outgrow the context
    ours = [ce.evaluate_example(model, tiny_tokenizer, data, i, meta, "cpu") for i in range(len(data))]
    assert ours == [reference_example(model, tiny_tokenizer, data, i, meta) for i in range(len(data))]
    assert 0 < sum(ours) < len(data) or task_type == "language_modeling"  # decisions that can tell a difference


# -----------------------------------------------------------------------------
# Centering, CORE, CSV

def test_centering_and_core():
    assert ce.centered(0.5, 50) == 0.0 and ce.centered(1.0, 25) == 1.0
    assert ce.centered(0.25, 0) == 0.25 and ce.centered(0.2, 25) == pytest.approx(-1 / 15)
    assert ce.centered(0.81, 62) == pytest.approx(0.5)
    assert ce.core_metric({"a": 0.5, "b": 0.0, "c": 0.1}) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        ce.core_metric({})


def test_results_csv(tmp_path):
    path = tmp_path / "out" / "d2.csv"
    ce.write_results_csv(str(path), {"copa": 0.75, "jeopardy": 0.1}, {"copa": 0.5, "jeopardy": 0.1}, 0.3)
    assert path.read_text().splitlines() == ["Task,Accuracy,Centered", "copa,0.750000,0.500000",
                                             "jeopardy,0.100000,0.100000", "CORE,,0.300000"]


# -----------------------------------------------------------------------------
# Bundle: loading, download with a lock

def bundle_zip(tasks_missing=()):
    """A small eval_bundle.zip shaped like nanochat's (top-level eval_bundle/ directory)."""
    core_yaml = ("icl_tasks:\n"
                 "- {label: copa, dataset_uri: mc.jsonl, num_fewshot: [0], icl_task_type: multiple_choice}\n"
                 "- {label: lm, dataset_uri: sub/lm.jsonl, num_fewshot: [2], icl_task_type: language_modeling,\n"
                 "   continuation_delimiter: \"\\nAnswer: \"}\n"
                 "- {label: gone, dataset_uri: gone.jsonl, num_fewshot: [0], icl_task_type: schema}\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", core_yaml)
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Task Type,Random baseline\n"
                                                      "copa,multiple choice,50\nlm,language modeling,0\n"
                                                      "gone,schema,50\n")
        zf.writestr("eval_bundle/eval_data/mc.jsonl", "".join(json.dumps(r) + "\n" for r in MC_DATA))
        zf.writestr("eval_bundle/eval_data/sub/lm.jsonl", "".join(json.dumps(r) + "\n" for r in LM_DATA))
    return buf.getvalue()


@pytest.fixture
def http_server():
    """Serves {path: bytes} on 127.0.0.1, counting GETs per path."""
    files, hits = {}, {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, hits
    server.shutdown()
    server.server_close()


def test_download_bundle_once_under_a_lock(tmp_path, http_server, model, tiny_tokenizer):
    url, files, hits = http_server
    files["/eval_bundle.zip"] = bundle_zip()
    base = str(tmp_path / "storage")
    out = []
    threads = [threading.Thread(target=lambda: out.append(ce.download_eval_bundle(base, url + "/eval_bundle.zip")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bundle = str(tmp_path / "storage" / "eval_bundle")
    assert out == [bundle] * 3 and hits == {"/eval_bundle.zip": 1}  # concurrent callers: one download
    assert ce.download_eval_bundle(base, url + "/eval_bundle.zip") == bundle and hits["/eval_bundle.zip"] == 1
    assert sorted(p.name for p in Path(base).iterdir()) == ["eval_bundle", "eval_bundle.lock"]  # no temp leftovers

    tasks = ce.load_bundle(bundle)
    assert [t["label"] for t in tasks] == ["copa", "lm", "gone"] and tasks[2]["data_path"] is None
    assert tasks[1]["task_meta"]["continuation_delimiter"] == "\nAnswer: "
    res = ce.evaluate_model(model, tiny_tokenizer, "cpu", bundle_dir=bundle, max_per_task=5)
    assert res["missing"] == ["gone"] and set(res["results"]) == {"copa", "lm"}
    assert res["centered_results"]["copa"] == pytest.approx(ce.centered(res["results"]["copa"], 50))
    assert res["core_metric"] == pytest.approx(sum(res["centered_results"].values()) / 2)


def test_download_errors_are_clear(tmp_path, http_server):
    url, files, hits = http_server
    files["/bad.zip"] = b"this is not a zip"
    with pytest.raises(RuntimeError, match="not a valid zip"):
        ce.download_eval_bundle(str(tmp_path), url + "/bad.zip")
    assert not (tmp_path / "eval_bundle").exists()
    with pytest.raises(Exception, match="404"):
        ce.download_eval_bundle(str(tmp_path), url + "/missing.zip")
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        ce.load_bundle(str(tmp_path))
