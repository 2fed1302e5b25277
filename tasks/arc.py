"""ARC (AI2 Reasoning Challenge), Easy and Challenge sets: grade-school science multiple choice."""
from tasks.common import Task, load_split, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    """ARC(subset, split, data_path=None, start=0, stop=None, step=1)
    subset: 'ARC-Easy' | 'ARC-Challenge'; split: 'train' | 'validation' | 'test'.
    data_path None loads `allenai/ai2_arc` from the HuggingFace Hub; otherwise a data file, or a directory
    holding `{split}.jsonl.gz` (etc.), e.g. nanochat/data/tasks/arc/ARC-Easy. Rows are shuffled with seed 42.
    Letters are the dataset's own choice labels (mostly A-D; some rows have 3 or 5 choices or labels 1-4)."""
    eval_type = "categorical"

    def __init__(self, subset, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_split("allenai/ai2_arc", subset, split, data_path,
                             required=("question", "choices", "answerKey"))

    def get_example(self, index):
        row = self.ds[index]
        letters, choices = list(row["choices"]["label"]), list(row["choices"]["text"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC {self.subset}/{self.split} example {index}: answer {answer!r} not in {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, choices)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, response):
        # categorical eval restricts the prediction to the letters, so this is a plain comparison
        return response == conversation["messages"][-1]["content"]
