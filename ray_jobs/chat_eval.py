"""
Chat evaluation of a mid/sft/rl checkpoint, fanned out over a pool of model replicas.

    python -m ray_jobs.chat_eval -i sft [-a 'ARC-Easy|GSM8K'] [-x 100] [--num-actors 8] [--task-data DIR]

Every task's problems are cut into shards (whole categorical batches; single problems for generative tasks), all
shards of all tasks go to the pool at once, and the per-problem results come back in order, so the numbers are
exactly those of a single-process run. Prints a per-task table and ChatCORE, and logs a report section.
"""
import argparse
import os
import time

from nanochat.chat_eval import TASK_NAMES, accuracy, build_task, chatcore, num_problems, parse_task_names
from nanochat.flags import TASK_DATA_ENV, task_data_dir
from ray_jobs.common import init_ray, storage_root
from ray_jobs.eval_pool import chat_work, open_pool, resolve_checkpoint, shards_for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat evaluation (ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE)")
    p.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which checkpoints")
    p.add_argument("-a", "--task-name", "--task", dest="task_name", default=None,
                   help=f"tasks, '|'-separated (default: all of {'|'.join(TASK_NAMES)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512, help="longest generated answer")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0: off)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward pass (categorical)")
    p.add_argument("-g", "--model-tag", default=None, help="default: the largest d<N>")
    p.add_argument("-s", "--step", type=int, default=None, help="default: the last step")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="first N problems of each task")
    p.add_argument("--num-actors", type=int, default=None,
                   help="model replicas (default: one per GPU in the cluster, else a few CPU ones)")
    p.add_argument("--task-data", default=None,
                   help=f"directory laid out like shared/data for offline tasks (default ${TASK_DATA_ENV}; "
                        f"else the HuggingFace Hub)")
    p.add_argument("--storage", default=None, help="storage root (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    return p.parse_args(argv)


def chat_jobs(task_sizes, task_data, num_actors, opts):
    """One job per shard: (name, fn, args, n_problems). task_sizes: {task name: (eval_type, n_problems)}."""
    jobs = []
    for name, (eval_type, n) in task_sizes.items():
        align = opts.get("batch_size", 8) if eval_type == "categorical" else 1
        for shard in shards_for(n, num_actors, align):
            jobs.append((f"{name}[{shard[0]}:{shard[-1] + 1}]", chat_work, (name, task_data, shard, opts), len(shard)))
    return jobs


def evaluate_on_pool(pool, names, task_data=None, max_problems=None, opts=None, progress=True):
    """{task name: per-problem records (in problem order)} for the first max_problems problems of each task."""
    opts = opts or {}
    tasks = {n: build_task(n, task_data) for n in names}  # also fails fast on missing data, before any actor work
    sizes = {n: (t.eval_type, num_problems(t, max_problems)) for n, t in tasks.items()}
    jobs = chat_jobs(sizes, task_data, pool.num_actors, opts)
    records = {n: [] for n in names}
    for (_, _, args, _), result in zip(jobs, pool.map(jobs, desc="chat eval", progress=progress)):
        records[args[0]].extend(result)
    return records


def main(argv=None, pool=None):
    """Run the job; `pool` (optional) is a warm EvalPool to reuse: it is pointed at this checkpoint and left open."""
    args = parse_args(argv)
    base_dir = storage_root(args.storage)
    task_data = task_data_dir(args.task_data or "")
    if task_data:  # exported so init_ray hands it to the workers too
        task_data = os.path.abspath(task_data)
        os.environ[TASK_DATA_ENV] = task_data
    names = parse_task_names(args.task_name)
    init_ray()
    tag, step = resolve_checkpoint(args.source, args.model_tag, args.step, base_dir)
    opts = dict(batch_size=args.batch_size, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k)
    t0 = time.time()
    with open_pool(pool, args.source, tag, step, args.num_actors, base_dir) as pool:
        records = evaluate_on_pool(pool, names, task_data, args.max_problems, opts)
    accuracies = {n: accuracy(records[n]) for n in names}

    print(f"{'Task':<16} {'Problems':>9} {'Accuracy':>9}")
    for n in names:
        print(f"{n:<16} {len(records[n]):>9} {accuracies[n]:>9.4f}")
    summary = dict(accuracies)
    if set(names) == set(TASK_NAMES):  # ChatCORE proper needs every task
        summary["ChatCORE"] = chatcore(accuracies)
        print(f"ChatCORE: {summary['ChatCORE']:.4f}")
    else:
        print(f"ChatCORE (partial, {len(names)} of {len(TASK_NAMES)} tasks): {chatcore(accuracies):.4f}")

    from nanochat.report import get_report
    config = {"source": args.source, "model_tag": tag, "step": step, "max_problems": args.max_problems,
              "num_actors": pool.num_actors, "eval_time_s": round(time.time() - t0, 1), **opts}
    get_report(base_dir).log(f"Chat evaluation {args.source}", [config, summary])
    return {"tag": tag, "step": step, "accuracies": accuracies, "chatcore": summary.get("ChatCORE"),
            "records": records}


if __name__ == "__main__":
    main()
