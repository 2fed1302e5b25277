"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk), the bulk of mid/SFT training data."""
from tasks.common import Task, load_split, validate_messages


class SmolTalk(Task):
    """SmolTalk(split='train', data_path=None, start=0, stop=None, step=1)
    split: 'train' (~460K) | 'test' (~24K). data_path None loads `HuggingFaceTB/smol-smoltalk` from the
    HuggingFace Hub; otherwise a data file or directory of rows shaped {"messages": [{role, content}, ...]}
    (e.g. nanochat/data/tasks/chat/*.jsonl.gz). Rows are shuffled with seed 42. Each example is validated when read:
    optional leading system message, then strictly alternating user/assistant, at least 2 of them, string
    contents; a bad row raises ValueError naming its index. Training data only: no evaluate()."""
    eval_type = "generative"

    def __init__(self, split="train", data_path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.ds = load_split("HuggingFaceTB/smol-smoltalk", "default", split, data_path, required=("messages",))

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        try:
            validate_messages(messages, allow_system=True)
        except ValueError as e:
            raise ValueError(f"SmolTalk {self.split} example {index}: {e}") from None
        return {"messages": messages}
