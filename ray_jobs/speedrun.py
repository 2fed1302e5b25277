"""
The whole pipeline as one Ray job: data -> tokenizer -> base -> base eval -> mid -> chat eval -> SFT -> chat eval
-> (RL -> eval) -> report -> (serve). Each stage is its own Ray workload (Ray Data / Ray Train / actor pools)
sized to the cluster it finds.

    python -m ray_jobs.speedrun [--preset demo|d20|d24] [--storage ROOT] [--num-workers N] [--use-gpu] [--serve]
        [--set STAGE.FLAG=VALUE ...] [--skip STAGE ...]
    ray job submit --working-dir . -- python -m ray_jobs.speedrun --preset d20 --storage s3://bucket/run --use-gpu

Re-running the same command resumes: finished stages (recorded in ROOT/speedrun/stages.json) are skipped, an
interrupted training stage continues from its last checkpoint. `--set base_train.num-iterations=50` overrides
any stage flag (stage names below; `--set serve.port=8001` passes flags to serve/app.py). The last line printed is
the path of the report.
"""
import argparse
import difflib
import importlib
import time
from dataclasses import dataclass

from nanochat import storage
from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag, task_data_dir
from nanochat.presets import PRESETS, to_argv
from ray_jobs import common

STAGES = ["data", "tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_eval_mid", "chat_sft",
          "chat_eval_sft", "chat_rl", "chat_eval_rl", "report"]
TRAINING = {"base_train", "mid_train", "chat_sft", "chat_rl"}


class StageLog:
    """ROOT/speedrun/stages.json: which stages finished, with their results."""

    def __init__(self, root):
        self.path = storage.join(root, "speedrun", "stages.json")
        self.stages = storage.read_json(self.path, default={})

    def done(self, stage):
        return self.stages.get(stage, {}).get("done", False)

    def started(self, stage):
        return stage in self.stages

    def record(self, stage, done, result=None, seconds=None):
        self.stages[stage] = {"done": done, "time": time.time(), "seconds": seconds, "result": result}
        storage.write_json(self.path, self.stages, indent=2, default=str)


DATA_FLAGS = {"num-shards", "allow-fallback"}  # the data stage runs here, not through a module of its own


def stage_module(stage):
    """The module whose main() runs `stage` (the chat evals share one)."""
    name = "serve.app" if stage == "serve" else "ray_jobs." + (
        "chat_eval" if stage.startswith("chat_eval") else stage)
    return importlib.import_module(name)


def stage_argv(stage, flags, args, task_data):
    """The command line the speedrun gives `stage`: its preset and --set flags and the run's shared ones."""
    common_flags = {"storage": args.storage}
    if stage in TRAINING:
        common_flags.update({"num-workers": args.num_workers, "use-gpu": args.use_gpu})
        if stage != "base_train":
            common_flags["task-data"] = task_data
    if stage.startswith("chat_eval") or stage == "base_eval":
        common_flags["num-actors"] = args.num_actors
    if stage.startswith("chat_eval"):
        common_flags.update({"source": stage.rsplit("_", 1)[1], "task-data": task_data})
    if stage == "serve":
        common_flags["source"] = "rl" if "chat_rl" not in args.skip else "sft"
    flags = {k: v.format(task_data=task_data) if isinstance(v, str) else v for k, v in flags.items()}
    return to_argv({**common_flags, **flags})


def check_stage_flags(stages, stage_flags, args, task_data):
    """Parse every stage's command line before any stage runs, so a misspelt flag or a bad value fails now, not
    hours into the run: SystemExit naming the stage, the flag and the closest valid one."""
    for stage in stages:
        flags = stage_flags(stage)
        if stage in ("data", "report"):
            unknown = set(flags) - (DATA_FLAGS if stage == "data" else set())
            if unknown:
                raise SystemExit(f"speedrun: stage {stage} has no flag {sorted(unknown)[0]!r}"
                                 + (f" (its flags: {', '.join(sorted(DATA_FLAGS))})" if stage == "data" else ""))
            continue
        parser = stage_module(stage).parser()
        parser.exit_on_error = False
        try:
            _, extra = parser.parse_known_args(stage_argv(stage, flags, args, task_data))
        except argparse.ArgumentError as e:
            raise SystemExit(f"speedrun: stage {stage}: {e}") from None
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            options = [s for action in parser._actions for s in action.option_strings]
            close = difflib.get_close_matches(unknown[0], options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SystemExit(f"speedrun: stage {stage} has no flag {unknown[0]}{hint}")


def run_stage(stage, flags, args, task_data):
    """Run one stage in this driver (sharing its Ray connection) and return its result."""
    if stage == "data":
        from nanochat.dataset import DEFAULT_HUB, download_or_fallback, hub_data_dir, resolve_source
        from ray_jobs.download import download
        n = int(flags.get("num-shards", 0))
        if n <= 0:
            return {"source": "auto (downloaded shards if present, else the shipped corpus)"}
        data_dir = hub_data_dir(DEFAULT_HUB, args.storage)
        if flags.get("allow-fallback"):  # the demo: offline, the shipped corpus stands in (a log line says so)
            return {"source": download_or_fallback(n, data_dir=data_dir, download=download).description}
        download(n, data_dir=data_dir)  # real runs: a failed or partial download fails the stage, naming each missing
        return {"source": resolve_source(DEFAULT_HUB, data_dir=data_dir).description}
    return stage_module(stage).main(stage_argv(stage, flags, args, task_data))


def parse_overrides(items):
    """['base_train.num-iterations=50', ...] -> {'base_train': {'num-iterations': '50'}}"""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not sep or not dot or stage not in STAGES + ["serve"]:
            raise SystemExit(f"--set wants STAGE.FLAG=VALUE with STAGE in {STAGES + ['serve']}, got {item!r}")
        out.setdefault(stage, {})[flag] = {"true": True, "false": False}.get(value.lower(), value)
    return out


@dataclass
class SpeedrunConfig(ArgsMixin):
    preset: str = flag("demo", "demo: a few minutes on a laptop, tiny model; d20 / d24: nanochat's speedrun sizes",
                       choices=sorted(PRESETS))
    storage: str | None = storage_flag()
    num_workers: str | None = flag(None, "Ray Train workers of the training stages: N, or MIN-MAX for elastic groups "
                                         "(default: all GPUs, or 1 on CPU)", metavar="N|MIN-MAX")
    use_gpu: bool = flag(False, "one GPU per training worker (nccl, bf16)")
    num_actors: int | None = flag(None, "evaluation actors (default: all GPUs / 2)")
    serve: bool = flag(False, "serve the final model at the end: blocks under a Ray started here, deploys and "
                              "returns on a cluster joined via RAY_ADDRESS (as under `ray job submit`)")
    set: list[str] = flag([], "override a stage's flag (repeatable)", action="append", metavar="STAGE.FLAG=VALUE")
    skip: list[str] = flag([], "leave a stage out (repeatable)", action="append", choices=STAGES)
    task_data: str | None = flag(None, "offline task files laid out like nanochat/data/tasks/ (default "
                                       "$NANOCHAT_TASK_DATA; else that shipped pack for the demo, the Hugging Face "
                                       "Hub for the others)")


def main(argv=None):
    args = SpeedrunConfig.parse(argv, __doc__)
    root = get_base_dir(args.storage)
    args.storage = root
    # decided once, here; every stage gets it on its command line ("": the Hub)
    task_data = task_data_dir(args.task_data, shipped_pack=args.preset == "demo")
    overrides = parse_overrides(args.set)

    def stage_flags(stage):
        return {**PRESETS[args.preset].get(stage, {}), **overrides.get(stage, {})}
    stages = [s for s in STAGES if s not in args.skip] + (["serve"] if args.serve else [])
    check_stage_flags(stages, stage_flags, args, task_data)  # before Ray starts or any stage runs
    common.init_ray()
    log = StageLog(root)
    t0 = time.time()
    if not log.stages:
        from ray_jobs.report import main as report_main
        report_main(["reset", "--storage", root])
    for stage in STAGES:
        if stage in args.skip or stage == "report":
            continue
        if log.done(stage):
            print(f"== {stage}: done already, skipping")
            continue
        flags = stage_flags(stage)
        if stage in TRAINING and log.started(stage):
            flags["resume"] = True  # interrupted last time: continue from its newest checkpoint
        print(f"== {stage} ({time.time() - t0:.0f}s into the run)", flush=True)
        log.record(stage, done=False)
        t_stage = time.time()
        result = run_stage(stage, flags, args, task_data)
        log.record(stage, done=True, result=result, seconds=round(time.time() - t_stage, 1))
    from ray_jobs.report import main as report_main
    report_path = report_main(["generate", "--storage", root])
    log.record("report", done=True, result=str(report_path))
    timings = ", ".join(f"{s} {log.stages[s]['seconds']:.0f}s" for s in STAGES if log.stages.get(s, {}).get("seconds"))
    print(f"speedrun finished in {(time.time() - t0) / 60:.1f} min ({timings})")
    if args.serve:
        stage_module("serve").main(stage_argv("serve", overrides.get("serve", {}), args, task_data))
    print(report_path)
    return report_path


if __name__ == "__main__":
    main()
