"""Base training: the plain-process loop, checkpoints and resume, Ray Train parity, recovery, scale-out."""
import functools
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import SHARED_DATA, TOY_CORPUS, local_ray
from nanochat.base_train import BaseTrainConfig, base_train_worker, checkpoint_dir
from nanochat.checkpoint_manager import find_resume_step
from nanochat.checkpoint_manager import list_steps, load_checkpoint, read_meta
from nanochat.schedules import lr_multiplier
from nanochat.storage import join, listdir, makedirs, write_bytes
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
    Optionally kills rank `crash_rank` (os._exit) at each global micro-batch in `crash_at`, once each (marker files
    in `marker_dir`)."""

    def __init__(self, rows, crash_at=(), crash_rank=1, marker_dir=None):
        self.rows, self.crash_at, self.crash_rank, self.marker_dir = rows, crash_at, crash_rank, marker_dir

    def crashed(self):
        return [c for c in self.crash_at if os.path.exists(os.path.join(self.marker_dir, f"crashed_{c}"))]

    def train(self, rank, world_size, device, resume_state):
        start = resume_state[0]["global_consumed"] if resume_state else 0
        for g in itertools.count(start + rank, world_size):
            if rank == self.crash_rank:
                for c in self.crash_at:
                    marker = os.path.join(self.marker_dir, f"crashed_{c}")
                    if g >= c and not os.path.exists(marker):
                        open(marker, "w").close()
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


def ray_run(cfg, storage, tag, num_workers, batch_source, tiny_tokenizer, resume_step=None, max_failures=0,
            evaluate_fn=None):
    from ray_jobs.ray_train import run_trainer
    cfg = replace(cfg, model_tag=tag)
    ckpt = checkpoint_dir(cfg, storage)
    makedirs(ckpt)
    final = run_trainer(base_train_worker, cfg, name=tag, checkpoint_dir=ckpt, storage=storage,
                        num_workers=num_workers, use_gpu=False, resume_step=resume_step, max_failures=max_failures,
                        worker_kwargs=dict(batch_source=batch_source, tokenizer=tiny_tokenizer),
                        evaluate_fn=evaluate_fn)
    return final, ckpt


PARITY = replace(TINY, num_iterations=12, save_every=4, eval_every=4)


@pytest.fixture(scope="module")
def two_worker_run(storage, tiny_tokenizer, rows, _ray_session_guard):
    """PARITY on 2 Ray workers, uninterrupted: the reference of the parity and the crash tests."""
    local_ray()
    _, ckpt = ray_run(PARITY, storage, "two-workers", 2, ListBatches(rows), tiny_tokenizer)
    return ckpt


def test_loss_parity_plain_vs_ray_1_and_2_workers(storage, tiny_tokenizer, monkeypatch, rows, two_worker_run):
    """The same global batches on a plain process, 1 Ray worker and 2: the same losses and weights. The 1-worker run
    also takes --eval-mode async: the evals of steps 4 and 8 run on those steps' checkpoints in Ray Train
    validation tasks while training goes on; their results land in metrics.jsonl under the step they evaluated,
    equal to what the plain run computes inline; the first and last steps' evals stay inline."""
    from nanochat.base_train import evaluate_checkpoint
    cfg = PARITY
    _, plain = plain_run(cfg, storage, tiny_tokenizer, monkeypatch, "parity-plain", ListBatches(rows))
    _, one = ray_run(cfg, storage, "parity-ray1", 1, ListBatches(rows), tiny_tokenizer,
                     evaluate_fn=evaluate_checkpoint)
    two = two_worker_run
    evals = [r for r in metrics_rows(one) if "val_bpb" in r]
    assert [(r["step"], r.get("offloaded", False)) for r in evals] == [(0, False), (4, True), (8, True), (12, False)]
    expected = {r["step"]: r["val_bpb"] for r in metrics_rows(plain) if "val_bpb" in r}
    for r in evals:
        assert r["val_bpb"] == pytest.approx(expected[r["step"]], rel=1e-6), r
    assert read_meta(one, 12)["loop_state"]["best_eval"]["val_bpb"] == pytest.approx(min(expected.values()))
    reference = step_losses(plain)
    assert sorted(reference) == list(range(1, 13))
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
    budget = adam_step_budgets(cfg, tiny_tokenizer, cfg.num_iterations, cfg.num_iterations)
    got = final_weights(two)
    for k, v in ref.items():
        if k in noise_driven:
            assert (got[k] - v).abs().max() <= budget[k], k
        else:
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)


def adam_step_budgets(cfg, tokenizer, steps, num_iterations):
    """{param name: 2 x the sum of its group's lr over `steps` steps}: how far two runs' copies of a parameter can
    drift apart when Adam steps them by about +-lr in directions set by rounding noise (each group has its own lr:
    the smear/backout scalars take a fixed 0.2, the others the config's lrs times the batch lr scale)."""
    from nanochat.base_train import batch_hyperparameters, model_config, optimizer_args
    from nanochat.gpt import build_model
    model = build_model(model_config(cfg, tokenizer.get_vocab_size()), "cpu")
    opt = model.setup_optimizer(**optimizer_args(cfg, batch_hyperparameters(cfg, tokenizer.get_vocab_size())))
    lrms = sum(lr_multiplier(s, num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
               for s in range(steps))
    group_lr = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    return {n: 2 * lrms * group_lr[id(p)] for n, p in model.named_parameters()}


def noise_floor_params(cfg, tokenizer, rows):
    """Parameters of the freshly initialized model whose gradient on the first batch is float32 rounding noise."""
    from nanochat.base_train import model_config
    from nanochat.gpt import build_model
    torch.manual_seed(cfg.seed)
    model = build_model(model_config(cfg, tokenizer.get_vocab_size()), "cpu")
    model(rows[0][:, :-1], rows[0][:, 1:]).backward()
    return {n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() < 1e-8}


def test_worker_crashes_restart_from_the_newest_checkpoint_and_resume_on_fewer_workers(
        storage, tiny_tokenizer, rows, tmp_path, two_worker_run):
    """Rank 1 dies (os._exit) twice in one run, fetching the batches of step 5 and then of step 10 (4 global
    micro-batches per step: 2 workers x 2 accumulation steps). Step 5 is right after the first checkpoint (4), which
    Ray has usually not registered yet; step 10 is after step 9, two checkpoints in. Each restarted group must
    resume from the newest checkpoint on storage. Then the finished run is resumed to a longer horizon on 1 worker."""
    crashing = ListBatches(rows, crash_at=(4 * 4, 4 * 9), crash_rank=1, marker_dir=str(tmp_path))
    final, ckpt = ray_run(PARITY, storage, "crash", 2, crashing, tiny_tokenizer, max_failures=2)
    assert crashing.crashed() == [16, 36]  # it really died, twice
    assert final["step"] == 12 and list_steps(ckpt)[-2:] == [8, 12]
    assert read_meta(ckpt, 12)["loop_state"]["step"] == 12 and read_meta(ckpt, 12)["world_size"] == 2
    assert resumed_from(ckpt) == [4, 8]
    # steps after the checkpoint that finished before a crash are trained again (9); nothing else is
    assert trained_steps(ckpt) == once(1, 12) + Counter([9])
    ref, got = final_weights(two_worker_run), final_weights(ckpt)
    for k in ref:  # same data, same optimizer state, same reduction order: the uninterrupted run's weights
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)

    # resume with a different number of workers (and a longer horizon): the exact step count, on 1 worker
    final, _ = ray_run(replace(PARITY, num_iterations=16), storage, "crash", 1, ListBatches(rows), tiny_tokenizer,
                       resume_step=find_resume_step(ckpt))
    assert final["step"] == 16 and list_steps(ckpt)[-2:] == [12, 16]
    assert read_meta(ckpt, 16)["world_size"] == 1
    assert trained_steps(ckpt) == once(1, 16) + Counter([9]) and resumed_from(ckpt) == [4, 8, 12]


def test_ray_data_fed_training_from_a_bucket(tiny_tokenizer, ray_local, s3_root, tmp_path):
    """The Ray Data stream inside a Ray Train worker, reading parquet shards from a bucket (the storage root, with
    the tokenizer and the checkpoints). That the stream equals the plain loader's, batch for batch and across a
    resume, is test_data_stream's; a multi-node run on a bucket, test_elastic's."""
    from test_dataset import write_parquet
    docs = [f"{i}: {TOY_CORPUS[i % len(TOY_CORPUS)]}" for i in range(200)]
    for i in range(2):
        local = write_parquet(tmp_path / f"part{i}.parquet", docs[i * 100:(i + 1) * 100], row_group_size=10)
        write_bytes(join(s3_root, "data", f"part{i}.parquet"), local.read_bytes())
    tiny_tokenizer.save(join(s3_root, "tokenizer"))
    cfg = replace(TINY, num_iterations=3, save_every=-1, eval_every=3, data=join(s3_root, "data"))
    tokenizer = get_tokenizer(s3_root)  # as the launcher does: from the bucket
    final, ckpt = ray_run(cfg, s3_root, "raydata", 1, RayDataBatches(cfg, tokenizer, num_actors=1), tokenizer)
    assert final["step"] == 3 and 0 < final["val_bpb"] < 20
    state = read_meta(ckpt, 3)["loader_states"][0]
    assert state["kind"] == "worker" and state["position"] + state["partial_docs"] > 0  # documents were consumed
    assert listdir(join(s3_root, "ray_runs"))  # Ray Train's records went to the bucket too


def test_offline_core_eval_does_not_cost_the_final_checkpoint(storage, tiny_tokenizer, monkeypatch, rows):
    # regression: with the default CORE cadence and no network, the end-of-run CORE download raised before the
    # final save, so the run lost its last checkpoint
    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr("nanochat.core_eval.download_eval_bundle", offline)
    cfg = replace(TINY, num_iterations=2, save_every=-1, eval_every=-1, core_metric_every=2000)
    summary, ckpt = plain_run(cfg, storage, tiny_tokenizer, monkeypatch, "offline-core", ListBatches(rows))
    assert summary["step"] == 2 and list_steps(ckpt) == [2]


def test_bf16_compiled_training_follows_fp32_and_compiles_once(storage, tiny_tokenizer, monkeypatch, rows):
    """The GPU configuration on CPU: bf16 compute and torch.compile (AOTAutograd's traced forward and backward; the
    inductor code generation is left to the GPU smoke test, it takes minutes here). Same data as fp32 eager: close
    losses, and one compiled graph for all steps (fixed shapes: no recompilation)."""
    cfg = replace(TINY, num_iterations=4)
    _, eager = plain_run(replace(cfg, compile=0), storage, tiny_tokenizer, monkeypatch, "fp32", ListBatches(rows))
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, compiled = plain_run(replace(cfg, compile=1), storage, tiny_tokenizer, monkeypatch, "bf16", ListBatches(rows))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    fp32, bf16 = step_losses(eager), step_losses(compiled)
    assert sorted(bf16) == [1, 2, 3, 4] and all(math.isfinite(v) for v in bf16.values())
    assert all(abs(fp32[s] - bf16[s]) / fp32[s] < 0.02 for s in fp32), (fp32, bf16)
