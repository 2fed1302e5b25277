"""Base training: the plain-process loop, checkpoints and resume, Ray Train parity, recovery, scale-out."""
import itertools
import json
import os
from dataclasses import replace

import pytest
import torch

from conftest import SHARED_DATA
from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir, find_resume_step
from nanochat.checkpoint_manager import list_steps, load_checkpoint, read_meta
from nanochat.train import WorkerContext

TINY = BaseTrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=32, window_pattern="SL", device_batch_size=2,
                       total_batch_size=256, num_iterations=12, warmup_steps=2, eval_every=6, eval_tokens=256,
                       sample_every=-1, save_every=6, data="fallback", buffer_size=50,
                       core_metric_every=-1,
                       matrix_lr=0.05, embedding_lr=0.5, unembedding_lr=0.02)


class ListBatches:
    """World-size independent batches: global micro-batch g goes to rank g % W, so 1 worker accumulating 2
    micro-batches and 2 workers taking one each see exactly the same global batch (what loss parity needs).
    Optionally kills rank `crash_rank` (os._exit) at global micro-batch `crash_at`, once (a marker file)."""

    def __init__(self, rows, crash_at=None, crash_rank=1, marker=None):
        self.rows, self.crash_at, self.crash_rank, self.marker = rows, crash_at, crash_rank, marker

    def train(self, rank, world_size, device, resume_state):
        start = resume_state[0]["global_consumed"] if resume_state else 0
        for g in itertools.count(start + rank, world_size):
            if self.crash_at is not None and g >= self.crash_at and rank == self.crash_rank \
                    and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            row = self.rows[g % len(self.rows)]
            yield row[:, :-1].to(device), row[:, 1:].to(device), {"global_consumed": g - rank + world_size}

    def val(self, rank, world_size, device):
        for row in self.rows[rank:4:world_size]:
            yield row[:, :-1].to(device), row[:, 1:].to(device)


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("storage")
    tiny_tokenizer.save(str(root / "tokenizer"))
    return str(root)


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    """Real packed rows (B=2, T+1=33) from the shipped corpus, the same for every run."""
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    loader = tokenizing_distributed_data_loader_bos_bestfit(tiny_tokenizer, 2, 32, "train", source="fallback",
                                                            rank=0, world_size=1, buffer_size=50)
    out = []
    for x, y in loader:
        out.append(torch.cat([x, y[:, -1:]], dim=1))
        if len(out) == 64:
            return out


def plain_run(cfg, storage, tiny_tokenizer, monkeypatch, tag, batch_source=None, resume_step=None):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", storage)
    cfg = replace(cfg, model_tag=tag)
    ckpt = checkpoint_dir(cfg, storage)
    os.makedirs(ckpt, exist_ok=True)
    ctx = WorkerContext(checkpoint_dir=ckpt, metrics_path=ckpt + "/metrics.jsonl")
    summary = base_train_worker(cfg, ctx, batch_source=batch_source, tokenizer=tiny_tokenizer, run_id="plain",
                                resume_step=resume_step)
    return summary, ckpt


def step_losses(ckpt):
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    return {r["step"]: r["raw_loss"] for r in rows if "raw_loss" in r}


def final_weights(ckpt):
    model, _, _ = load_checkpoint(ckpt, list_steps(ckpt)[-1], "cpu")
    return model


def test_plain_process_trains_saves_and_resumes(storage, tiny_tokenizer, monkeypatch):
    core_bundle = SHARED_DATA / "core"
    cfg = replace(TINY, core_metric_every=12, core_metric_max_per_task=4, core_bundle=str(core_bundle)) \
        if core_bundle.exists() else TINY
    summary, ckpt = plain_run(cfg, storage, tiny_tokenizer, monkeypatch, "plain")
    assert summary["step"] == 12 and list_steps(ckpt) == [6, 12]
    losses = step_losses(ckpt)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    meta = read_meta(ckpt, 12)
    assert meta["loop_state"]["step"] == 12 and meta["model_config"]["n_layer"] == 2
    assert len(meta["loader_states"]) == 1 and meta["loader_states"][0]["kind"] == "worker"
    assert meta["total_batch_size"] == 256 and "val_bpb" in meta["loop_state"]["best_eval"]
    if cfg.core_metric_every > 0:  # CORE during training (on the shared bundle copy)
        assert -1 <= meta["loop_state"]["best_eval"]["core_metric"] <= 1
    # resume to a longer horizon: continues at step 12, step count exact
    longer = replace(TINY, num_iterations=18)
    summary, _ = plain_run(longer, storage, tiny_tokenizer, monkeypatch, "plain",
                           resume_step=find_resume_step(ckpt))
    assert summary["step"] == 18 and list_steps(ckpt) == [6, 12, 18]
    assert sorted(step_losses(ckpt))[-6:] == list(range(13, 19))


def test_resume_reproduces_uninterrupted_run(storage, tiny_tokenizer, monkeypatch, rows):
    _, ckpt = plain_run(TINY, storage, tiny_tokenizer, monkeypatch, "full", ListBatches(rows))
    uninterrupted = final_weights(ckpt)
    # same data from the same point, restored optimizer and loop state: bit-for-bit the same step 12
    plain_run(TINY, storage, tiny_tokenizer, monkeypatch, "full", ListBatches(rows), resume_step=6)
    resumed = final_weights(ckpt)
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=1e-6, atol=1e-7)


def ray_run(cfg, storage, tag, num_workers, batch_source, tiny_tokenizer, resume_step=None, max_failures=0):
    from ray_jobs.ray_train import run_trainer
    cfg = replace(cfg, model_tag=tag)
    ckpt = checkpoint_dir(cfg, storage)
    os.makedirs(ckpt, exist_ok=True)
    final = run_trainer(base_train_worker, cfg, name=tag, checkpoint_dir=ckpt, storage=storage,
                        num_workers=num_workers, use_gpu=False, resume_step=resume_step, max_failures=max_failures,
                        metrics_path=ckpt + "/metrics.jsonl",
                        worker_kwargs=dict(batch_source=batch_source, tokenizer=tiny_tokenizer))
    return final, ckpt


def test_loss_parity_plain_vs_ray_1_and_2_workers(storage, tiny_tokenizer, monkeypatch, rows, ray_local):
    cfg = replace(TINY, num_iterations=20, save_every=-1, eval_every=-1)
    _, plain = plain_run(cfg, storage, tiny_tokenizer, monkeypatch, "parity-plain", ListBatches(rows))
    _, one = ray_run(cfg, storage, "parity-ray1", 1, ListBatches(rows), tiny_tokenizer)
    _, two = ray_run(cfg, storage, "parity-ray2", 2, ListBatches(rows), tiny_tokenizer)
    reference = step_losses(plain)
    assert sorted(reference) == list(range(1, 21))
    for other in (one, two):
        losses = step_losses(other)
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-3), (other, step)
    # weights agree too; loosely, since Adam amplifies reduction-order noise on near-zero gradients of scalars
    for other in (one, two):
        for k, v in final_weights(plain).items():
            torch.testing.assert_close(final_weights(other)[k], v, rtol=1e-2, atol=1e-2)


def test_worker_crash_restarts_from_checkpoint(storage, tiny_tokenizer, rows, ray_local, tmp_path):
    cfg = replace(TINY, num_iterations=12, save_every=4, eval_every=-1)
    _, clean = ray_run(cfg, storage, "crash-ref", 2, ListBatches(rows), tiny_tokenizer)
    # rank 1 dies (os._exit) while fetching the batch of step 9 (global micro-batches 2 per step)
    crashing = ListBatches(rows, crash_at=2 * 9, crash_rank=1, marker=str(tmp_path / "crashed"))
    final, ckpt = ray_run(cfg, storage, "crash", 2, crashing, tiny_tokenizer, max_failures=2)
    assert os.path.exists(tmp_path / "crashed")  # it really died
    assert final["step"] == 12 and list_steps(ckpt)[-1] == 12
    assert read_meta(ckpt, 12)["loop_state"]["step"] == 12
    ref, got = final_weights(clean), final_weights(ckpt)
    for k in ref:  # resumed from step 8 with the same data and optimizer state: the same result
        torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-2)


def test_resume_with_a_different_number_of_workers(storage, tiny_tokenizer, rows, ray_local):
    cfg = replace(TINY, num_iterations=8, save_every=4, eval_every=-1)
    _, ckpt = ray_run(replace(cfg, num_iterations=4), storage, "rescale", 2, ListBatches(rows), tiny_tokenizer)
    assert read_meta(ckpt, 4)["world_size"] == 2
    final, _ = ray_run(cfg, storage, "rescale", 1, ListBatches(rows), tiny_tokenizer,
                       resume_step=find_resume_step(ckpt))
    assert final["step"] == 8 and list_steps(ckpt) == [4, 8]
    assert read_meta(ckpt, 8)["world_size"] == 1


def test_real_data_two_workers_on_two_nodes(storage, tiny_tokenizer, ray_cluster):
    import ray
    ray_cluster.add_node(num_cpus=1)
    ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    cfg = replace(TINY, num_iterations=4, save_every=2, eval_every=2)
    final, ckpt = ray_run(cfg, storage, "multinode", 2, None, tiny_tokenizer)
    assert final["step"] == 4 and list_steps(ckpt) == [2, 4]
    meta = read_meta(ckpt, 4)
    assert meta["world_size"] == 2 and len(meta["loader_states"]) == 2
    assert {s["rank"] for s in meta["loader_states"]} == {0, 1}
    assert len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]) == 2


def test_ray_data_fed_training(storage, tiny_tokenizer, ray_local):
    from ray_jobs.base_train import RayDataBatches
    cfg = replace(TINY, num_iterations=3, save_every=-1, eval_every=-1)
    final, ckpt = ray_run(cfg, storage, "raydata", 1, RayDataBatches(cfg, tiny_tokenizer, num_actors=1),
                          tiny_tokenizer)
    assert final["step"] == 3
    state = read_meta(ckpt, 3)["loader_states"][0]
    assert state["kind"] == "worker" and state["position"] + state["partial_docs"] > 0  # documents were consumed


def test_offline_core_eval_does_not_cost_the_final_checkpoint(storage, tiny_tokenizer, monkeypatch, rows):
    # regression: with the default CORE cadence and no network, the end-of-run CORE download raised before the
    # final save, so the run lost its last checkpoint
    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr("nanochat.core_eval.download_eval_bundle", offline)
    cfg = replace(TINY, num_iterations=2, save_every=-1, eval_every=-1, core_metric_every=2000)
    summary, ckpt = plain_run(cfg, storage, tiny_tokenizer, monkeypatch, "offline-core", ListBatches(rows))
    assert summary["step"] == 2 and list_steps(ckpt) == [2]
