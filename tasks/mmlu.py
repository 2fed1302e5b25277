"""MMLU: 4-way multiple choice over 57 subjects (cais/mmlu)."""
from tasks.common import Task, load_split, render_mc, shuffle_rows

LETTERS = ("A", "B", "C", "D")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


class MMLU(Task):
    """MMLU(subset, split, data_path=None, start=0, stop=None, step=1)
    subset 'all' with split 'test' | 'validation' | 'dev' | 'auxiliary_train', or subset 'auxiliary_train'
    with split 'train' (the Hub nests those rows in a 'train' column; unwrapped here), or a single subject
    name (a local file holding all subjects is then filtered to that subject).
    data_path None loads `cais/mmlu` from the HuggingFace Hub; otherwise a data file, or a directory holding
    `{split}.jsonl.gz` (etc.), e.g. nanochat/data/tasks/mmlu. Rows are shuffled with seed 42."""
    eval_type = "categorical"

    def __init__(self, subset, split, data_path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train") + SUBJECTS:
            raise ValueError(f"MMLU subset must be 'all', 'auxiliary_train' or a subject name, got {subset!r}")
        splits = ("train",) if subset == "auxiliary_train" else ("auxiliary_train", "validation", "dev", "test")
        if split not in splits:
            raise ValueError(f"MMLU split for subset {subset!r} must be one of {splits}, got {split!r}")
        self.subset, self.split = subset, split
        # auxiliary_train rows may be nested ({"train": {...}}), so fields are checked in get_example there
        required = () if "auxiliary_train" in (subset, split) else ("question", "choices", "answer")
        if subset in SUBJECTS and data_path is not None:
            rows = load_split("cais/mmlu", subset, split, data_path, shuffle_seed=None, required=required)
            self.ds = shuffle_rows([r for r in rows if r.get("subject") == subset])
        else:
            self.ds = load_split("cais/mmlu", subset, split, data_path, required=required)

    def get_example(self, index):
        row = self.ds[index]
        if isinstance(row.get("train"), dict):  # auxiliary_train on the Hub: {"train": {question, ...}}
            row = row["train"]
        try:
            question, choices, answer = row["question"], list(row["choices"]), int(row["answer"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"MMLU {self.subset}/{self.split} example {index} is malformed: {e!r}") from e
        if len(choices) != 4 or not 0 <= answer < 4:
            raise ValueError(f"MMLU {self.subset}/{self.split} example {index}: need 4 choices and answer 0-3")
        messages = [
            {"role": "user", "content": render_mc(question, LETTERS, choices)},
            {"role": "assistant", "content": LETTERS[answer]},
        ]
        return {"messages": messages, "subject": row.get("subject", ""), "letters": list(LETTERS)}

    def evaluate(self, conversation, response):
        return response == conversation["messages"][-1]["content"]

