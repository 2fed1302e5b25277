"""Synthetic spelling tasks: small models see tokens, not letters, so they must learn to spell and count.

SpellingBee: "how many 'r' in 'strawberry'?", answered by spelling the word out, counting by hand, then
checking with a python tool call. SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".

Word list: by default the `english-words` PyPI package (its `web2` list, lowercase letters only, sorted:
234,450 words; no download). Upstream nanochat downloads dwyl's words_alpha.txt (370K words) instead; that
package does not ship it, so pass `words_path=` (words_alpha.txt, .txt.gz, or words_alpha.zip) to use it.
"""
import functools
import gzip
import random
import string
import zipfile
from pathlib import Path

from tasks.common import Task
from tasks.gsm8k import extract_answer

TEST_SEED_OFFSET = 10_000_000  # test examples use seeds far from the train ones, so the splits differ

# How users ask. {letter} and {word} are filled in (maybe quoted); a '?' is appended half of the time.
USER_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter}s are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "How many times does {letter} occur in the word {word}",
    "Count the number of {letter} in {word}",
    "Count how many times {letter} shows up in the word {word}",
    "What is the number of {letter} in {word}",
    "What's the count of the letter {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times do you see the letter {letter}",
    "Tell me how many {letter} the word {word} has",
    "How often does the letter {letter} appear in the word {word}",
    "Could you count the {letter}s in {word}",
    "Please count the letter {letter} in the word {word}",
    "Number of {letter} in {word}",
    "How many {letter} does {word} contain",
    "How many occurrences of {letter} are in {word}",
    "Find the number of times {letter} appears in {word}",
    "I need to know how many {letter} are in {word}",
    "Can you tell me how many times {letter} is in the word {word}",
    "Quick question: how many {letter} in {word}",
    "Spell out {word} and count the {letter}s",
    "Does {word} have any {letter}? How many",
    "Letter count: {letter} in {word}",
    "How many letter {letter} are there in the word {word}",
    "Give me the count of {letter} in {word}",
    "If you spell {word}, how many {letter} do you write",
    "How many {letter}'s does the word {word} have",
    "What number of times does {letter} appear in {word}",
    "Check how many {letter} are in the word {word}",
    # Spanish
    "¿Cuántas {letter} hay en la palabra {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Cuenta las {letter} en la palabra {word}",
    "¿Cuántas letras {letter} tiene {word}",
    # Chinese
    "单词 {word} 里有几个 {letter}",
    "{word} 这个词中字母 {letter} 出现了几次",
    "数一数 {word} 中有多少个 {letter}",
    "{word} 里面有多少个字母 {letter}",
    # Korean
    "{word}라는 단어에 {letter}가 몇 개 있나요",
    "{word}에서 글자 {letter}는 몇 번 나오나요",
    "{word}에 있는 {letter}의 개수를 세어 주세요",
    # French
    "Combien de {letter} y a-t-il dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Compte les {letter} dans le mot {word}",
    "Dans {word}, combien y a-t-il de lettres {letter}",
    # German
    "Wie viele {letter} hat das Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Zähle die {letter} im Wort {word}",
    # Japanese
    "{word} という単語に {letter} はいくつありますか",
    "{word} の中に文字 {letter} は何回出てきますか",
    "{word} に含まれる {letter} の数を数えてください",
]
QUOTES = ["", "'", '"']


@functools.lru_cache(maxsize=4)
def load_words(words_path=None):
    """The word list as a tuple. None: the `english-words` package's web2 list (lowercase, letters only,
    sorted because the package returns a set). Otherwise a .txt / .txt.gz (one word per line) or a .zip
    holding one .txt (e.g. words_alpha.zip)."""
    if words_path is None:
        try:
            from english_words import get_english_words_set
        except ImportError as e:
            raise ImportError("SpellingBee needs the `english-words` package (pip install english-words) "
                              "or a words_path= pointing at a word list such as words_alpha.txt") from e
        return tuple(sorted(get_english_words_set(["web2"], alpha=True, lower=True)))
    path = Path(words_path)
    if not path.is_file():
        raise FileNotFoundError(f"word list not found: {path}")
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                members = [n for n in zf.namelist() if n.endswith(".txt")]
                if len(members) != 1:
                    raise ValueError(f"expected exactly one .txt file in the zip, found {members}")
                text = zf.read(members[0]).decode("utf-8")
        elif path.name.endswith(".gz"):
            text = gzip.open(path, "rt", encoding="utf-8").read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read word list: {e}") from e
    words = tuple(w.strip().lower() for w in text.split() if w.strip())
    if not words:
        raise ValueError(f"{path}: word list is empty")
    return words


def _check_split(split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class SpellingBee(Task):
    """SpellingBee(size=1000, split='train', words_path=None, start=0, stop=None, step=1)
    `size` synthetic letter-counting problems; example i is fully determined by random.Random(i) (test split:
    Random(10_000_000 + i)). Generative: evaluate() compares the '#### N' answers like GSM8K."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", words_path=None, **kwargs):
        super().__init__(**kwargs)
        _check_split(split)
        self.size, self.split = size, split
        self.words = load_words(words_path)

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that 0 is a possible answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)

        template = rng.choice(USER_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(QUOTES), rng.choice(QUOTES)
        user = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user += "?"

        # manual pass: spell the word, walk its letters keeping a running count
        lines = [f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual "
                 f"approach first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\n"
                 f"Then count the occurrences of '{letter}':\n"]
        running = 0
        for i, c in enumerate(word, 1):
            if c == letter:
                running += 1
                lines.append(f"{i}:{c} hit! count={running}\n")
            else:
                lines.append(f"{i}:{c}\n")
        lines.append(f"\nThis gives us {running}.")
        parts = [
            {"type": "text", "text": "".join(lines)},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]
        return {"messages": messages}

    def evaluate(self, conversation, response):
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(response)
        return predicted is not None and predicted == reference


class SimpleSpelling(Task):
    """SimpleSpelling(size=1000, split='train', words_path=None, start=0, stop=None, step=1)
    "Spell the word: apple" -> "apple:a,p,p,l,e". Words come from the list shuffled with Random(42); example i
    draws with Random(i) (test: Random(10_000_000 + i)). evaluate() is an exact match of the spelling."""
    eval_type = "generative"

    def __init__(self, size=1000, split="train", words_path=None, **kwargs):
        super().__init__(**kwargs)
        _check_split(split)
        self.size, self.split = size, split
        words = list(load_words(words_path))
        random.Random(42).shuffle(words)
        self.words = words

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, response):
        return response.strip() == conversation["messages"][-1]["content"]
