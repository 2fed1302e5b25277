"""
Base-model pretraining, one worker's view. `base_train_worker(config, ctx)` is what every launcher runs:
a plain process (`python -m nanochat.base_train ...`, tests, GPU benchmarks) or each Ray Train worker
(ray_jobs/base_train.py). The process group, if any, is already initialized by the launcher.
"""
import time
import uuid
from dataclasses import asdict, dataclass, replace

import torch

from nanochat import storage
from nanochat.checkpoint_manager import find_resume_step
from nanochat.common import get_base_dir, init_wandb, print0
from nanochat.gpt import GPTConfig, build_model
from nanochat.schedules import derive_hyperparameters, grad_accum_steps, lr_multiplier, muon_momentum, \
    muon_weight_decay
from nanochat.flags import ArgsMixin, flag, int_or_auto
from nanochat.memory_plan import resolve_device_batch
from nanochat.train import Eval, WorkerContext, all_reduce_max, local_context, restore, run_loop, \
    supervised_step

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


@dataclass
class BaseTrainConfig(ArgsMixin):
    # model (the --depth dial derives width and heads)
    depth: int = flag(20, "model depth (layers); width, heads, batch size and horizon derive from it")
    aspect_ratio: int = flag(64, "model width = depth x aspect_ratio (rounded to head_dim)")
    head_dim: int = flag(128, "attention head dimension")
    max_seq_len: int = flag(2048, "tokens per training row (the model's sequence_len)")
    window_pattern: str = flag("SSSL", "sliding-window pattern tiled over the layers "
                                       "(S short, L sequence_len; last layer L)")
    # horizon: explicit iterations > target FLOPs > data:param ratio
    num_iterations: int = flag(-1, "optimizer steps (-1: derived)")
    target_flops: float = flag(-1.0, "training horizon in FLOPs (-1: unused)")
    target_param_data_ratio: float = flag(12.0, "training tokens per scaling parameter "
                                                "(used when no iterations or FLOPs are given)")
    # batch: total_batch_size -1 = auto (power-lines rule); grad accumulation makes it world-size independent
    device_batch_size: int = flag(32, "rows per forward/backward pass on each worker; auto: on a GPU the largest "
                                      "whose planned memory peak fits (python -m nanochat.dryrun), elsewhere the "
                                      "largest up to 32; either way one that divides the global batch",
                                  type=int_or_auto)
    total_batch_size: int = flag(-1, "tokens per optimizer step over all workers (-1: derived from the depth)")
    # optimization (lrs are multiplied by the batch lr scale)
    embedding_lr: float = flag(0.3, "AdamW learning rate of the token embedding")
    unembedding_lr: float = flag(0.008, "AdamW learning rate of the lm_head")
    matrix_lr: float = flag(0.02, "Muon learning rate of the transformer matrices")
    scalar_lr: float = flag(0.5, "AdamW learning rate of the per-layer scalars")
    weight_decay: float = flag(0.28, "Muon weight decay at the d12 reference (scaled to this model and batch)")
    weight_decay_cap: float = flag(0.0, "upper bound on the scaled weight decay, for toy runs (0 = none, as nanochat)")
    warmup_steps: int = flag(40, "linear learning-rate warmup steps")
    warmdown_ratio: float = flag(0.65, "fraction of the steps over which the learning rate decays at the end")
    final_lr_frac: float = flag(0.05, "learning rate at the end, as a fraction of the peak")
    # evaluation / logging / checkpoints
    eval_every: int = flag(250, "steps between validation evals")
    eval_tokens: int = flag(80 * 524288, "validation tokens per bits-per-byte eval")
    sample_every: int = flag(2000, "steps between printed samples (-1: never)")
    core_metric_every: int = flag(2000, "steps between CORE evals on the eval bundle (-1: never, also not at the end)")
    core_metric_max_per_task: int = flag(500, "examples per CORE task (-1: all)")
    core_bundle: str = flag("", "CORE eval bundle directory (default <storage>/eval_bundle, downloaded when absent)")
    save_every: int = flag(-1, "steps between checkpoints (-1: last step only)")
    model_tag: str = flag("", "checkpoint directory name (default d{depth})")
    data: str = flag("auto", "pretraining source: auto | hub | climbmix | fineweb | fallback | path / glob / URI")
    buffer_size: int = flag(1000, "documents buffered for best-fit packing")
    resume: bool = flag(False, "continue from the newest checkpoint in the output directory")
    run: str = flag("dummy", "wandb run name ('dummy': no wandb)")
    device_type: str = flag("", "cuda | cpu | mps (default: autodetect)")
    compile: int = flag(-1, "torch.compile the model: 1 on, 0 off, -1 on for CUDA only")
    seed: int = flag(42, "random seed")


def model_config(cfg, vocab_size):
    return GPTConfig.from_depth(cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                sequence_len=cfg.max_seq_len, vocab_size=vocab_size, window_pattern=cfg.window_pattern)


def batch_hyperparameters(cfg, vocab_size, batch_world_size=1):
    """derive_hyperparameters for this config; the auto batch never goes below one forward/backward of
    batch_world_size workers (an elastic run's smallest size), so it is the same at every size the run takes."""
    return derive_hyperparameters(model_config(cfg, vocab_size), cfg.target_param_data_ratio, cfg.total_batch_size,
                                  cfg.num_iterations, cfg.target_flops, cfg.weight_decay,
                                  tokens_per_fwdbwd=(cfg.device_batch_size or 1) * cfg.max_seq_len * batch_world_size,
                                  aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                  weight_decay_cap=cfg.weight_decay_cap)


def optimizer_args(cfg, hp):
    """setup_optimizer's arguments for this config: its learning rates times the batch lr scale, the scaled decay."""
    scale = hp["batch_lr_scale"]
    return dict(unembedding_lr=cfg.unembedding_lr * scale, embedding_lr=cfg.embedding_lr * scale,
                matrix_lr=cfg.matrix_lr * scale, scalar_lr=cfg.scalar_lr * scale, weight_decay=hp["weight_decay"])


def world_size_error(cfg, world_size, batch_world_size, vocab_size):
    """Why `world_size` workers cannot train this config's global batch exactly ("" if they can)."""
    total = batch_hyperparameters(cfg, vocab_size, batch_world_size)["total_batch_size"]
    try:
        grad_accum_steps(total, cfg.device_batch_size or 1, cfg.max_seq_len, world_size)
    except ValueError as e:
        return str(e)
    return ""


def checkpoint_dir(cfg, base_dir=None):
    base_dir = base_dir or get_base_dir()
    tag = cfg.model_tag or f"d{cfg.depth}"
    return storage.join(base_dir, "base_checkpoints", tag)


class BatchSource:
    """Makes this worker's micro-batch iterators. The default reads the pretraining data with the plain loader;
    launchers may swap in the Ray Data stream (same state format), tests a fixed list of batches. base_dir: the
    storage root the downloaded hub shards are under."""

    def __init__(self, cfg, tokenizer, base_dir=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        from nanochat.dataset import resolve_source
        self.source = resolve_source(cfg.data, base_dir=base_dir)

    def train(self, rank, world_size, device, resume_state):
        from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader
        return loader(self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, "train", device=device,
                      resume_state_dict=resume_state, source=self.source, rank=rank, world_size=world_size,
                      buffer_size=self.cfg.buffer_size)

    def val(self, rank, world_size, device):
        from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit as loader
        return loader(self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, "val", device=device,
                      source=self.source, rank=rank, world_size=world_size, buffer_size=self.cfg.buffer_size)


def base_evals(cfg, model, tokenizer, batch_source, rank, world_size, device, base_dir=None):
    """Base training's periodic evaluations of `model`: validation bits per byte every eval_every steps and CORE
    every core_metric_every, both offloadable (see evaluate_checkpoint). base_dir: the storage root (token bytes,
    the CORE bundle's default place)."""
    from nanochat.tokenizer import get_token_bytes
    token_bytes = get_token_bytes(device=device, base_dir=base_dir)
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world_size))

    def val_bpb(step):
        from nanochat.loss_eval import evaluate_bpb
        batches = ((x, y) for x, y in batch_source.val(rank, world_size, device))
        return {"val_bpb": evaluate_bpb(model, batches, eval_steps, token_bytes)}

    def core(step):
        from nanochat.core_eval import download_eval_bundle, evaluate_model
        try:
            bundle = cfg.core_bundle or download_eval_bundle(base_dir)
        except Exception as e:  # offline: an eval must never cost the run its final checkpoint
            print0(f"CORE skipped at step {step}: no eval bundle ({str(e).splitlines()[0][:200]})")
            return {}
        return {"core_metric": evaluate_model(model, tokenizer, device, bundle, cfg.core_metric_max_per_task)[
            "core_metric"]}

    evals = [Eval("val_bpb", cfg.eval_every, val_bpb, offload=True)]
    if cfg.core_metric_every > 0:
        evals.append(Eval("core", cfg.core_metric_every, core, at_start=False, offload=True))
    return evals


def evaluate_checkpoint(cfg, checkpoint_dir, step, names, device="cpu", base_dir=None, batch_source=None,
                        tokenizer=None):
    """The named evals of base_evals on checkpoint `step`, in this process alone (evaluation off the training
    workers, while they train on): {metric: value}. base_dir: the storage root, as for base_evals."""
    from nanochat.checkpoint_manager import load_checkpoint
    from nanochat.tokenizer import get_tokenizer
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    cfg = replace(cfg, device_batch_size=meta.get("device_batch_size") or cfg.device_batch_size)  # auto, resolved
    model = build_model(GPTConfig.from_dict(meta["model_config"]), device)
    model.load_state_dict(model_data)
    model.eval()
    tokenizer = tokenizer or get_tokenizer(base_dir)
    batch_source = batch_source or BatchSource(cfg, tokenizer, base_dir)
    results = {}
    for ev in base_evals(cfg, model, tokenizer, batch_source, 0, 1, device, base_dir):
        if ev.name in names:
            results.update(ev.fn(step))
    return results


def base_train_worker(cfg, ctx=None, batch_source=None, tokenizer=None, run_id=None, resume_step=None):
    """Train a base model on this worker; returns a summary dict (rank 0's is the one launchers report).
    resume_step: continue from this checkpoint step (launchers pass it on --resume or after a restart)."""
    from nanochat.tokenizer import get_tokenizer
    ctx = ctx or WorkerContext()
    ctx.wandb = init_wandb(cfg.run, "nanochat", asdict(cfg), ctx.rank)
    device = ctx.device
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer or get_tokenizer(ctx.base_dir)
    batch_source = batch_source or BatchSource(cfg, tokenizer, ctx.base_dir)

    config = model_config(cfg, tokenizer.get_vocab_size())
    T, W = cfg.max_seq_len, ctx.world_size
    hp = batch_hyperparameters(cfg, tokenizer.get_vocab_size(), ctx.batch_world_size)
    total_batch, num_iterations = hp["total_batch_size"], hp["num_iterations"]
    lr_scale = hp["batch_lr_scale"]

    compile_model = cfg.compile if cfg.compile >= 0 else int(device.type == "cuda")
    B = resolve_device_batch(cfg.device_batch_size, config, T, total_batch, W, device, compile_model)
    B = -all_reduce_max(-B, device)  # every worker trains the same micro-batch (the smallest, should GPUs differ)
    cfg = replace(cfg, device_batch_size=B)
    batch_source.cfg = cfg  # (this worker's copy: its loaders read the resolved size)
    accum = grad_accum_steps(total_batch, B, T, W)

    model = build_model(config, device)
    optimizer = model.setup_optimizer(**optimizer_args(cfg, hp))
    loop_state, loader_state = restore(ctx, resume_step, model, optimizer)
    compiled = torch.compile(model, dynamic=False) if compile_model else None

    n_params = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    print0(f"model: depth {cfg.depth}, n_embd {config.n_embd}, heads {config.n_head}, "
           f"params {n_params['total']:,} (scaling {n_params['scaling']:,}), FLOPs/token {flops_per_token:.3e}")
    print0(f"batch: {total_batch:,} tokens = {B} x {T} x {W} workers x {accum} accumulation steps; "
           f"{num_iterations} steps, {num_iterations * total_batch:,} tokens; lr scale {lr_scale:.3f}, "
           f"weight decay {hp['weight_decay']:.4f}"
           + (f" (capped by --weight-decay-cap; the scaling rule gives {hp['weight_decay_rule']:.4f})"
              if hp["weight_decay"] != hp["weight_decay_rule"] else ""))

    train_batches = batch_source.train(ctx.rank, W, device, loader_state)

    def sample(step):
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0.0)
            print0(tokenizer.decode(out[0]))

    def schedule(step):
        lrm = lr_multiplier(step, num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        return (lrm, muon_momentum(step, num_iterations, cfg.warmdown_ratio),
                muon_weight_decay(step, num_iterations, hp["weight_decay"]))

    meta = dict(model_config=asdict(config), user_config=asdict(cfg), device_batch_size=B, max_seq_len=T,
                total_batch_size=total_batch, num_iterations=num_iterations, run_id=run_id)
    evals = base_evals(cfg, model, tokenizer, batch_source, ctx.rank, W, device, ctx.base_dir)
    t0 = time.time()
    step_fn = supervised_step(model, optimizer, train_batches, grad_accum_steps=accum, schedule=schedule, ctx=ctx,
                              tokens_per_step=total_batch, flops_per_token=flops_per_token, compiled_model=compiled)
    state = run_loop(model, optimizer, step_fn, num_iterations=num_iterations, ctx=ctx, evals=evals, sample_fn=sample,
                     sample_every=cfg.sample_every, save_every=cfg.save_every, meta=meta, loop_state=loop_state,
                     loader_state=loader_state)
    summary = dict(step=state.step, num_iterations=num_iterations, val_bpb=state.best_eval.get("val_bpb"),
                   smooth_train_loss=state.smooth_train_loss / (1 - 0.9 ** max(state.step, 1)),
                   total_training_time=state.total_training_time, wall_time=time.time() - t0,
                   data_wait_time=state.total_data_wait, total_batch_size=total_batch,
                   num_params=n_params["total"], checkpoint_dir=ctx.checkpoint_dir,
                   resizes="; ".join(state.resizes) or None)
    print0(f"done: {summary}")
    from nanochat.report import get_report
    get_report(ctx.base_dir).log("Base model training", {
        **asdict(cfg), **{k: v for k, v in summary.items() if v is not None}, "num_iterations": num_iterations,
        "world_size": W})
    return summary


def main(argv=None):
    cfg = BaseTrainConfig.parse(argv, "base pretraining in one process")
    root = get_base_dir()
    ctx = local_context(checkpoint_dir(cfg, root), cfg.device_type, cfg.seed, base_dir=root)
    resume_step = find_resume_step(ctx.checkpoint_dir) if cfg.resume else None
    return base_train_worker(cfg, ctx, run_id=uuid.uuid4().hex, resume_step=resume_step)


if __name__ == "__main__":
    main()
