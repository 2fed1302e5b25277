"""CustomJSON: your own conversations (e.g. the model's identity) from a JSONL file."""
import json
import os

from nanochat import storage
from tasks.common import Task, validate_messages


class CustomJSON(Task):
    """CustomJSON(filepath, missing_ok=False, start=0, stop=None, step=1)
    One conversation per line: a JSON array of {"role", "content"} messages, strictly alternating user /
    assistant starting with user, at least 2, string contents ({"messages": [...]} objects are accepted too).
    Every line is validated on load; errors name the file and line. A missing file raises FileNotFoundError,
    unless missing_ok=True: then a warning is printed and the task is empty (upstream nanochat's behaviour)."""
    eval_type = "generative"

    def __init__(self, filepath, missing_ok=False, **kwargs):
        super().__init__(**kwargs)
        self.filepath = os.fspath(filepath)  # a local path or a storage URI
        self.conversations = []
        if not storage.isfile(self.filepath):
            hint = (f"CustomJSON: conversations file not found: {self.filepath} (create it with one JSON array "
                    f"of {{role, content}} messages per line)")
            if not missing_ok:
                raise FileNotFoundError(hint)
            print(f"WARNING: {hint}; using 0 conversations")
            return
        for lineno, line in enumerate(storage.read_text(self.filepath).split("\n"), 1):
            if not line.strip():
                continue
            where = f"{self.filepath}:{lineno}"
            try:
                messages = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if isinstance(messages, dict) and "messages" in messages:
                messages = messages["messages"]
            try:
                validate_messages(messages, allow_system=False)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
