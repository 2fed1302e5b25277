"""
Chat evaluation of a mid/sft/rl checkpoint (or a model directory, or a Hugging Face Hub repo), fanned out over a
pool of model replicas.

    python -m ray_jobs.chat_eval -i sft [-a 'ARC-Easy|GSM8K'] [-x 100] [--num-actors 8] [--task-data DIR]
    python -m ray_jobs.chat_eval -i karpathy/nanochat-d32 -a GSM8K

Every task's problems are cut into shards (whole categorical batches; single problems for generative tasks), all
shards of all tasks go to the pool at once, and the per-problem results come back in order, so the numbers are
exactly those of a single-process run. Prints a per-task table and ChatCORE, and logs a report section.
"""
import time
from dataclasses import dataclass

from nanochat.chat_eval import TASK_NAMES, accuracy, build_task, chatcore, num_problems, parse_task_names
from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag, task_data_dir, task_data_flag
from ray_jobs.common import init_ray
from ray_jobs.eval_pool import chat_work, open_pool, resolve_checkpoint, shards_for


@dataclass
class ChatEvalConfig(ArgsMixin):
    source: str = flag(None, "model to evaluate: base|mid|sft|rl under the storage root, a model directory "
                             "(Hugging Face export or nanochat layout) or a Hugging Face Hub repo id "
                             "owner/name[@revision]", aliases=["-i"], required=True)
    task_name: str | None = flag(None, f"tasks, '|'-separated (default: all of {'|'.join(TASK_NAMES)})",
                                 aliases=["-a", "--task"])
    temperature: float = flag(0.0, "sampling temperature (0: greedy)", aliases=["-t"])
    max_new_tokens: int = flag(512, "longest generated answer", aliases=["-m"])
    num_samples: int = flag(1, "samples per generative problem (pass@n)", aliases=["-n"])
    top_k: int = flag(50, "top-k sampling (0: off)", aliases=["-k"])
    batch_size: int = flag(8, "problems per forward pass (categorical)", aliases=["-b"])
    model_tag: str | None = flag(None, "model tag (default: the largest d<N>; for a directory or Hub source: its "
                                       "name)", aliases=["-g"])
    step: int | None = flag(None, "checkpoint step (default: the last)", aliases=["-s"])
    max_problems: int | None = flag(None, "first N problems of each task (default: all)", aliases=["-x"])
    num_actors: int | None = flag(None, "model replicas (default: one per GPU in the cluster, else a few CPU ones)")
    task_data: str | None = task_data_flag()
    storage: str | None = storage_flag()


def chat_jobs(task_sizes, task_data, num_actors, opts):
    """One job per shard: (name, fn, args, n_problems). task_sizes: {task name: (eval_type, n_problems)}."""
    jobs = []
    for name, (eval_type, n) in task_sizes.items():
        align = opts.get("batch_size", 8) if eval_type == "categorical" else 1
        for shard in shards_for(n, num_actors, align):
            jobs.append((f"{name}[{shard[0]}:{shard[-1] + 1}]", chat_work, (name, task_data, shard, opts), len(shard)))
    return jobs


def evaluate_on_pool(pool, names, task_data=None, max_problems=None, opts=None, progress=True):
    """{task name: per-problem records (in problem order)} for the first max_problems problems of each task.
    task_data: the offline task files (None: the Hugging Face Hub), handed to every actor with its jobs."""
    opts = opts or {}
    tasks = {n: build_task(n, task_data) for n in names}  # also fails fast on missing data, before any actor work
    sizes = {n: (t.eval_type, num_problems(t, max_problems)) for n, t in tasks.items()}
    jobs = chat_jobs(sizes, task_data, pool.num_actors, opts)
    records = {n: [] for n in names}
    for (_, _, args, _), result in zip(jobs, pool.map(jobs, desc="chat eval", progress=progress)):
        records[args[0]].extend(result)
    return records


def parser():
    return ChatEvalConfig.parser(__doc__)


def main(argv=None, pool=None):
    """Run the job; `pool` (optional) is a warm EvalPool to reuse: it is pointed at this checkpoint and left open."""
    args = ChatEvalConfig.from_args(parser().parse_args(argv))
    base_dir = get_base_dir(args.storage)
    task_data = task_data_dir(args.task_data) or None  # decided here, once; the actors get it with their jobs
    names = parse_task_names(args.task_name)
    init_ray()
    source, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step, base_dir)
    opts = dict(batch_size=args.batch_size, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k)
    t0 = time.time()
    with open_pool(pool, source, tag, step, args.num_actors, base_dir) as pool:
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
