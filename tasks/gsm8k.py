"""GSM8K: grade-school math word problems, with the calculator annotations turned into tool calls."""
import re

from tasks.common import Task, load_split

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^<>]*>>)")  # the `<<expr=result>>` calculator annotations


def extract_answer(text):
    """The number after '#### ' (commas removed), or None if there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None


def answer_to_parts(answer):
    """Split a GSM8K worked answer into assistant parts: text, and for every `<<expr=result>>` a python part
    (expr) followed by a python_output part (result), so the model learns to call the calculator tool."""
    parts = []
    for piece in CALC_RE.split(answer):
        if CALC_RE.fullmatch(piece) and "=" in piece:
            expr, result = piece[2:-2].rsplit("=", 1)
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    """GSM8K(subset='main', split='train', data_path=None, start=0, stop=None, step=1)
    subset: 'main' | 'socratic'; split: 'train' | 'test'.
    data_path None loads `openai/gsm8k` from the HuggingFace Hub; otherwise a data file, or a directory
    holding `{split}.jsonl.gz` (etc.), e.g. nanochat/data/tasks/gsm8k. Rows are shuffled with seed 42.
    Generative: evaluate() compares the '#### N' numbers; reward() is that as a float (for RL)."""
    eval_type = "generative"

    def __init__(self, subset="main", split="train", data_path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_split("openai/gsm8k", subset, split, data_path, required=("question", "answer"))

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, response):
        """True iff the response's '#### N' equals the reference's (exact string match after removing commas)."""
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        content = conversation["messages"][-1]["content"]
        if isinstance(content, list):  # the final answer is in the last text part
            content = [p["text"] for p in content if p["type"] == "text"][-1]
        reference = extract_answer(content)
        predicted = extract_answer(response)
        return predicted is not None and predicted == reference
