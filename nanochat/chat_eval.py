"""
Chat-model evaluation: the task registry, categorical and generative evaluation, pass@k, ChatCORE.

Two kinds of tasks:
- categorical (ARC-Easy, ARC-Challenge, MMLU): batches of prompts, one forward each; at a row's last prompt position
  the logits are restricted to the token ids of that problem's answer letters, and the argmax letter is the answer.
- generative (GSM8K, HumanEval, SpellingBee): Engine.generate_batch samples num_samples completions (with the
  calculator tool); a problem passes if ANY sample is correct (pass@k with k = num_samples).

Results are per problem (dicts), so problems can be spread over any number of workers and gathered: a categorical
batch is always the same global chunk [i*batch_size, (i+1)*batch_size) of the problem indices (padding, and with it
the exact arithmetic, depends on the batch), and a generative problem always samples from the same seed.

ChatCORE = mean over tasks of (acc - b) / (1 - b): b = 0.25 for the 4-way multiple choice tasks, 0 otherwise.
No Ray here; ray_jobs/chat_eval.py fans the problems out over an actor pool.
"""
import os

import torch


# name -> random-guess baseline (for centering)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
TASK_NAMES = tuple(BASELINES)


# -----------------------------------------------------------------------------
# Task registry

def build_task(name, task_data=None):
    """The eval split of a chat task. task_data: a directory laid out like nanochat/data/tasks/ (arc/ARC-Easy/,
    mmlu/, gsm8k/, humaneval/, words/words_alpha.zip), as nanochat.flags.task_data_dir decides it at the entry
    point; None (or "") loads from the Hub (HumanEval and the spelling words ship with their PyPI packages)."""
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spellingbee import SpellingBee

    def sub(*parts):
        return os.path.join(task_data, *parts) if task_data else None

    def sub_if_exists(*parts):  # optional files: the packaged copy is used when absent
        p = sub(*parts)
        return p if p and os.path.exists(p) else None

    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, "test", data_path=sub("arc", name))
    if name == "MMLU":
        return MMLU("all", "test", data_path=sub("mmlu"))
    if name == "GSM8K":
        return GSM8K("main", "test", data_path=sub("gsm8k"))
    if name == "HumanEval":
        return HumanEval(data_path=sub_if_exists("humaneval"))
    if name == "SpellingBee":
        return SpellingBee(size=256, split="test", words_path=sub_if_exists("words", "words_alpha.zip"))
    raise ValueError(f"unknown chat eval task {name!r}; known: {', '.join(TASK_NAMES)}")


def parse_task_names(spec):
    """'ARC-Easy|GSM8K' -> ['ARC-Easy', 'GSM8K']; None or '' -> every task."""
    if not spec:
        return list(TASK_NAMES)
    names = [n.strip() for n in spec.split("|") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown chat eval task(s) {unknown}; known: {', '.join(TASK_NAMES)}")
    return names


def num_problems(task, max_problems=None):
    return len(task) if max_problems is None else min(len(task), max_problems)


# -----------------------------------------------------------------------------
# Categorical

class LetterIds:
    """Token id of each answer letter; every letter must be exactly one token (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, letter):
        if letter not in self.cache:
            ids = self.tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} encodes to {len(ids)} tokens, need exactly 1")
            self.cache[letter] = ids[0]
        return self.cache[letter]


@torch.no_grad()
def categorical_predictions(model, tokenizer, conversations, letter_ids=None):
    """The predicted letter of each conversation, from one right-padded forward pass over the batch."""
    letter_ids = letter_ids or LetterIds(tokenizer)
    bos = tokenizer.get_bos_token_id()
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [bos] * (T - len(p)) for p in prompts], dtype=torch.long, device=model.get_device())
    logits = model(ids)
    predictions = []
    for row, (conv, prompt) in enumerate(zip(conversations, prompts)):
        letters = conv["letters"]
        focus = logits[row, len(prompt) - 1, [letter_ids(x) for x in letters]]
        predictions.append(letters[focus.argmax(dim=-1).item()])
    return predictions


def evaluate_categorical(task, model, tokenizer, indices, batch_size=8):
    """[{"index", "prediction", "correct"}] for the given problem indices. Batches are the global chunks
    index // batch_size, so any split of the indices on batch boundaries gives the same results."""
    letter_ids = LetterIds(tokenizer)
    batches = {}
    for i in indices:
        batches.setdefault(i // batch_size, []).append(i)
    records = []
    for _, batch in sorted(batches.items()):
        conversations = [task[i] for i in batch]
        for i, conv, pred in zip(batch, conversations,
                                 categorical_predictions(model, tokenizer, conversations, letter_ids)):
            records.append({"index": i, "prediction": pred, "correct": bool(task.evaluate(conv, pred))})
    return records


# -----------------------------------------------------------------------------
# Generative

def evaluate_generative(task, model, tokenizer, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=50, engine=None):
    """[{"index", "completions", "outcomes", "correct"}]: correct = any sample passes (pass@num_samples).
    Each problem samples with the engine's fixed seed, so its result does not depend on where it runs."""
    from nanochat.engine import Engine
    engine = engine or Engine(model, tokenizer)
    records = []
    for i in indices:
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(seq[len(prompt):]) for seq in sequences]
        outcomes = [bool(task.evaluate(conv, c)) for c in completions]
        records.append({"index": i, "completions": completions, "outcomes": outcomes, "correct": any(outcomes)})
    return records


# -----------------------------------------------------------------------------
# Driving one task

def evaluate_problems(task, model, tokenizer, indices, batch_size=8, num_samples=1, max_new_tokens=512,
                      temperature=0.0, top_k=50):
    """Per-problem records for `indices`, categorical or generative according to the task."""
    if task.eval_type == "categorical":
        return evaluate_categorical(task, model, tokenizer, indices, batch_size)
    if task.eval_type == "generative":
        return evaluate_generative(task, model, tokenizer, indices, num_samples, max_new_tokens, temperature, top_k)
    raise ValueError(f"unknown eval_type {task.eval_type!r}")


def shard_indices(n, num_shards, align=1):
    """Split range(n) into at most num_shards contiguous shards whose boundaries are multiples of `align`
    (the categorical batch size), as even as possible. -> list of lists."""
    blocks = [list(range(i, min(i + align, n))) for i in range(0, n, align)]
    num_shards = max(1, min(num_shards, len(blocks)))
    shards, start = [], 0
    for s in range(num_shards):
        stop = start + len(blocks) // num_shards + (1 if s < len(blocks) % num_shards else 0)
        shards.append([i for block in blocks[start:stop] for i in block])
        start = stop
    return [s for s in shards if s]


def accuracy(records):
    return sum(r["correct"] for r in records) / len(records) if records else 0.0


def run_chat_eval(task, model, tokenizer, max_problems=None, **kwargs):
    """Single-process evaluation of a task's first max_problems problems -> (accuracy, records)."""
    records = evaluate_problems(task, model, tokenizer, range(num_problems(task, max_problems)), **kwargs)
    return accuracy(records), records


def chatcore(accuracies):
    """Mean over tasks of the baseline-centered accuracy. accuracies: {task name: accuracy}."""
    if not accuracies:
        raise ValueError("ChatCORE needs at least one task accuracy")
    unknown = [n for n in accuracies if n not in BASELINES]
    if unknown:
        raise ValueError(f"no ChatCORE baseline for task(s) {unknown}")
    return sum((acc - BASELINES[n]) / (1.0 - BASELINES[n]) for n, acc in accuracies.items()) / len(accuracies)
