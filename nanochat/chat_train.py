"""
Midtraining and chat SFT (the OLD recipe), one worker's view. Same loop, same launchers and
checkpoint contract as base training (nanochat/train.py); what differs is the data and the schedule:
- mid: conversations rendered to token ids and packed best-fit into full rows; the loss is on every token (the
  model learns the chat format itself); one epoch of the mixture; lr flat then linear to 0 over the last 20%.
- sft: one conversation per row, padded; loss only on what the assistant writes (render_conversation's mask);
  lr linear to 0 from init_lr_frac.
"""
import argparse
import math
import random
import uuid
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.distributed as dist

from nanochat import storage
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, pin_source, source_tag
from nanochat.common import get_base_dir, init_wandb, is_distributed, print0
from nanochat.dataloader import BestFitPacker
from nanochat.flags import AUTO, ArgsMixin, flag, int_or_auto, task_data_dir, task_data_flag
from nanochat.memory_plan import resolve_device_batch
from nanochat.train import Eval, WorkerContext, all_reduce_max, local_context, restore, run_loop, supervised_step


@dataclass
class ChatTrainConfig(ArgsMixin):
    """The flags midtraining and SFT share; each stage's config (MidTrainConfig, SFTConfig) adds its own, --source
    among them, with its defaults (nanochat's)."""
    model_tag: str = flag("", "the source checkpoint's tag (default: its largest d<N>), also the output's; for a "
                              "directory or Hub source only the output's (default: the directory's or repo's name)")
    model_step: int = flag(-1, "the source checkpoint's step (default: its last)")
    max_seq_len: int = flag(2048, "tokens per training row (the model's sequence_len)")
    unembedding_lr: float = flag(0.004, "AdamW learning rate of the lm_head")
    embedding_lr: float = flag(0.2, "AdamW learning rate of the token embedding")
    matrix_lr: float = flag(0.02, "Muon learning rate of the transformer matrices")
    scalar_lr: float = flag(0.5, "AdamW learning rate of the per-layer scalars")
    weight_decay: float = flag(0.0, "weight decay (default: 0)")
    save_every: int = flag(-1, "steps between checkpoints (-1: last step only)")
    task_data: str | None = task_data_flag()
    identity: str = flag("", "identity conversations JSONL (default <storage>/identity_conversations.jsonl if present)")
    mixture_scale: float = flag(1.0, "shrink the synthetic spelling tasks for small runs")
    resume: bool = flag(False, "continue from the newest checkpoint in the output directory")
    run: str = flag("dummy", "wandb run name ('dummy': no wandb)")
    device_type: str = flag("", "cuda | cpu | mps (default: autodetect)")
    seed: int = flag(42, "random seed")

    def resolved(self):
        """The source pinned (every worker loads the same model) and the task files' location filled in (once: a
        resolved config keeps its choice)."""
        return replace(self, source=pin_source(self.source), task_data=task_data_dir(self.task_data))


@dataclass
class MidTrainConfig(ChatTrainConfig):
    """Midtraining: packed conversations, every token trained, a token budget per step."""
    stage: ClassVar[str] = "mid"
    source: str = flag("base", "model to start from: base|mid under the storage root, a model directory "
                               "(Hugging Face export or nanochat layout) or a Hugging Face Hub repo id "
                               "owner/name[@revision]")
    device_batch_size: int = flag(AUTO, "rows per micro-batch; auto (the default): on a GPU the largest whose planned "
                                        "memory peak fits (python -m nanochat.dryrun), elsewhere the largest up to "
                                        "32; either way one that divides the global batch", type=int_or_auto)
    total_batch_size: int = flag(524288, "tokens per optimizer step over all workers")
    num_iterations: int = flag(-1, "optimizer steps (-1: one pass over the training mixture)")
    init_lr_frac: float = flag(1.0, "learning rates start at this fraction of the base ones")
    eval_every: int = flag(150, "steps between validation bits-per-byte evals")
    eval_tokens: int = flag(20 * 524288, "validation tokens per bits-per-byte eval")
    buffer_size: int = flag(100, "conversations buffered for best-fit packing")


@dataclass
class SFTConfig(ChatTrainConfig):
    """Chat SFT: one conversation per row, only the assistant's tokens trained, conversations per step."""
    stage: ClassVar[str] = "sft"
    source: str = flag("mid", "model to start from: base|mid under the storage root, a model directory "
                              "(Hugging Face export or nanochat layout) or a Hugging Face Hub repo id "
                              "owner/name[@revision]")
    device_batch_size: int = flag(4, "conversations per micro-batch; auto: on a GPU the largest whose planned memory "
                                     "peak fits, elsewhere the largest up to 32", type=int_or_auto)
    target_examples_per_step: int = flag(32, "conversations per optimizer step over all workers")
    num_epochs: int = flag(1, "passes over the training mixture (when --num-iterations is -1)")
    num_iterations: int = flag(-1, "optimizer steps (-1: --num-epochs passes over the training mixture)")
    init_lr_frac: float = flag(0.02, "learning rates start at this fraction of the base ones, then decay linearly "
                                     "to 0")
    eval_every: int = flag(100, "steps between validation loss evals")
    eval_steps: int = flag(100, "validation batches per loss eval")
    eval_metrics_every: int = flag(200, "steps between MMLU / ARC-Easy accuracy evals (-1: never)")
    eval_metrics_max_problems: int = flag(1024, "problems per accuracy eval")


STAGE_CONFIGS = {"mid": MidTrainConfig, "sft": SFTConfig}


def output_dir(cfg, base_dir=None):
    """<storage>/mid_checkpoints/<tag> or <storage>/chatsft_checkpoints/<tag>; tag = --model-tag, else the source
    model's tag (a directory's or Hub repo's name for those sources)."""
    base_dir = base_dir or get_base_dir()
    return storage.join(base_dir, SOURCE_DIRS[cfg.stage], cfg.model_tag or source_tag(cfg.source, base_dir))


def build_mixture(cfg, split):
    from tasks.mixtures import mid_mixture, sft_mixture
    make = {"mid": mid_mixture, "sft": sft_mixture}[cfg.stage]
    return make(split, task_data=cfg.task_data or None, identity=cfg.identity, scale=cfg.mixture_scale)


# -----------------------------------------------------------------------------
# Data

def _start_index(resume_state, rank, world_size):
    """Conversations are strided over ranks (rank r reads r, r+W, ...). On resume (any W), restart from the
    smallest next-index of the old ranks: at most W-1 conversations per rank are seen twice, the packing buffers'
    contents are skipped."""
    if not resume_state:
        return rank
    base = min(s["next"] - s["rank"] for s in resume_state)
    return base + rank


def render(tokenizer, conversation, max_tokens, completion=False):
    """(ids, mask) of a whole conversation, or (prompt ids, None) to complete (RL: up to <|assistant_start|>)."""
    if completion:
        return tokenizer.render_for_completion(conversation), None
    return tokenizer.render_conversation(conversation, max_tokens=max_tokens)


def rendered_conversations(dataset, tokenizer, max_tokens, start, step, stop=None, completion=False):
    """(next_index, ids, mask) for conversations start, start+step, ... below `stop` (None: forever), each index
    taken modulo len(dataset) (so several epochs), rendered in this process (see render). ray_jobs/chat_stream.py
    renders the same stream in a Ray Data actor pool; the batchers below and the RL loop take either."""
    index = start
    while stop is None or index < stop:
        ids, mask = render(tokenizer, dataset[index % len(dataset)], max_tokens, completion)
        index += step
        yield index, ids, mask


def packed_conversations(dataset, tokenizer, B, T, rank, world_size, device, resume_state=None, buffer_size=100,
                         render=rendered_conversations):
    """Midtraining batches: rendered conversations (ids only) packed best-fit into (B, T+1) rows; targets on every
    token. One pass over the dataset, then StopIteration. Yields (inputs, targets, state)."""
    packer = BestFitPacker(B, T, buffer_size, bos_token_id=tokenizer.get_bos_token_id())
    index = _start_index(resume_state, rank, world_size)
    stream = render(dataset, tokenizer, T + 1, index, world_size, len(dataset))

    def refill():
        nonlocal index
        item = next(stream, None)
        if item is None:
            return False
        index, ids, _ = item
        packer.add([ids])
        return True

    while True:
        rows = packer.pack_batch(refill)
        if rows is None:
            return
        full = torch.tensor(rows, dtype=torch.long)
        state = {"rank": rank, "world_size": world_size, "next": index, "buffered": len(packer)}
        yield full[:, :-1].to(device), full[:, 1:].to(device), state


def padded_conversations(dataset, tokenizer, B, T, rank, world_size, device, resume_state=None, num_epochs=None,
                         render=rendered_conversations):
    """SFT batches: B conversations per micro-batch, right-padded with <|assistant_end|> to the longest; targets are
    -1 where the mask is 0 (prompt, tool output) and at padding. A conversation with no trained token in its first
    T + 1 (a long prompt cut before the reply) is skipped: a micro-batch of only such rows has no loss at all
    (NaN). Rank-strided, repeats for num_epochs (None = forever). Yields (inputs, targets, state)."""
    pad = tokenizer.encode_special("<|assistant_end|>")
    index = _start_index(resume_state, rank, world_size)
    stream = render(dataset, tokenizer, T + 1, index, world_size,
                    None if num_epochs is None else num_epochs * len(dataset))
    skipped = 0  # in a row: a whole pass over the data with nothing to train is an error, not an endless loop
    while True:
        batch = []
        for index, ids, mask in stream:
            if not any(mask[1:]):
                skipped += 1
                if skipped > len(dataset):
                    raise ValueError(f"no conversation has a trained token within max_seq_len {T} tokens")
                continue
            skipped = 0
            batch.append((ids, mask))
            if len(batch) == B:
                break
        if len(batch) < B:
            return
        width = max(len(ids) for ids, _ in batch) - 1
        inputs = torch.full((B, width), pad, dtype=torch.long)
        targets = torch.full((B, width), -1, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
            n = len(ids) - 1
            inputs[row, :n] = ids_t[:-1]
            targets[row, :n] = torch.where(mask_t[1:] == 1, ids_t[1:], -1)
        yield inputs.to(device), targets.to(device), {"rank": rank, "world_size": world_size, "next": index}


def estimate_epoch_tokens(dataset, tokenizer, T, samples=1000):
    """Rendered tokens in one pass of the dataset, from a fixed sample (the same on every rank)."""
    rng = random.Random(0)
    idx = [rng.randrange(len(dataset)) for _ in range(min(samples, len(dataset)))]
    lengths = [min(len(tokenizer.render_conversation(dataset[i], max_tokens=T + 1)[0]), T + 1) for i in idx]
    return sum(lengths) / len(lengths) * len(dataset)


@torch.no_grad()
def chat_accuracies(model, tokenizer, cfg, rank, world_size, device, batch_size=8):
    """MMLU and ARC-Easy categorical accuracy on up to eval_metrics_max_problems problems, batches strided over the
    ranks, counts summed."""
    from nanochat.chat_eval import build_task, evaluate_categorical
    out = {}
    for name, key in (("MMLU", "mmlu_acc"), ("ARC-Easy", "arc_easy_acc")):
        task = build_task(name, cfg.task_data or None)
        n = min(len(task), cfg.eval_metrics_max_problems)
        mine = [i for i in range(n) if (i // batch_size) % world_size == rank]
        records = evaluate_categorical(task, model, tokenizer, mine, batch_size)
        counts = torch.tensor([sum(r["correct"] for r in records), len(records)], dtype=torch.float64, device=device)
        if is_distributed():
            dist.all_reduce(counts)
        out[key] = (counts[0] / counts[1].clamp(min=1)).item()
    return out


# -----------------------------------------------------------------------------
# The two stages: what midtraining and SFT do differently

@dataclass
class StagePlan:
    batches: object  # resume_state -> (x, y, loader_state) micro-batches
    grad_accum_steps: int
    tokens_per_step: int | None  # None: variable-length rows, the loop counts the tokens
    num_iterations: int
    schedule: object  # step -> (lr multiplier, muon momentum or None, muon weight decay or None)
    evals: list
    report_title: str


def world_size_error(cfg, world_size):
    """Why `world_size` workers cannot train this (resolved) config's global batch exactly ("" if they can)."""
    B, T = cfg.device_batch_size or 1, cfg.max_seq_len  # (auto: any size the worker picks divides as 1 does)
    if cfg.stage == "mid" and cfg.total_batch_size % (B * T * world_size):
        return f"total batch {cfg.total_batch_size} is not a multiple of {B}*{T}*{world_size}"
    if cfg.stage == "sft" and cfg.target_examples_per_step % (B * world_size):
        return (f"target_examples_per_step {cfg.target_examples_per_step} is not a multiple of "
                f"device_batch_size*workers = {B}*{world_size}")
    return ""


def mid_stage(cfg, model, tokenizer, train_set, val_set, B, T, ctx, render):
    """Packed rows of conversations (every token trained), a token budget per step, nanochat's midtraining
    schedule (constant, then linear decay over the last 20%; Muon momentum warmup), validation bits per byte."""
    from nanochat.loss_eval import evaluate_bpb
    rank, W, device = ctx.rank, ctx.world_size, ctx.device
    total_batch = cfg.total_batch_size
    epoch_steps = math.ceil(estimate_epoch_tokens(train_set, tokenizer, T) / total_batch)
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else epoch_steps

    def batches(resume_state):
        return packed_conversations(train_set, tokenizer, B, T, rank, W, device, resume_state, cfg.buffer_size,
                                    render=render)

    def schedule(step):
        progress = step / num_iterations
        lrm = 1.0 if progress < 0.8 else 1 - (progress - 0.8) / 0.2
        return lrm, 0.85 + 0.10 * min(step / 300, 1.0), None
    token_bytes = tokenizer.compute_token_bytes().to(device)  # the model's tokenizer (a Hub model brings its own)
    eval_steps = max(1, cfg.eval_tokens // (B * T * W))

    def evaluate(step):
        val = ((x, y) for x, y, _ in packed_conversations(val_set, tokenizer, B, T, rank, W, device))
        return {"val_bpb": evaluate_bpb(model, val, eval_steps, token_bytes)}
    return StagePlan(batches, max(1, total_batch // (B * T * W)), total_batch, num_iterations, schedule,
                     [Eval("val", cfg.eval_every, evaluate)], "Midtraining")


def sft_stage(cfg, model, tokenizer, train_set, val_set, B, T, ctx, render):
    """One conversation per row, padded (only the assistant's tokens trained), a number of conversations per step,
    a linear decay to 0, validation loss, and MMLU / ARC-Easy accuracy every eval_metrics_every steps."""
    rank, W, device = ctx.rank, ctx.world_size, ctx.device
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else \
        max(1, len(train_set) // cfg.target_examples_per_step * cfg.num_epochs)

    def batches(resume_state):
        return padded_conversations(train_set, tokenizer, B, T, rank, W, device, resume_state, render=render)

    def schedule(step):
        return 1.0 - step / num_iterations, None, None

    @torch.no_grad()
    def evaluate(step):
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        val = padded_conversations(val_set, tokenizer, B, T, rank, W, device, num_epochs=1)
        for _, (x, y, _) in zip(range(cfg.eval_steps), val):
            total += model(x, y, loss_reduction="sum")
            count += (y >= 0).sum()
        if is_distributed():
            dist.all_reduce(total)
            dist.all_reduce(count)
        return {"val_loss": (total / count.clamp(min=1)).item()}
    evals = [Eval("val", cfg.eval_every, evaluate)]
    if cfg.eval_metrics_every > 0:
        evals.append(Eval("metrics", cfg.eval_metrics_every,
                          lambda step: chat_accuracies(model, tokenizer, cfg, rank, W, device)))
    return StagePlan(batches, cfg.target_examples_per_step // (B * W), None, num_iterations, schedule, evals,
                     "Chat SFT")


STAGES = {"mid": mid_stage, "sft": sft_stage}


# -----------------------------------------------------------------------------
# The worker

def chat_train_worker(cfg, ctx=None, run_id=None, resume_step=None, tokenizer=None, render=rendered_conversations):
    """Midtrain or SFT on this worker; returns a summary dict. resume_step: continue this stage's checkpoint.
    render: where the training conversations are rendered (rendered_conversations, or the Ray Data stream)."""
    ctx = ctx or WorkerContext()
    cfg = cfg.resolved()
    if not cfg.identity:  # nanochat's place for them, under the run's storage root
        cfg = replace(cfg, identity=storage.join(get_base_dir(ctx.base_dir), "identity_conversations.jsonl"))
    ctx.wandb = init_wandb(cfg.run, f"nanochat-{cfg.stage}", asdict(cfg), ctx.rank)
    device, W = ctx.device, ctx.world_size
    torch.manual_seed(cfg.seed)
    tag = storage.basename(ctx.checkpoint_dir)
    model, loaded_tokenizer, source_meta = load_model(cfg.source, device, "train", model_tag=tag,
                                                      step=cfg.model_step if cfg.model_step >= 0 else None,
                                                      base_dir=ctx.base_dir)
    tokenizer = tokenizer or loaded_tokenizer
    config = model.config
    T = min(cfg.max_seq_len, config.sequence_len)
    problem = world_size_error(replace(cfg, max_seq_len=T), W)
    if problem:
        raise ValueError(problem)
    step_tokens = cfg.total_batch_size if cfg.stage == "mid" else cfg.target_examples_per_step * T
    B = resolve_device_batch(cfg.device_batch_size, config, T, step_tokens, W, device, compiled=False)
    B = -all_reduce_max(-B, device)  # every worker trains the same micro-batch (the smallest, should GPUs differ)
    cfg = replace(cfg, device_batch_size=B)
    optimizer = model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                      matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                                      scalar_lr=cfg.scalar_lr)
    for group in optimizer.param_groups:  # start from a fraction of the lrs (SFT: 2%)
        group["lr"] = group["initial_lr"] = group["initial_lr"] * cfg.init_lr_frac

    train_set, val_set = build_mixture(cfg, "train"), build_mixture(cfg, "val")
    plan = STAGES[cfg.stage](cfg, model, tokenizer, train_set, val_set, B, T, ctx, render)
    loop_state, loader_state = restore(ctx, resume_step, model, optimizer)
    print0(f"{cfg.stage}: {len(train_set):,} train conversations, {plan.num_iterations} steps, "
           f"{plan.grad_accum_steps} accumulation steps x {B} rows x {W} workers, from {cfg.source} {tag}")
    meta = dict(model_config=asdict(config), user_config=asdict(cfg), stage=cfg.stage, source=cfg.source,
                source_step=source_meta.get("step"), run_id=run_id, device_batch_size=B, max_seq_len=T)
    step_fn = supervised_step(model, optimizer, plan.batches(loader_state), grad_accum_steps=plan.grad_accum_steps,
                              schedule=plan.schedule, ctx=ctx, tokens_per_step=plan.tokens_per_step,
                              flops_per_token=model.estimate_flops())
    state = run_loop(model, optimizer, step_fn, num_iterations=plan.num_iterations, ctx=ctx, evals=plan.evals,
                     save_every=cfg.save_every, meta=meta, loop_state=loop_state, loader_state=loader_state)
    summary = dict(step=state.step, num_iterations=plan.num_iterations, stage=cfg.stage,
                   total_training_time=state.total_training_time, checkpoint_dir=ctx.checkpoint_dir,
                   **state.best_eval, **({"resizes": "; ".join(state.resizes)} if state.resizes else {}))
    print0(f"done: {summary}")
    from nanochat.report import get_report
    get_report(ctx.base_dir).log(plan.report_title, {**asdict(cfg), **summary, "world_size": W})
    return summary


def stage_flag():
    """The --stage flag alone: it picks the config whose flags (and defaults) the rest of the command line has."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stage", choices=sorted(STAGE_CONFIGS), default="mid",
                        help="the stage to train; --help lists its flags and defaults (default: mid)")
    return parser


def main(argv=None):
    """One process (or one torchrun rank)."""
    from nanochat.checkpoint_manager import find_resume_step
    config_cls = STAGE_CONFIGS[stage_flag().parse_known_args(argv)[0].stage]
    parser = argparse.ArgumentParser(description=f"{config_cls.__doc__} In one process.", parents=[stage_flag()])
    cfg = config_cls.from_args(config_cls.add_args(parser).parse_args(argv)).resolved()
    root = get_base_dir()
    ctx = local_context(output_dir(cfg, root), cfg.device_type, cfg.seed, base_dir=root)
    resume_step = find_resume_step(ctx.checkpoint_dir) if cfg.resume else None
    return chat_train_worker(cfg, ctx, run_id=uuid.uuid4().hex, resume_step=resume_step)


if __name__ == "__main__":
    main()
