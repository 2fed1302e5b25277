"""
CORE: the base-model metric of the DCLM paper (arXiv:2406.11794), exactly as nanochat computes it.

22 in-context-learning tasks of three kinds, each example scored by one forward pass:
- multiple_choice: one prompt per choice; the choice whose answer tokens have the lowest mean loss wins.
- schema: one prompt per context option, all ending in the same continuation; lowest mean loss wins.
- language_modeling: correct iff greedy argmax reproduces every continuation token.
Per task: accuracy, centered by the random baseline, CORE = mean of the centered accuracies.

Determinism (the numbers must match nanochat's): the task file is shuffled with random.Random(1337) then cropped;
the few-shot examples of example idx are random.Random(1234 + idx).sample(all other indices, k). Every example is
independent of the others, so examples can be spread over any number of workers (evaluate_example).

The eval bundle is a directory: core.yaml, eval_meta_data.csv, eval_data/<dataset_uri> (or <dataset_uri>.gz, the
layout of nanochat/data/tasks/core). download_eval_bundle() fetches nanochat's zip into <base>/eval_bundle when absent.
"""
import csv
import io
import gzip
import json
import logging
import os
import random
import shutil
import tempfile
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat import storage
from nanochat.common import get_base_dir, get_dist_info, is_distributed

logger = logging.getLogger("nanochat")

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt rendering (the Jinja templates of nanochat / llm-foundry, written out in Python)


def render_prompts_mc(item, delimiter, fewshot=()):
    """One prompt per choice: few-shot `query + delim + gold choice` blocks, then `query + delim + choice`."""
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot=()):
    """One prompt per context option, all ending in the same continuation."""
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot=()):
    """[prompt without continuation, prompt with it]. The first is stripped: a trailing space (the default
    delimiter) would otherwise merge into the continuation's first token and break the token-prefix property."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
             "language_modeling": render_prompts_lm}

# -----------------------------------------------------------------------------
# Tokenization and answer spans


def common_length(seqs, direction="left"):
    """Length of the common prefix (left) or suffix (right) of token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        pos = i if direction == "left" else -1 - i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return n


def batch_sequences_mc(tokenizer, prompts):
    """Choices share the context, so the answer starts where the sequences first differ (tokens shared by all
    choices at the start of the answer are not scored: nanochat's behaviour, kept for exactness)."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start = common_length(tokens, "left")
    return tokens, [start] * len(tokens), [len(t) for t in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Options differ in the context and share the continuation: score the common suffix."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    suffix = common_length(tokens, "right")
    return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]


def batch_sequences_lm(tokenizer, prompts):
    """One sequence (context + continuation); the span is what the continuation added."""
    without, with_ = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(without), len(with_)
    assert start < end, "continuation added no tokens"
    assert with_[:start] == without, "prompt without continuation is not a token prefix of the prompt with it"
    return [with_], [start], [end]


BATCHERS = {"multiple_choice": batch_sequences_mc, "schema": batch_sequences_schema,
            "language_modeling": batch_sequences_lm}


def stack_sequences(tokens, pad_token_id):
    """Right-pad to a (B, T) LongTensor. Padding sits after every span, so causal attention never sees it."""
    out = torch.full((len(tokens), max(len(t) for t in tokens)), pad_token_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        out[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return out


@torch.no_grad()
def forward_model(model, input_ids):
    """(losses, predictions), both (B, T): loss of predicting token t+1 at position t (nan at the last
    position, which has no target) and the argmax prediction at each position."""
    B, T = input_ids.size()
    logits = model(input_ids)
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


# -----------------------------------------------------------------------------
# Per-example and per-task evaluation


def fewshot_indices(n, idx, k):
    """The k few-shot example indices for example idx (never idx itself), as nanochat draws them."""
    # a task cropped below k+1 examples would make nanochat crash; use all the others instead
    k = min(k, n - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return rng.sample([i for i in range(n) if i != idx], k)


def prepare_example(tokenizer, data, idx, task_meta):
    """(tokens, start_idxs, end_idxs) for example idx: its prompts, tokenized with BOS, and the answer spans."""
    task_type = task_meta["task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown CORE task type {task_type!r}; expected one of {TASK_TYPES}")
    fewshot = [data[i] for i in fewshot_indices(len(data), idx, task_meta["num_fewshot"])]
    prompts = RENDERERS[task_type](data[idx], task_meta["continuation_delimiter"], fewshot)
    return BATCHERS[task_type](tokenizer, prompts)


@torch.no_grad()
def evaluate_example(model, tokenizer, data, idx, task_meta, device):
    """True iff the model gets example idx of `data` (an already shuffled/cropped task) right."""
    tokens, starts, ends = prepare_example(tokenizer, data, idx, task_meta)
    # nanochat crops from the left only for wrapped models that expose max_seq_len; ours has none
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None:
        tokens, starts, ends = _crop_left(tokens, starts, ends, max_len)
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)
    losses, predictions = forward_model(model, input_ids)
    if task_meta["task_type"] == "language_modeling":
        si, ei = starts[0], ends[0]
        return bool(torch.all(predictions[0, si - 1:ei - 1] == input_ids[0, si:ei]).item())  # host sync: the answer
    # lowest mean loss over the answer span (Python min/index, like nanochat, so even nan ties break the same way)
    spans = [losses[i, si - 1:ei - 1].mean() for i, (si, ei) in enumerate(zip(starts, ends))]
    mean_losses = torch.stack(spans).tolist()  # host sync: one per example
    return mean_losses.index(min(mean_losses)) == data[idx]["gold"]


def _crop_left(tokens, starts, ends, max_len):
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:])
        out_s.append(s - cut)
        out_e.append(e - cut)
    return out_t, out_s, out_e


def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy on one task. Under an initialized process group (training ranks) the examples are strided over the
    ranks and the correctness vector is summed, so every rank returns the same accuracy."""
    _, rank, _, world = get_dist_info()
    if not is_distributed():
        rank, world = 0, 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        correct[idx] = float(evaluate_example(model, tokenizer, data, idx, task_meta, device))
    if world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()  # host sync: the result


# -----------------------------------------------------------------------------
# The bundle: task list, random baselines, task data


def centered(accuracy, random_baseline):
    """Rescale so that chance is 0 and perfect is 1. random_baseline is in PERCENT (eval_meta_data.csv)."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def core_metric(centered_results):
    """CORE = mean of the centered accuracies."""
    values = list(centered_results.values())
    if not values:
        raise ValueError("CORE needs at least one task result")
    return sum(values) / len(values)


def load_bundle(bundle_dir):
    """The task list of a bundle: [{"label", "task_meta", "data_path" (None if absent), "random_baseline"}], in
    core.yaml order. task_meta = {task_type, dataset_uri, num_fewshot, continuation_delimiter}."""
    import yaml
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for p in (config_path, meta_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"CORE bundle file missing: {p}")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    baselines = load_random_baselines(meta_path)
    tasks = []
    for t in config["icl_tasks"]:
        label = t["label"]
        if label not in baselines:
            raise ValueError(f"{meta_path} has no random baseline for task {label!r}")
        task_meta = {"task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
                     "num_fewshot": t["num_fewshot"][0],
                     "continuation_delimiter": t.get("continuation_delimiter", " ")}
        tasks.append({"label": label, "task_meta": task_meta, "random_baseline": baselines[label],
                      "data_path": find_task_file(bundle_dir, t["dataset_uri"])})
    return tasks


def load_random_baselines(meta_path):
    with open(meta_path, encoding="utf-8", newline="") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}


def find_task_file(bundle_dir, dataset_uri):
    """eval_data/<uri>, else eval_data/<uri>.gz; None when neither exists."""
    path = os.path.join(bundle_dir, "eval_data", dataset_uri)
    for p in (path, path + ".gz"):
        if os.path.isfile(p):
            return p
    return None


def load_task_data(path, max_per_task=-1):
    """The rows of a task file, shuffled with Random(1337) and cropped to max_per_task (if > 0)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(TASK_SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def download_eval_bundle(base_dir=None, url=EVAL_BUNDLE_URL, timeout=60):
    """<base_dir>/eval_bundle, downloaded and unzipped from `url` if absent. A file lock makes concurrent callers
    (several jobs, several ranks) download once; the directory appears atomically (unzip aside, then rename)."""
    import requests
    from filelock import FileLock
    base_dir = base_dir or get_base_dir()
    if storage.is_uri(base_dir):  # an input cache, not a run artifact, and its readers want local files
        base_dir = os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    os.makedirs(base_dir, exist_ok=True)
    with FileLock(os.path.join(base_dir, "eval_bundle.lock")):
        if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):  # someone else finished while we waited
            return bundle_dir
        logger.info(f"downloading the CORE eval bundle from {url}")
        with tempfile.TemporaryDirectory(dir=base_dir, prefix=".eval_bundle.") as tmp:
            zip_path = os.path.join(tmp, "eval_bundle.zip")
            with requests.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                with open(zip_path, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            unpacked = os.path.join(tmp, "unpacked")
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    zf.extractall(unpacked)
            except zipfile.BadZipFile as e:
                raise RuntimeError(f"the CORE bundle downloaded from {url} is not a valid zip: {e}") from e
            # the official zip holds a top-level eval_bundle/ directory; accept a flat zip too
            root = next((d for d, _, files in os.walk(unpacked) if "core.yaml" in files), None)
            if root is None:
                raise RuntimeError(f"the CORE bundle downloaded from {url} has no core.yaml")
            if os.path.isdir(bundle_dir):  # a partial leftover without core.yaml
                shutil.rmtree(bundle_dir)
            os.replace(root, bundle_dir)
    return bundle_dir


def write_results_csv(path, results, centered_results, core):
    """Task,Accuracy,Centered rows plus a final CORE row (nanochat's base_eval output, as a plain CSV)."""
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(["Task", "Accuracy", "Centered"])
    for label, acc in results.items():
        w.writerow([label, f"{acc:.6f}", f"{centered_results[label]:.6f}"])
    w.writerow(["CORE", "", f"{core:.6f}"])
    storage.write_text(path, out.getvalue())


def evaluate_model(model, tokenizer, device, bundle_dir=None, max_per_task=-1):
    """Single-process (or all-training-ranks) CORE over every task file present in the bundle.
    -> {"results", "centered_results", "core_metric", "missing"}; missing lists tasks whose file is absent
    (CORE is then over fewer tasks and not comparable to the published 22-task number)."""
    bundle_dir = bundle_dir or download_eval_bundle()
    results, centered_results, missing = {}, {}, []
    for task in load_bundle(bundle_dir):
        if task["data_path"] is None:
            missing.append(task["label"])
            continue
        data = load_task_data(task["data_path"], max_per_task)
        acc = evaluate_task(model, tokenizer, data, device, task["task_meta"])
        results[task["label"]] = acc
        centered_results[task["label"]] = centered(acc, task["random_baseline"])
    if missing:
        logger.warning(f"CORE: {len(missing)} task file(s) missing from {bundle_dir}: {', '.join(missing)}")
    return {"results": results, "centered_results": centered_results,
            "core_metric": core_metric(centered_results), "missing": missing}
