"""Base training: the plain-process loop, checkpoints and resume, Ray Train parity, recovery, scale-out."""
import itertools
import json
import os
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import SHARED_DATA, TINY_VOCAB, TOY_CORPUS
from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir
from nanochat.checkpoint_manager import find_resume_step
from nanochat.checkpoint_manager import list_steps, load_checkpoint, read_meta
from nanochat.schedules import lr_multiplier
from nanochat.storage import join, listdir, makedirs, read_text, write_bytes
from nanochat.tokenizer import get_tokenizer
from nanochat.train import WorkerContext
from ray_jobs.base_train import RayDataBatches

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


def metrics_rows(ckpt):
    return [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]


def step_losses(ckpt):
    return {r["step"]: r["raw_loss"] for r in metrics_rows(ckpt) if "raw_loss" in r}


def trained_steps(ckpt):
    """How often each step was trained: a restart from step 0 shows up as steps trained twice."""
    return Counter(r["step"] for r in metrics_rows(ckpt) if "raw_loss" in r)


def resumed_from(ckpt):
    """The checkpoint step each resume (or restarted worker group) loaded, in order."""
    return [r["resumed_from"] for r in metrics_rows(ckpt) if "resumed_from" in r]


def once(first, last):
    return Counter(range(first, last + 1))


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
    assert trained_steps(ckpt) == once(1, 18) and resumed_from(ckpt) == [12]


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
    makedirs(ckpt)
    final = run_trainer(base_train_worker, cfg, name=tag, checkpoint_dir=ckpt, storage=storage,
                        num_workers=num_workers, use_gpu=False, resume_step=resume_step, max_failures=max_failures,
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
    ref = final_weights(plain)
    # one Ray worker runs exactly the plain process's computation: bit-identical weights
    got = final_weights(one)
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    # two workers: the same math, but batched matmuls of different shapes (the optimizer's sharded stacks) round
    # differently in the last bits. That is invisible except where Adam divides noise by noise: a parameter whose
    # gradient is at the float32 noise floor (~1e-10 here: backout_lambda at init) gets steps of about +-lr in a
    # direction set by rounding. Those may differ by up to Adam's step budget; everything else agrees closely.
    noise_driven = noise_floor_params(cfg, tiny_tokenizer, rows)
    budget = 2 * sum(lr_multiplier(s, 20, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
                     for s in range(20)) * cfg.scalar_lr * lr_scale(cfg)
    got = final_weights(two)
    for k, v in ref.items():
        if k in noise_driven:
            assert (got[k] - v).abs().max() <= budget, k
        else:
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)


def lr_scale(cfg):
    from nanochat.base_train import model_config
    from nanochat.schedules import derive_hyperparameters
    config = model_config(cfg, TINY_VOCAB)
    hp = derive_hyperparameters(config, cfg.target_param_data_ratio, cfg.total_batch_size, cfg.num_iterations,
                                cfg.target_flops, cfg.weight_decay,
                                tokens_per_fwdbwd=cfg.device_batch_size * cfg.max_seq_len)
    return hp["batch_lr_scale"]


def noise_floor_params(cfg, tokenizer, rows):
    """Parameters of the freshly initialized model whose gradient on the first batch is float32 rounding noise."""
    from nanochat.base_train import model_config
    from nanochat.gpt import build_model
    torch.manual_seed(cfg.seed)
    model = build_model(model_config(cfg, tokenizer.get_vocab_size()), "cpu")
    model(rows[0][:, :-1], rows[0][:, 1:]).backward()
    return {n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() < 1e-8}


_CRASH_REFERENCE = {}


@pytest.mark.parametrize("crash_step", [5, 10])
def test_worker_crash_restarts_from_checkpoint(storage, tiny_tokenizer, rows, ray_local, tmp_path, crash_step):
    """Rank 1 dies (os._exit) fetching the batches of step `crash_step` (4 global micro-batches per step: 2 workers x
    2 accumulation steps): step 5 is
    right after the first checkpoint (4), which Ray has usually not registered yet; step 10 is after step 9, two
    checkpoints in. The restarted group must resume from the newest checkpoint on storage either way."""
    cfg = replace(TINY, num_iterations=12, save_every=4, eval_every=-1)
    if "weights" not in _CRASH_REFERENCE:
        _, clean = ray_run(cfg, storage, "crash-ref", 2, ListBatches(rows), tiny_tokenizer)
        _CRASH_REFERENCE["weights"] = final_weights(clean)
    crashing = ListBatches(rows, crash_at=4 * (crash_step - 1), crash_rank=1, marker=str(tmp_path / "crashed"))
    final, ckpt = ray_run(cfg, storage, f"crash-{crash_step}", 2, crashing, tiny_tokenizer, max_failures=2)
    assert os.path.exists(tmp_path / "crashed")  # it really died
    assert final["step"] == 12 and list_steps(ckpt)[-1] == 12
    assert read_meta(ckpt, 12)["loop_state"]["step"] == 12
    last_checkpoint = (crash_step - 1) // 4 * 4
    assert resumed_from(ckpt) == [last_checkpoint]
    # steps after the checkpoint that finished before the crash are trained again; nothing else is
    redone = Counter(range(last_checkpoint + 1, crash_step))
    assert trained_steps(ckpt) == once(1, 12) + redone
    ref, got = _CRASH_REFERENCE["weights"], final_weights(ckpt)
    for k in ref:  # same data, same optimizer state, same reduction order: the uninterrupted run's weights
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_resume_with_a_different_number_of_workers(storage, tiny_tokenizer, rows, ray_local):
    cfg = replace(TINY, num_iterations=8, save_every=4, eval_every=-1)
    _, ckpt = ray_run(replace(cfg, num_iterations=4), storage, "rescale", 2, ListBatches(rows), tiny_tokenizer)
    assert read_meta(ckpt, 4)["world_size"] == 2
    final, _ = ray_run(cfg, storage, "rescale", 1, ListBatches(rows), tiny_tokenizer,
                       resume_step=find_resume_step(ckpt))
    assert final["step"] == 8 and list_steps(ckpt) == [4, 8]
    assert read_meta(ckpt, 8)["world_size"] == 1
    assert trained_steps(ckpt) == once(1, 8) and resumed_from(ckpt) == [4]


class CrashingRayData(RayDataBatches):
    """The Ray Data stream, but rank `crash_rank` dies (os._exit) when it asks for micro-batch `crash_at`, once."""

    def __init__(self, cfg, tokenizer, crash_at, marker, crash_rank=1):
        super().__init__(cfg, tokenizer, num_actors=1)
        self.crash_at, self.marker, self.crash_rank = crash_at, marker, crash_rank

    def train(self, rank, world_size, device, resume_state):
        for i, batch in enumerate(super().train(rank, world_size, device, resume_state)):
            if rank == self.crash_rank and i == self.crash_at and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            yield batch


def test_two_nodes_ray_data_from_a_bucket_and_a_killed_worker(tiny_tokenizer, ray_cluster, s3_root, tmp_path):
    """2 workers on 2 nodes that share only a bucket: the data (parquet), the tokenizer, the checkpoints and Ray
    Train's records are all in it; the stream comes through Ray Data; rank 1 dies right after the step-2
    checkpoint and the restarted group resumes from the bucket at step 2."""
    import ray
    from test_dataset import write_parquet
    for _ in range(2):
        ray_cluster.add_node(num_cpus=3)  # 1 for the trainer, the rest for its Ray Data actors and read tasks
    ray_cluster.wait_for_nodes()
    docs = [f"{i}: {TOY_CORPUS[i % len(TOY_CORPUS)]}" for i in range(400)]
    for i in range(4):
        local = write_parquet(tmp_path / f"part{i}.parquet", docs[i * 100:(i + 1) * 100], row_group_size=10)
        write_bytes(join(s3_root, "data", f"part{i}.parquet"), local.read_bytes())
    tiny_tokenizer.save(join(s3_root, "tokenizer"))
    cfg = replace(TINY, num_iterations=4, save_every=2, eval_every=2, data=join(s3_root, "data"))
    # the same run fed by the plain loader (reading the bucket in-process): the reference
    _, plain = ray_run(cfg, s3_root, "twonode-plain", 2, None, tiny_tokenizer)
    # micro-batch 4 of rank 1 opens step 3 (2 accumulation steps per step)
    tokenizer = get_tokenizer(s3_root)  # as the launcher does: from the bucket
    crashing = CrashingRayData(cfg, tokenizer, crash_at=4, marker=str(tmp_path / "crashed"))
    final, ckpt = ray_run(cfg, s3_root, "twonode-raydata", 2, crashing, tokenizer, max_failures=2)
    assert os.path.exists(tmp_path / "crashed")  # it really died
    assert final["step"] == 4 and list_steps(ckpt) == [2, 4]
    meta = read_meta(ckpt, 4)
    assert meta["world_size"] == 2 and {s["rank"] for s in meta["loader_states"]} == {0, 1}
    lines = [json.loads(line) for line in read_text(join(ckpt, "metrics.jsonl")).splitlines()]
    assert [r["resumed_from"] for r in lines if "resumed_from" in r] == [2]
    assert Counter(r["step"] for r in lines if "raw_loss" in r) == once(1, 4)
    # up to the checkpoint, Ray Data delivered exactly the plain loader's batches: the same weights (after the
    # resume the streams differ by design: the documents that sat in the packing buffers are skipped)
    ref, got = (load_checkpoint(d, 2, "cpu")[0] for d in (plain, ckpt))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert listdir(join(s3_root, "ray_runs"))  # Ray Train's records went to the bucket too
    assert len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]) == 2


def test_ray_data_fed_training(storage, tiny_tokenizer, ray_local):
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


def test_evals_offloaded_to_a_ray_task_land_under_their_step(storage, tiny_tokenizer, monkeypatch, rows, ray_local):
    """--eval-mode async: the evals of steps 4 and 8 run on those steps' checkpoints in Ray Train validation tasks
    while training goes on; their results are in metrics.jsonl under the step they evaluated, equal to what the
    training worker itself computes inline (the plain run); the first and last steps' evals stay inline."""
    from nanochat.base_train import evaluate_checkpoint
    from ray_jobs.ray_train import run_trainer
    cfg = replace(TINY, num_iterations=12, save_every=-1, eval_every=4, model_tag="offloaded")
    _, inline = plain_run(replace(cfg, model_tag="offloaded-ref"), storage, tiny_tokenizer, monkeypatch,
                          "offloaded-ref", ListBatches(rows))
    ckpt = checkpoint_dir(cfg, storage)
    makedirs(ckpt)
    final = run_trainer(base_train_worker, cfg, name="offloaded", checkpoint_dir=ckpt, storage=storage,
                        num_workers=1, use_gpu=False, max_failures=0, evaluate_fn=evaluate_checkpoint,
                        worker_kwargs=dict(batch_source=ListBatches(rows), tokenizer=tiny_tokenizer))
    assert final["step"] == 12 and list_steps(ckpt) == [4, 8, 12]  # a checkpoint for each offloaded eval
    evals = [r for r in metrics_rows(ckpt) if "val_bpb" in r]
    assert [(r["step"], r.get("offloaded", False)) for r in evals] == [(0, False), (4, True), (8, True), (12, False)]
    expected = {r["step"]: r["val_bpb"] for r in metrics_rows(inline) if "val_bpb" in r}
    for r in evals:
        assert r["val_bpb"] == pytest.approx(expected[r["step"]], rel=1e-6), r
    assert read_meta(ckpt, 12)["loop_state"]["best_eval"]["val_bpb"] == pytest.approx(min(expected.values()))
