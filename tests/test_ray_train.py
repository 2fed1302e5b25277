"""The Ray Train glue's worker context: what a training loop reports to Ray, and when."""
import json
import os
from dataclasses import replace

import ray.train

from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir
from ray_jobs.ray_train import RayWorkerContext

TINY = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=32, window_pattern="L", device_batch_size=2,
                       total_batch_size=64, num_iterations=25, warmup_steps=2, eval_every=5, eval_tokens=128,
                       sample_every=-1, save_every=10, data="fallback", buffer_size=50, core_metric_every=-1)


def test_loop_reports_to_ray_only_with_checkpoints(tmp_path, tiny_tokenizer, monkeypatch):
    """Regression: ray.train.report blocks until Ray's controller drains a one-slot queue (every 2 s), so per-step
    metric reports stalled fast loops (72 -> 165 ms/step in bench/bench_ray_train.py). The loop, run with the Ray
    context (ray.train.report recorded, no Ray needed), must report exactly at its checkpoints, each carrying the
    pointer a restarted worker group resumes from."""
    reports = []

    def record(metrics, checkpoint=None, **kwargs):
        pointer = None
        if checkpoint is not None:
            with open(os.path.join(checkpoint.path, "pointer.json")) as f:
                pointer = json.load(f)
        reports.append((metrics, pointer))

    monkeypatch.setattr(ray.train, "report", record)
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: None)  # no node of this group is being drained
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))  # the root comes in the context
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    cfg = replace(TINY, model_tag="ray_ctx")
    ckpt = checkpoint_dir(cfg, str(tmp_path))
    os.makedirs(ckpt)
    ctx = RayWorkerContext("run-1", checkpoint_dir=ckpt, base_dir=str(tmp_path), metrics_path=ckpt + "/metrics.jsonl")
    base_train_worker(cfg, ctx, tokenizer=tiny_tokenizer, run_id="run-1")
    assert (tmp_path / "report" / "base-model-training.md").is_file() and not (tmp_path / "elsewhere").exists()

    assert [m["step"] for m, _ in reports] == [10, 20, 25]  # save_every=10, and the final step
    assert [p["step"] for _, p in reports] == [10, 20, 25]
    assert all(p["run_id"] == "run-1" and p["checkpoint_dir"] == ckpt for _, p in reports)
    assert "val_bpb" in reports[-1][0]  # the final eval travels with the final checkpoint
    # the metrics still reach metrics.jsonl: every step, and every eval
    lines = [json.loads(line) for line in open(ckpt + "/metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 26))
    assert [r["step"] for r in lines if "val_bpb" in r] == [0, 5, 10, 15, 20, 25]


def test_eval_mode_needs_resources_to_spare(ray_local, capsys):
    """auto and async offload the evals only when a worker's resources are free beyond the training workers (8 CPUs
    here); otherwise they run inline, and the log says which and why."""
    from ray_jobs.common import LaunchConfig
    from ray_jobs.ray_train import pick_eval_mode
    cpu = LaunchConfig(cpus_per_worker=2)
    assert pick_eval_mode(replace(cpu, eval_mode="auto"), 3, ray_data=False) == "async"  # 8 - 6 = 2 spare
    assert "--eval-mode auto: async" in capsys.readouterr().out
    assert pick_eval_mode(replace(cpu, eval_mode="auto"), 3, ray_data=True) == "inline"  # 8 - 3 x 3.5 < 2
    capsys.readouterr()
    assert pick_eval_mode(replace(cpu, eval_mode="async", use_gpu=True), 1, ray_data=False) == "inline"  # no GPUs
    out = capsys.readouterr().out
    assert "--eval-mode async: inline" in out and "0 GPUs spare, 1 needed" in out
    assert pick_eval_mode(replace(cpu, eval_mode="inline"), 1, ray_data=False) == "inline"
