"""
The pipeline's presets: for each, the flags of every stage as on that stage's command line. The speedrun runs them
(ray_jobs/speedrun.py, where "data" is its download stage); the dry run (nanochat.dryrun) plans their GPU steps.
"""

PRESETS = {
    # a tiny model that runs the whole pipeline on a 2-core CPU box, offline (shipped corpus and task files)
    "demo": {
        "data": {"num-shards": 0, "allow-fallback": True},
        "tok_train": {"data": "auto", "vocab-size": 4096, "max-chars": 3_000_000},
        "tok_eval": {"data": "auto"},
        # depth 4 at half width (128 = 2 heads of 64): the depth dial with a CPU-sized aspect ratio
        "base_train": {"data": "auto", "depth": 4, "aspect-ratio": 32, "head-dim": 64, "max-seq-len": 256,
                       "window-pattern": "L", "device-batch-size": 8, "total-batch-size": 2048,
                       "num-iterations": 300, "warmup-steps": 10, "eval-every": 100, "eval-tokens": 16384,
                       "sample-every": 300, "save-every": 100, "core-metric-every": -1, "cpus-per-worker": 2,
                       # lrs x16: the batch is 256x smaller than the 2^19 reference (lr scale 1/16)
                       "matrix-lr": 0.32, "embedding-lr": 4.8, "unembedding-lr": 0.128, "scalar-lr": 8.0},
        "base_eval": {"data": "auto", "max-per-task": 20, "split-tokens": 16384, "device-batch-size": 8,
                      "core-bundle": "{task_data}/core"},
        "mid_train": {"max-seq-len": 256, "device-batch-size": 8, "total-batch-size": 2048, "num-iterations": 120,
                      "eval-every": 60, "eval-tokens": 8192, "save-every": 60, "mixture-scale": 0.005,
                      "matrix-lr": 0.04, "embedding-lr": 0.4, "unembedding-lr": 0.008, "cpus-per-worker": 2},
        "chat_eval_mid": {"max-problems": 20, "max-new-tokens": 48},
        "chat_sft": {"max-seq-len": 256, "device-batch-size": 4, "target-examples-per-step": 8,
                     "num-iterations": 60, "eval-every": 30, "eval-steps": 8, "save-every": 30,
                     "eval-metrics-every": 60, "eval-metrics-max-problems": 32, "mixture-scale": 0.1,
                     "init-lr-frac": 0.2, "cpus-per-worker": 2},
        "chat_eval_sft": {"max-problems": 20, "max-new-tokens": 48},
        "chat_rl": {"num-iterations": 4, "examples-per-step": 2, "num-samples": 4, "device-batch-size": 4,
                    "max-new-tokens": 48, "eval-every": 4, "eval-examples": 8, "save-every": 4,
                    "cpus-per-worker": 2},
        "chat_eval_rl": {"task-name": "GSM8K", "max-problems": 20, "max-new-tokens": 48},
    },
    # nanochat's ~$100 tier: d20 on one 8xH100 node (OLD speedrun, data:param ratio 20)
    "d20": {
        "data": {"num-shards": 370},
        "tok_train": {"data": "hub"},
        "tok_eval": {"data": "hub"},
        "base_train": {"data": "hub", "depth": 20, "target-param-data-ratio": 20,
                       "device-batch-size": "auto"},
        "base_eval": {"data": "hub"},
        "mid_train": {}, "chat_eval_mid": {}, "chat_sft": {}, "chat_eval_sft": {},
        "chat_rl": {}, "chat_eval_rl": {"task-name": "GSM8K"},
    },
    # GPT-2 grade: d24 at data:param ratio 8 (NEW speedrun)
    "d24": {
        "data": {"num-shards": 170},
        "tok_train": {"data": "hub"},
        "tok_eval": {"data": "hub"},
        "base_train": {"data": "hub", "depth": 24, "target-param-data-ratio": 8,
                       "device-batch-size": "auto"},
        "base_eval": {"data": "hub", "device-batch-size": 16},
        "mid_train": {}, "chat_eval_mid": {}, "chat_sft": {}, "chat_eval_sft": {},
        "chat_rl": {}, "chat_eval_rl": {"task-name": "GSM8K"},
    },
}


def to_argv(flags):
    """{"depth": 4, "resume": True, "use-gpu": False, "step": None} -> --depth 4 --resume --no-use-gpu"""
    argv = []
    for key, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv
