"""Chat eval: categorical predictions (letters only, padding-invariant, batch-aligned shards), generative pass@k,
sharding, ChatCORE, and the task registry on the shared data (skipped when absent)."""

import pytest
import torch

from conftest import SHARED_DATA, perturbed
from nanochat import chat_eval as ch
from nanochat.gpt import GPTConfig, build_model
from tasks.common import Task, render_mc

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (offline datasets) is absent")
TINY = dict(sequence_len=256, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(build_model(GPTConfig(**TINY), "cpu")).eval()


class ToyMC(Task):
    """Categorical toy task: problem i asks about i, with 2-5 choices (so letter sets differ) and answer i % n."""

    eval_type = "categorical"

    def num_examples(self):
        return 11

    def get_example(self, i):
        n = 2 + i % 4
        letters = list("ABCDE")[:n]
        question = "What is " + "the thing " * (i % 3) + f"number {i}?"  # prompts of different lengths: padding
        return {"messages": [{"role": "user", "content": render_mc(question, letters, [f"x{i}{j}" for j in range(n)])},
                             {"role": "assistant", "content": letters[i % n]}], "letters": letters}

    def evaluate(self, conversation, response):
        return response == conversation["messages"][-1]["content"]


class ToyGen(Task):
    """Generative toy task: correct iff the completion contains an 'e'."""

    eval_type = "generative"

    def num_examples(self):
        return 5

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": "hi"}]}

    def evaluate(self, conversation, response):
        return "e" in response


# -----------------------------------------------------------------------------
# Categorical

def test_categorical_matches_unpadded_forward(model, tiny_tokenizer):
    task = ToyMC()
    convs = [task[i] for i in range(6)]
    preds = ch.categorical_predictions(model, tiny_tokenizer, convs)
    for conv, pred in zip(convs, preds):
        ids = tiny_tokenizer.render_for_completion(conv)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letter_ids = [tiny_tokenizer.encode(x)[0] for x in conv["letters"]]
        assert pred == conv["letters"][logits[letter_ids].argmax().item()]  # always one of its own letters


def test_categorical_shards_on_batch_boundaries_give_identical_records(model, tiny_tokenizer):
    task = ToyMC()
    full = ch.evaluate_categorical(task, model, tiny_tokenizer, range(11), batch_size=4)
    assert [r["index"] for r in full] == list(range(11))
    assert all(set(r) == {"index", "prediction", "correct"} for r in full)
    shards = ch.shard_indices(11, 3, align=4)
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    pieces = [r for s in reversed(shards) for r in ch.evaluate_categorical(task, model, tiny_tokenizer, s, 4)]
    assert sorted(pieces, key=lambda r: r["index"]) == full
    acc, records = ch.run_chat_eval(task, model, tiny_tokenizer, max_problems=7, batch_size=4)
    assert records == full[:7] and acc == sum(r["correct"] for r in full[:7]) / 7


def test_letters_must_be_single_tokens(tiny_tokenizer):
    ids = ch.LetterIds(tiny_tokenizer)
    assert ids("A") == tiny_tokenizer.encode("A")[0]
    with pytest.raises(ValueError, match="exactly 1"):
        ids("not a letter at all")


# -----------------------------------------------------------------------------
# Generative

class FakeEngine:
    """Returns fixed completions (prompt + tokens), ignoring the model."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append((len(tokens), num_samples, kwargs))
        return [tokens + self.tokenizer.encode(t) for t in self.texts[:num_samples]], None


def test_pass_at_k_is_any_sample(tiny_tokenizer):
    task = ToyGen()
    engine = FakeEngine(tiny_tokenizer, ["no", "yes", "nah"])
    (rec,) = ch.evaluate_generative(task, None, tiny_tokenizer, [2], num_samples=3, max_new_tokens=7,
                                    temperature=0.5, top_k=9, engine=engine)
    assert rec == {"index": 2, "completions": ["no", "yes", "nah"], "outcomes": [False, True, False],
                   "correct": True}
    assert engine.calls[0][1:] == (3, {"max_tokens": 7, "temperature": 0.5, "top_k": 9})
    (rec,) = ch.evaluate_generative(task, None, tiny_tokenizer, [2], num_samples=1,
                                    engine=FakeEngine(tiny_tokenizer, ["no", "yes"]))
    assert rec["correct"] is False and rec["outcomes"] == [False]


def test_generative_results_do_not_depend_on_the_shard(model, tiny_tokenizer):
    task = ToyGen()
    kw = dict(num_samples=3, max_new_tokens=5, temperature=1.0, top_k=20)
    full = ch.evaluate_problems(task, model, tiny_tokenizer, range(5), **kw)
    assert [r["index"] for r in full] == list(range(5)) and all(len(r["completions"]) == 3 for r in full)
    assert len({c for r in full for c in r["completions"]}) > 1  # real sampling
    pieces = ch.evaluate_problems(task, model, tiny_tokenizer, [3, 4], **kw) + \
        ch.evaluate_problems(task, model, tiny_tokenizer, [0, 1, 2], **kw)
    assert sorted(pieces, key=lambda r: r["index"]) == full
    assert ch.accuracy(full) == sum(any(r["outcomes"]) for r in full) / 5


# -----------------------------------------------------------------------------
# Sharding, ChatCORE, registry

def test_shard_indices():
    for n, k, align in [(10, 3, 1), (11, 3, 4), (5, 10, 1), (8, 2, 8), (1, 4, 8)]:
        shards = ch.shard_indices(n, k, align)
        assert [i for s in shards for i in s] == list(range(n)) and len(shards) <= k
        assert all(s[0] % align == 0 for s in shards)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= align
    assert ch.shard_indices(0, 3) == []


def test_chatcore():
    assert ch.chatcore({"ARC-Easy": 0.25, "GSM8K": 0.5}) == pytest.approx(0.25)
    assert ch.chatcore({n: 1.0 for n in ch.TASK_NAMES}) == pytest.approx(1.0)
    assert ch.chatcore({"MMLU": 0.4, "ARC-Challenge": 0.1, "HumanEval": 0.2}) == pytest.approx((0.2 - 0.2 + 0.2) / 3)
    with pytest.raises(ValueError):
        ch.chatcore({"Jeopardy": 0.3})
    with pytest.raises(ValueError):
        ch.chatcore({})


def test_parse_task_names():
    assert ch.parse_task_names(None) == list(ch.TASK_NAMES) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K",
                                                                "HumanEval", "SpellingBee"]
    assert ch.parse_task_names("GSM8K|ARC-Easy") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(ValueError, match="unknown"):
        ch.parse_task_names("ARC-Easy|Nope")
    with pytest.raises(ValueError, match="unknown chat eval task"):
        ch.build_task("Nope")


def test_tasks_come_from_the_directory_given_not_the_environment(monkeypatch):
    """The entry point decides the task files and passes them down (to chat_eval's actors with their jobs): a
    process's own NANOCHAT_TASK_DATA is not consulted."""
    from nanochat.dataset import PACKAGE_TASK_DATA
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "/nonexistent/task/data")
    task = ch.build_task("GSM8K", PACKAGE_TASK_DATA)
    assert task.split == "test" and len(task) > 0 and task[0]["messages"]


@needs_shared
def test_registry_on_shared_data(model, tiny_tokenizer):
    tasks = {n: ch.build_task(n, str(SHARED_DATA)) for n in ch.TASK_NAMES}
    assert {n: t.eval_type for n, t in tasks.items()} == {
        "ARC-Easy": "categorical", "ARC-Challenge": "categorical", "MMLU": "categorical", "GSM8K": "generative",
        "HumanEval": "generative", "SpellingBee": "generative"}
    assert len(tasks["HumanEval"]) == 164 and len(tasks["SpellingBee"]) == 256
    assert tasks["ARC-Easy"].split == "test" and tasks["MMLU"].split == "test" and tasks["GSM8K"].split == "test"
    assert ch.num_problems(tasks["GSM8K"], 3) == 3 and ch.num_problems(tasks["GSM8K"]) == len(tasks["GSM8K"])
    for name in ("ARC-Easy", "MMLU"):  # real letters are single tokens; predictions come from them
        recs = ch.evaluate_problems(tasks[name], model, tiny_tokenizer, range(4), batch_size=2)
        assert all(r["prediction"] in tasks[name][r["index"]]["letters"] for r in recs)
