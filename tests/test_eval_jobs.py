"""Eval fan-out on Ray: a pool of model replicas gives exactly the single-process results (chat eval with 1 vs 3
actors, CORE with 1 vs 2), survives an actor dying mid-shard, names a failing shard; the base_eval / chat_eval / report
entry points run end to end on a tiny checkpoint."""
import gzip
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from ray import cloudpickle

from conftest import SHARED_DATA, perturbed
from nanochat.chat_eval import build_task, evaluate_problems
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.core_eval import evaluate_example, load_bundle, load_task_data
from nanochat.gpt import GPTConfig, build_model

TINY = dict(sequence_len=256, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
CHAT_OPTS = dict(batch_size=4, num_samples=2, max_new_tokens=6, temperature=1.0, top_k=20)
CORE_TASKS = ("copa", "winograd")  # one multiple-choice and one schema task, both 0-shot (short prompts)

# job functions defined here must travel by value: Ray workers cannot import this test module
cloudpickle.register_pickle_by_value(__import__(__name__))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return perturbed(build_model(GPTConfig(**TINY), "cpu"), seed=seed).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_tokenizer):
    """A storage root with the tiny tokenizer, a base and an sft checkpoint of the same tiny model."""
    root = tmp_path_factory.mktemp("storage")
    tiny_tokenizer.save(str(root / "tokenizer"))
    model = tiny_model()
    meta = {"step": 3, "model_config": asdict(model.config)}
    for source_dir in ("base_checkpoints", "chatsft_checkpoints"):
        save_checkpoint(str(root / source_dir / "d2"), 3, model.state_dict(), None, meta)
    return root


@pytest.fixture(scope="module")
def pools(storage):
    """get(n) -> a warm n-actor EvalPool on the sft checkpoint, shared by this module's tests (replicas take seconds
    to start); the tests using it also request ray_local, which starts Ray first."""
    from ray_jobs.eval_pool import EvalPool
    made = {}

    def get(n):
        if n not in made:
            made[n] = EvalPool("sft", "d2", 3, num_actors=n, base_dir=str(storage), use_gpu=False)
        return made[n]
    yield get
    for pool in made.values():
        pool.shutdown()


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """shared/data when present, else tiny local copies in the same layout."""
    if SHARED_DATA.is_dir():
        return str(SHARED_DATA)
    root = tmp_path_factory.mktemp("task_data")
    arc = [{"id": f"q{i}", "question": f"What is {i} plus one?",
            "choices": {"text": [str(i + d) for d in range(4)], "label": list("ABCD")}, "answerKey": "B"}
           for i in range(20)]
    gsm = [{"question": f"Tom has {i} apples and buys 2 more. How many now?",
            "answer": f"Tom has <<{i}+2={i + 2}>>{i + 2}.\n#### {i + 2}"} for i in range(20)]
    for rel, rows in (("arc/ARC-Easy/test.jsonl.gz", arc), ("gsm8k/test.jsonl.gz", gsm)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(root)


def mini_bundle(dest):
    """A CORE bundle with two real tasks (shared/data/core), or two hand-made ones when /work/shared is absent."""
    dest.mkdir(parents=True, exist_ok=True)
    src = SHARED_DATA / "core"
    if src.is_dir():
        config = yaml.safe_load((src / "core.yaml").read_text())
        config["icl_tasks"] = [t for t in config["icl_tasks"] if t["label"] in CORE_TASKS]
        shutil.copy(src / "eval_meta_data.csv", dest / "eval_meta_data.csv")
        for t in config["icl_tasks"]:
            (dest / "eval_data" / t["dataset_uri"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "eval_data" / (t["dataset_uri"] + ".gz"), dest / "eval_data" / (t["dataset_uri"] + ".gz"))
    else:
        config = {"icl_tasks": [
            {"label": "copa", "dataset_uri": "mc.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice"},
            {"label": "winograd", "dataset_uri": "schema.jsonl", "num_fewshot": [0], "icl_task_type": "schema"}]}
        (dest / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\nwinograd,50\n")
        (dest / "eval_data").mkdir(exist_ok=True)
        mc = [{"query": f"Item {i} is", "choices": ["red", "blue"], "gold": i % 2} for i in range(12)]
        sc = [{"context_options": [f"Ann {i} met Bob", f"Bob {i} met Ann"], "continuation": "today.", "gold": 0}
              for i in range(12)]
        for name, rows in (("mc.jsonl", mc), ("schema.jsonl", sc)):
            (dest / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest / "core.yaml").write_text(yaml.safe_dump(config))
    return str(dest)


# -----------------------------------------------------------------------------

def test_fanout_identical_to_single_process(ray_local, pools, task_data, tmp_path, tiny_tokenizer):
    """Chat eval (categorical ARC-Easy + generative GSM8K, pass@2 with sampling) and CORE on two tasks: per-problem
    results with 1 actor == with 3 actors == the single-process functions."""
    from ray_jobs.base_eval import core_on_pool
    from ray_jobs.chat_eval import evaluate_on_pool

    names, max_problems = ["ARC-Easy", "GSM8K"], {"ARC-Easy": 10, "GSM8K": 4}
    bundle = mini_bundle(tmp_path / "bundle")
    pool1, pool3 = pools(1), pools(3)
    assert len({info["pid"] for info in pool3.ready()}) == 3  # three distinct replicas
    chat = {}
    for n_actors, pool in ((1, pool1), (3, pool3)):
        chat[n_actors] = {}
        for name in names:  # a different number of problems per task: evaluate each on its own
            chat[n_actors].update(evaluate_on_pool(pool, [name], task_data, max_problems[name], CHAT_OPTS,
                                                   progress=False))
    core1 = core_on_pool(pool1, bundle, max_per_task=6, progress=False)
    core3 = core_on_pool(pool3, bundle, max_per_task=6, progress=False)

    # the same numbers in one process (single-threaded like the 1-CPU actors)
    model = tiny_model()
    single = {name: evaluate_problems(build_task(name, task_data), model, tiny_tokenizer, range(max_problems[name]),
                                      **CHAT_OPTS) for name in names}
    core_single = {}
    for task in load_bundle(bundle):
        data = load_task_data(task["data_path"], 6)
        core_single[task["label"]] = [evaluate_example(model, tiny_tokenizer, data, i, task["task_meta"], "cpu")
                                      for i in range(len(data))]

    assert [r["index"] for r in chat[3]["ARC-Easy"]] == list(range(10))
    assert chat[1] == chat[3] == single
    assert all(len(r["completions"]) == 2 for r in chat[3]["GSM8K"])
    assert core1["correct"] == core3["correct"] == core_single
    assert set(core3["results"]) == set(CORE_TASKS)
    assert core1["core_metric"] == core3["core_metric"]


def crash_once(ctx, marker, value):
    """A job that kills its actor the first time it runs (the marker file remembers), then succeeds."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return value


def broken_job(ctx):
    raise ValueError("bad shard data")


def test_actor_death_redoes_shard_and_errors_name_the_shard(ray_local, pools, tmp_path):
    from ray_jobs.eval_pool import EvalJobError
    marker = str(tmp_path / "crashed")
    pool = pools(3)
    jobs = [(f"job{i}", crash_once if i == 1 else (lambda ctx, v: v), (marker, i) if i == 1 else (i,), 1)
            for i in range(5)]
    assert pool.map(jobs, progress=False) == [0, 1, 2, 3, 4]
    assert os.path.exists(marker) and len(pool.actors) == 3  # the dead replica was replaced
    with pytest.raises(EvalJobError, match=r"eval job shard-7 failed: bad shard data"):
        pool.map([("shard-7", broken_job, (), 1)], progress=False)


def test_entry_points_end_to_end(ray_local, pools, storage, task_data, tmp_path, capsys, monkeypatch):
    """base_eval (CORE on a mini bundle + bpb on the shipped corpus + samples), chat_eval, then the report card.
    The jobs reuse the warm pools (pointed at the base, then the sft checkpoint); bpb is striped over 3 replicas.
    The root and the task files reach the replicas as arguments: the jobs leave the environment as it was."""
    from ray_jobs import base_eval, chat_eval, report
    root = str(storage)
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))
    bundle = mini_bundle(tmp_path / "bundle")
    report.main(["reset", "--storage", root])
    out = base_eval.main(["--storage", root, "--core-bundle", bundle, "--max-per-task", "4",
                          "--data", "fallback", "--split-tokens", "3072", "--device-batch-size", "2",
                          "--num-unconditioned", "1"], pool=pools(3))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"CORE metric: {out['core']['core_metric']:.6f}"
    csv_lines = Path(root, "base_eval", "d2.csv").read_text().splitlines()
    assert csv_lines[0] == "Task,Accuracy,Centered" and csv_lines[-1].startswith("CORE,,")
    assert 0 < out["val_bpb"] < 20 and 0 < out["train_bpb"] < 20
    assert len(out["samples"]) == len(base_eval.SAMPLE_PROMPTS)

    res = chat_eval.main(["-i", "sft", "-a", "ARC-Easy|GSM8K", "-x", "3", "-m", "4",
                          "--task-data", task_data, "--storage", root], pool=pools(1))
    printed = capsys.readouterr().out
    assert "ARC-Easy" in printed and "ChatCORE (partial, 2 of 6 tasks)" in printed
    assert set(res["accuracies"]) == {"ARC-Easy", "GSM8K"}
    assert "NANOCHAT_TASK_DATA" not in os.environ and os.environ["NANOCHAT_BASE_DIR"] == str(tmp_path / "elsewhere")

    path = report.main(["generate", "--storage", root])
    text = Path(path).read_text()
    assert path == os.path.join(root, "report", "report.md")
    assert "## Base model evaluation" in text and "## Chat evaluation sft" in text
    core_row = next(line for line in text.splitlines() if line.startswith("| CORE |"))
    assert core_row.split("|")[2].strip() == f"{out['core']['core_metric']:.4f}"
    arc_row = next(line for line in text.splitlines() if line.startswith("| ARC-Easy |"))
    assert arc_row.split("|")[4].strip() == f"{res['accuracies']['ARC-Easy']:.4f}"  # the SFT column
    assert "Total wall clock time:" in text
    assert not (tmp_path / "elsewhere").exists()  # nothing fell back to the environment's root


def test_a_replica_uses_the_root_and_task_files_it_is_given_not_its_environment(ray_local, storage, task_data,
                                                                                 tmp_path, tiny_tokenizer):
    """A replica whose own environment names another storage root and other task files (as on a node set up for
    another run) loads the checkpoint, reads the pretraining data ('auto': hub shards under the root, else the
    shipped corpus) and builds the tasks from what the job passed it: the root to its constructor, the task files
    with each job. The root its environment names is never touched."""
    import ray

    from ray_jobs.eval_pool import EvalActor, bpb_work, chat_work
    elsewhere = tmp_path / "elsewhere"
    env = {"NANOCHAT_BASE_DIR": str(elsewhere), "NANOCHAT_TASK_DATA": str(tmp_path / "no_tasks")}
    actor = EvalActor.options(num_cpus=1, runtime_env={"env_vars": env}).remote("sft", "d2", 3, str(storage), False)
    try:
        seen = ray.get(actor.run.remote(lambda ctx: (os.environ.get("NANOCHAT_BASE_DIR"), ctx.base_dir)))
        assert seen == (str(elsewhere), str(storage))
        records = ray.get(actor.run.remote(chat_work, "ARC-Easy", task_data, [0, 1, 2], CHAT_OPTS))
        nats, nbytes = ray.get(actor.run.remote(bpb_work, "val", "auto", 2, 1024, 0, 1))
    finally:
        ray.kill(actor)
    single = evaluate_problems(build_task("ARC-Easy", task_data), tiny_model(), tiny_tokenizer, range(3), **CHAT_OPTS)
    assert records == single
    assert nbytes > 0 and nats > 0
    assert not elsewhere.exists()
