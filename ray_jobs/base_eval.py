"""
Base-model evaluation: CORE, train/val bits per byte and samples, fanned out over a pool of model replicas.

    python -m ray_jobs.base_eval [--eval core,bpb,sample] [--max-per-task 500] [--num-actors 8] [--core-bundle DIR]

CORE: every example of every task is independent (its few-shot examples come from Random(1234 + idx)), so the
examples are cut into shards, all shards of all tasks go to the pool at once, and the per-example results are
gathered in order: the numbers are exactly those of a single-process run. bpb: replica k of A reads stripe k of the
split (nanochat's rank striding) and the (nats, bytes) sums are added up. Samples: one replica.
Writes <storage>/base_eval/<tag>.csv and a report section; the last line printed is the CORE score.
"""
import math
import time
from dataclasses import dataclass

from nanochat.core_eval import (EVAL_BUNDLE_URL, centered, core_metric, download_eval_bundle,
                                load_bundle, load_task_data, write_results_csv)
from nanochat import storage
from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag
from ray_jobs.common import init_ray
from ray_jobs.eval_pool import bpb_work, core_work, open_pool, resolve_checkpoint, sample_work, shards_for

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
EVALS = ("core", "bpb", "sample")


@dataclass
class BaseEvalConfig(ArgsMixin):
    storage: str | None = storage_flag()
    source: str = flag("base", "model to evaluate: base|mid|sft|rl under the storage root, a model directory "
                               "(Hugging Face export or nanochat layout) or a Hugging Face Hub repo id "
                               "owner/name[@revision]")
    model_tag: str | None = flag(None, "model tag (default: the largest d<N>; for a directory or Hub source: its "
                                       "name)")
    step: int | None = flag(None, "checkpoint step (default: the last)")
    eval: str = flag("core,bpb,sample", "comma-separated subset of core,bpb,sample")
    core_bundle: str | None = flag(None, "CORE bundle dir (core.yaml, eval_meta_data.csv, eval_data/); default "
                                         "<storage>/eval_bundle, downloaded when absent")
    bundle_url: str = flag(EVAL_BUNDLE_URL, "where the bundle zip is downloaded from")
    max_per_task: int = flag(-1, "examples per CORE task (-1 = all)")
    num_actors: int | None = flag(None, "model replicas (default: one per GPU in the cluster, else a few CPU ones)")
    data: str = flag("auto", "pretraining data source for bpb (see nanochat.dataset)")
    split_tokens: int = flag(40 * 524288, "tokens per split for bpb")
    device_batch_size: int = flag(32, "rows per bpb batch")
    num_unconditioned: int = flag(8, "unconditioned samples (temperature 1)")


def parse_evals(spec):
    """'core,bpb' -> ['core', 'bpb']; an unknown name ends the program with a message."""
    chosen = [e.strip() for e in spec.split(",") if e.strip()]
    bad = [e for e in chosen if e not in EVALS]
    if bad:
        raise SystemExit(f"--eval: unknown {bad}; choose from {','.join(EVALS)}")
    return chosen


def core_on_pool(pool, bundle_dir, max_per_task=-1, progress=True):
    """CORE over the bundle's tasks whose files are present. -> {"results", "centered_results", "core_metric",
    "missing", "correct" ({label: per-example bools, in example order})}."""
    import ray
    jobs, labels, baselines, missing = [], [], {}, []
    for task in load_bundle(bundle_dir):
        label = task["label"]
        if task["data_path"] is None:
            missing.append(label)
            continue
        data = load_task_data(task["data_path"], max_per_task)
        ref = ray.put(data)  # shipped once; every shard of the task shares it
        labels.append(label)
        baselines[label] = task["random_baseline"]
        for shard in shards_for(len(data), pool.num_actors):
            jobs.append((f"{label}[{shard[0]}:{shard[-1] + 1}]", core_work, (ref, task["task_meta"], shard),
                         len(shard)))
    if missing:
        print(f"WARNING: CORE task file(s) missing from {bundle_dir}: {', '.join(missing)}; CORE is over "
              f"{len(labels)} tasks and not comparable to the published number", flush=True)
    correct = {label: [] for label in labels}
    for (name, _, _, _), result in zip(jobs, pool.map(jobs, desc="CORE", progress=progress)):
        correct[name.split("[")[0]].extend(result)
    results = {label: sum(c) / len(c) for label, c in correct.items()}
    centered_results = {label: centered(acc, baselines[label]) for label, acc in results.items()}
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric(centered_results),
            "missing": missing, "correct": correct}


def bpb_on_pool(pool, split, data, batch_size, split_tokens):
    """Bits per byte of the split, each replica reading its stripe."""
    A = pool.num_actors
    jobs = [(f"bpb-{split}[{k}/{A}]", bpb_work, (split, data, batch_size, split_tokens, k, A), 1) for k in range(A)]
    sums = pool.map(jobs, desc=f"{split} bpb", progress=False)
    nats, nbytes = sum(s[0] for s in sums), sum(s[1] for s in sums)
    return nats / (math.log(2) * nbytes) if nbytes else float("inf")


def parser():
    return BaseEvalConfig.parser(__doc__)


def main(argv=None, pool=None):
    """Run the job; `pool` (optional) is a warm EvalPool to reuse: it is pointed at this checkpoint and left open."""
    args = BaseEvalConfig.from_args(parser().parse_args(argv))
    evals = parse_evals(args.eval)
    base_dir = get_base_dir(args.storage)
    init_ray()
    source, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step, base_dir)
    bundle_dir = None
    if "core" in evals:  # before starting replicas: a missing bundle should fail (or download) first
        bundle_dir = args.core_bundle or download_eval_bundle(base_dir, args.bundle_url)
    out = {"tag": tag, "step": step}
    t0 = time.time()
    with open_pool(pool, source, tag, step, args.num_actors, base_dir) as pool:
        if "bpb" in evals:
            for split in ("train", "val"):
                out[f"{split}_bpb"] = bpb_on_pool(pool, split, args.data, args.device_batch_size, args.split_tokens)
                print(f"{split} bpb: {out[f'{split}_bpb']:.4f}", flush=True)
        if "sample" in evals:
            job = ("samples", sample_work, (SAMPLE_PROMPTS, 16, args.num_unconditioned), len(SAMPLE_PROMPTS))
            out["samples"], out["unconditioned"] = pool.map([job], progress=False)[0]
            for s in out["samples"] + out["unconditioned"]:
                print(repr(s))
        if "core" in evals:
            out["core"] = core_on_pool(pool, bundle_dir, args.max_per_task)
    out["eval_time_s"] = time.time() - t0

    section = [{"model": f"{args.source}/{tag}", "step": step, "num_actors": pool.num_actors,
                "eval_time_s": round(out["eval_time_s"], 1)}]
    if "train_bpb" in out:
        section.append({"train bpb": out["train_bpb"], "val bpb": out["val_bpb"]})
    if "core" in out:
        core = out["core"]
        csv_path = storage.join(base_dir, "base_eval", f"{tag}.csv")
        write_results_csv(csv_path, core["results"], core["centered_results"], core["core_metric"])
        out["csv"] = csv_path
        section.append({"CORE": core["core_metric"], "max_per_task": args.max_per_task,
                        "missing tasks": ", ".join(core["missing"]) or "none"})
        section.append({f"{label} (centered)": v for label, v in core["centered_results"].items()})
    if "samples" in out:
        block = "\n".join(["samples:", "```"] + [repr(s) for s in out["samples"] + out["unconditioned"]] + ["```"])
        section.append(block)
    from nanochat.report import get_report
    get_report(base_dir).log("Base model evaluation", section)
    if "core" in out:
        print(f"CORE metric: {out['core']['core_metric']:.6f}")
    return out


if __name__ == "__main__":
    main()
