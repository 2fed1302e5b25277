"""
Reinforcement learning on GSM8K, one worker's view: nanochat's "GRPO" reduced to on-policy REINFORCE.

Every step, each rank takes its share of the step's problems (rank-strided over the GSM8K train split, cycling),
samples num_samples completions per problem with the KV-cache Engine (calculator tool on) from the very weights it
is training, scores each 1/0 with the '#### N' answer check, and raises the log-probability of the sampled tokens
in proportion to the advantage r - mean(r) of the problem's group. No std normalization, no KL, no ratio clipping:
the samples are on-policy and used for exactly one update. Tokens the model did not choose (the prompt, forced
calculator output, padding) get no gradient. Then one optimizer step; gradients are averaged across ranks inside
MuonAdamW, as in every other stage (no DDP).

The checkpoint / metrics contract is run_loop's (nanochat/train.py): num_iterations + 1 iterations so the final
eval and save see step N; checkpoints via save_training_checkpoint (loader state = the example cursor), so a
restarted Ray Train worker group resumes exactly like the other stages.
"""
import os
import time
import uuid
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from nanochat import storage
from nanochat.chat_train import rendered_conversations
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, pin_source, source_tag
from nanochat.common import get_base_dir, init_wandb, is_distributed, print0
from nanochat.flags import ArgsMixin, flag, task_data_dir, task_data_flag
from nanochat.train import Eval, StepResult, WorkerContext, restore, run_loop

EVAL_TEMPERATURE, EVAL_TOP_K = 1.0, 50  # pass@k samples like the rollouts


@dataclass
class RLConfig(ArgsMixin):
    source: str = flag("sft", "model to start from: sft|mid under the storage root, a model directory (Hugging Face "
                              "export or nanochat layout) or a Hugging Face Hub repo id owner/name[@revision]")
    model_tag: str = flag("", "the source checkpoint's tag (default: its largest d<N>), also the output's; for a "
                              "directory or Hub source only the output's (default: the directory's or repo's name)")
    model_step: int = flag(-1, "the source checkpoint's step (default: its last)")
    num_epochs: int = flag(1, "passes over GSM8K train")
    num_iterations: int = flag(-1, "optimizer steps (-1: len(GSM8K train) // examples_per_step * num_epochs)")
    device_batch_size: int = flag(8, "rows per engine call and per forward/backward pass")
    examples_per_step: int = flag(16, "problems per step, over all ranks (must divide by the world size)")
    num_samples: int = flag(16, "completions per problem (must divide by device_batch_size)")
    max_new_tokens: int = flag(256, "longest sampled completion")
    temperature: float = flag(1.0, "sampling temperature of the rollouts")
    top_k: int = flag(50, "top-k of the rollouts (0: off)")
    embedding_lr: float = flag(0.2, "AdamW learning rate of the token embedding")
    unembedding_lr: float = flag(0.004, "AdamW learning rate of the lm_head")
    matrix_lr: float = flag(0.02, "Muon learning rate of the transformer matrices")
    scalar_lr: float = flag(0.5, "AdamW learning rate of the per-layer scalars")
    weight_decay: float = flag(0.0, "weight decay")
    init_lr_frac: float = flag(0.05, "learning rates start at this fraction of the base ones, then decay linearly to 0")
    eval_every: int = flag(60, "steps between pass@k evals on the test slice (<= 0: last step only)")
    eval_examples: int = flag(400, "first N GSM8K test problems")
    save_every: int = flag(60, "steps between checkpoints (<= 0: last step only)")
    task_data: str | None = task_data_flag()
    resume: bool = flag(False, "continue from the newest checkpoint in the output directory")
    run: str = flag("dummy", "wandb run name ('dummy': no wandb)")
    device_type: str = flag("", "cuda | cpu | mps (default: autodetect)")
    seed: int = flag(42, "random seed")

    def resolved(self):
        """The source pinned and the task files decided (once: a resolved config keeps its choice)."""
        return RLConfig(**{**asdict(self), "source": pin_source(self.source),
                           "task_data": task_data_dir(self.task_data)})


def output_dir(cfg, base_dir=None):
    """<storage>/chatrl_checkpoints/<tag>; tag = --model-tag, else the source model's tag (a directory's or Hub
    repo's name for those sources)."""
    base_dir = base_dir or get_base_dir()
    return storage.join(base_dir, SOURCE_DIRS["rl"], cfg.model_tag or source_tag(cfg.source, base_dir))


def gsm8k(cfg, split):
    from tasks.gsm8k import GSM8K
    return GSM8K(split=split, data_path=os.path.join(cfg.task_data, "gsm8k") if cfg.task_data else None)


# -----------------------------------------------------------------------------
# The math, as small pure functions

def rollout_seed(step, example_idx, sampling_step):
    """Seed of one engine call: every (step, problem, call) samples differently, reproducibly (hashes of int
    tuples do not depend on PYTHONHASHSEED)."""
    return hash((step, example_idx, sampling_step)) & 0x7FFFFFFF


def completion_rewards(task, conversation, sequences, prompt_len, tokenizer):
    """Reward of each sampled sequence (prompt + completion ids): the task's check of the decoded completion."""
    return [float(task.reward(conversation, tokenizer.decode(seq[prompt_len:]))) for seq in sequences]


def group_advantages(rewards):
    """r - mean(r) over one problem's samples. No std normalization: a group where all samples agree gets 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return rewards - rewards.mean()


def rollout_batch(sequences, masks, pad_id):
    """Padded (inputs, targets) of shape (N, L-1), L = the longest sequence. Padding is pad_id (<|assistant_end|>);
    a target is -1 where the engine's mask is 0 (prompt, forced tool output) and at padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    sampled = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        sampled[row, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return ids[:, :-1], ids[:, 1:].masked_fill(~sampled[:, 1:], -1)


def pg_loss(logp, targets, advantages, num_passes, examples_per_rank):
    """Policy-gradient loss of one pass. logp (B, T): log-probabilities of the targets; advantages (B,).
    pg = sum(logp * A) / (valid tokens of the pass * passes per problem * problems per rank): token-level
    normalization (DAPO-style), and summing over the rank's passes gives its mean. Returns -pg (minimized)."""
    valid = targets >= 0
    num_valid = valid.sum().clamp(min=1)
    pg = (logp * valid * advantages[:, None]).sum() / (num_valid * num_passes * examples_per_rank)
    return -pg


def pass_at_k(outcomes, k):
    """1 if any of the first k samples is correct."""
    return float(any(outcomes[:k]))


def world_size_error(cfg, world_size):
    """Why `world_size` workers cannot split this config's problems per step evenly ("" if they can)."""
    if cfg.examples_per_step % world_size:
        return f"examples_per_step {cfg.examples_per_step} is not divisible by {world_size} workers"
    return ""


def start_cursor(resume_states, rank, examples_per_step, step):
    """The rank's next global position. Saved cursors make it world-size independent: all ranks consume the
    same number of problems per step, so min(next - rank) is where the global stream stopped."""
    if not resume_states:
        return step * examples_per_step + rank
    return min(s["next"] - s["rank"] for s in resume_states) + rank


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, num_problems, k_max, max_new_tokens, rank, world_size, device):
    """pass@1..k_max on the first num_problems of `task` (rank-strided, summed over ranks). Metric 'GSM8K' is
    pass@1, the report card's number."""
    totals = torch.zeros(k_max + 1, dtype=torch.float64, device=device)  # [0]: problems, [k]: pass@k hits
    for i in range(rank, min(num_problems, len(task)), world_size):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        seqs, _ = engine.generate_batch(prompt, num_samples=k_max, max_tokens=max_new_tokens,
                                        temperature=EVAL_TEMPERATURE, top_k=EVAL_TOP_K)
        outcomes = [task.evaluate(conv, tokenizer.decode(s[len(prompt):])) for s in seqs]
        totals[0] += 1
        for k in range(1, k_max + 1):
            totals[k] += pass_at_k(outcomes, k)
    if is_distributed():
        dist.all_reduce(totals)
    n = max(totals[0].item(), 1.0)
    result = {f"pass@{k}": totals[k].item() / n for k in range(1, k_max + 1)}
    return {"GSM8K": result["pass@1"], **result}


def _sum_all_ranks(values, device):
    """Element-wise sums over all ranks of a list of numbers."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t


# -----------------------------------------------------------------------------
# The worker

def sample_group(engine, prompt, cfg, step, idx):
    """cfg.num_samples completions of one problem, device_batch_size at a time; each pass has its own seed from
    (step, problem, pass), so a rollout is reproducible whatever ran before it. -> (sequences, masks)"""
    sequences, masks = [], []
    for p in range(cfg.num_samples // cfg.device_batch_size):
        seqs, msks = engine.generate_batch(prompt, num_samples=cfg.device_batch_size, max_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, top_k=cfg.top_k,
                                           seed=rollout_seed(step, idx, p))
        sequences += seqs
        masks += msks
    return sequences, masks


def backprop_group(model, inputs, targets, advantages, batch_size, examples_per_rank):
    """Backward of the policy-gradient loss over one problem's samples, batch_size rows per pass (gradients add up
    until the optimizer step). -> the summed loss, detached."""
    device = model.get_device()
    num_passes = len(inputs) // batch_size
    total = torch.zeros((), device=device)
    for p in range(num_passes):
        rows = slice(p * batch_size, (p + 1) * batch_size)
        x, y, a = inputs[rows].to(device), targets[rows].to(device), advantages[rows].to(device)
        logp = -model(x, y, loss_reduction="none").view_as(y)
        loss = pg_loss(logp, y, a, num_passes, examples_per_rank)
        loss.backward()
        total += loss.detach()
    return total


def step_text(line):
    return (f"reward: {line['reward']:.4f} | seq len: {line['seq_len']:.1f} | gen len: {line['gen_len']:.1f} | "
            f"loss: {line['loss']:.6f} | lrm: {line['lrm']:.3f} | dt: {line['dt_ms']:.0f}ms | "
            f"rollout tok/s: {line['rollout_tok_per_sec']:,.0f} ({line['rollout_pct']:.0f}% of step)")


def chat_rl_worker(cfg, ctx=None, run_id=None, resume_step=None, tokenizer=None, train_task=None, test_task=None,
                   step_hook=None, render=rendered_conversations):
    """RL on this worker; returns a summary dict with the final pass@k ('GSM8K' = pass@1). resume_step: continue
    this stage's checkpoint. train_task / test_task replace GSM8K from cfg.task_data (tests); step_hook(step, rank)
    runs before every training step (tests inject failures there); render: where the prompts are rendered
    (nanochat.chat_train.rendered_conversations, or the Ray Data stream)."""
    from nanochat.engine import Engine
    from nanochat.schedules import apply_schedule
    cfg = cfg.resolved()
    ctx = ctx or WorkerContext()
    ctx.wandb = init_wandb(cfg.run, "nanochat-rl", asdict(cfg), ctx.rank)
    device, rank, W = ctx.device, ctx.rank, ctx.world_size
    torch.manual_seed(cfg.seed)
    B = cfg.device_batch_size
    problem = world_size_error(cfg, W)
    if problem:
        raise ValueError(problem)
    if cfg.num_samples % B:
        raise ValueError(f"num_samples {cfg.num_samples} is not a multiple of device_batch_size {B}")
    examples_per_rank = cfg.examples_per_step // W

    tag = cfg.model_tag or storage.basename(ctx.checkpoint_dir)
    model, loaded_tokenizer, source_meta = load_model(cfg.source, device, "train", model_tag=tag,
                                                      step=cfg.model_step if cfg.model_step >= 0 else None,
                                                      base_dir=ctx.base_dir)
    tokenizer = tokenizer or loaded_tokenizer
    engine = Engine(model, tokenizer)  # same module as the one being trained: rollouts are always on-policy
    optimizer = model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                      matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                                      scalar_lr=cfg.scalar_lr)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = group["initial_lr"] * cfg.init_lr_frac

    train_task = train_task if train_task is not None else gsm8k(cfg, "train")
    test_task = test_task if test_task is not None else gsm8k(cfg, "test")
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else \
        max(1, len(train_task) // cfg.examples_per_step * cfg.num_epochs)

    state, loader_states = restore(ctx, resume_step, model, optimizer)
    cursor = start_cursor(loader_states, rank, cfg.examples_per_step, state.step)
    # this rank's problems, step after step, are global positions cursor, cursor+W, ... (cycling over the split):
    # one stride, rendered ahead like the chat stages' conversations (in this process or in Ray Data)
    prompts = render(train_task, tokenizer, None, cursor, W, completion=True)
    print0(f"rl: {len(train_task):,} train problems, {num_iterations} steps, {cfg.examples_per_step} problems x "
           f"{cfg.num_samples} samples per step on {W} workers, from {cfg.source} {tag}")

    pad_id = tokenizer.encode_special("<|assistant_end|>")
    meta = dict(model_config=asdict(model.config), user_config=asdict(cfg), stage="rl", source=cfg.source,
                source_step=source_meta.get("step"), run_id=run_id, device_batch_size=B,
                examples_per_step=cfg.examples_per_step, num_samples=cfg.num_samples)
    final_eval = {}

    def pass_at_k(step):
        final_eval.update(evaluate_pass_at_k(engine, tokenizer, test_task, cfg.eval_examples, B, cfg.max_new_tokens,
                                             rank, W, device))
        return dict(final_eval)

    def rl_step(step, state):
        """Per problem, sample a group, then backprop its passes (weights fixed until the optimizer step, so the
        later problems' samples are still on-policy)."""
        nonlocal cursor
        if step_hook is not None:
            step_hook(step, rank)
        t0 = time.perf_counter()
        rollout_time, loss_sum = 0.0, torch.zeros((), device=device)
        reward_sum = seq_len_sum = gen_tokens = 0.0
        for _ in range(examples_per_rank):
            position, prompt, _ = next(prompts)
            idx = (position - W) % len(train_task)
            conv = train_task[idx]
            tr = time.perf_counter()
            model.eval()
            sequences, masks = sample_group(engine, prompt, cfg, step, idx)
            model.train()
            rollout_time += time.perf_counter() - tr
            rewards = completion_rewards(train_task, conv, sequences, len(prompt), tokenizer)
            reward_sum += sum(rewards)
            seq_len_sum += sum(len(s) for s in sequences)
            gen_tokens += sum(len(s) - len(prompt) for s in sequences)
            inputs, targets = rollout_batch(sequences, masks, pad_id)
            loss_sum += backprop_group(model, inputs, targets, group_advantages(rewards), B, examples_per_rank)
        cursor += cfg.examples_per_step
        lrm = 1.0 - step / num_iterations
        apply_schedule(optimizer, lrm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_samples = examples_per_rank * cfg.num_samples
        totals = _sum_all_ranks([reward_sum, seq_len_sum, gen_tokens, n_samples, loss_sum.item()], device)
        reward, seq_len, gen_len = (totals[:3] / totals[3]).tolist()
        loss_value = totals[4].item() / W  # each rank's summed passes are its mean objective
        dt = time.perf_counter() - t0
        state.total_training_time += dt
        tok_per_sec = totals[2].item() / max(rollout_time, 1e-9)  # all workers' sampled tokens
        line = dict(reward=reward, seq_len=seq_len, gen_len=gen_len, loss=loss_value, lrm=lrm, dt_ms=dt * 1000,
                    rollout_tok_per_sec=tok_per_sec, rollout_pct=100 * rollout_time / dt,
                    total_time=state.total_training_time)
        return StepResult(line, step_text(line), {"rank": rank, "world_size": W, "next": cursor})

    evals = [Eval("pass@k", cfg.eval_every, pass_at_k, at_start=True)]
    state = run_loop(model, optimizer, rl_step, num_iterations=num_iterations, ctx=ctx, evals=evals,
                     save_every=cfg.save_every, meta=meta, loop_state=state,
                     loader_state={"rank": rank, "world_size": W, "next": cursor})
    summary = dict(step=state.step, num_iterations=num_iterations, stage="rl", source=cfg.source,
                   total_training_time=state.total_training_time, checkpoint_dir=ctx.checkpoint_dir, **final_eval,
                   **{f"best_{k}": v for k, v in state.best_eval.items()},
                   **({"resizes": "; ".join(state.resizes)} if state.resizes else {}))
    print0(f"done: {summary}")
    return summary


def log_report(cfg, summary, base_dir=None):
    """The report card's 'Chat RL' section: the config and the final pass@k ('GSM8K' = pass@1)."""
    from nanochat.report import get_report
    results = {k: v for k, v in summary.items() if k == "GSM8K" or k.startswith("pass@") or k in ("step", "resizes")}
    return get_report(base_dir).log("Chat RL", [asdict(cfg), results])


def main(argv=None):
    """One process (or one torchrun rank)."""
    from nanochat.checkpoint_manager import find_resume_step
    from nanochat.train import local_context
    cfg = RLConfig.parse(argv, "RL on GSM8K in one process").resolved()
    root = get_base_dir()
    ctx = local_context(output_dir(cfg, root), cfg.device_type, cfg.seed, base_dir=root)
    resume_step = find_resume_step(ctx.checkpoint_dir) if cfg.resume else None
    summary = chat_rl_worker(cfg, ctx, run_id=uuid.uuid4().hex, resume_step=resume_step)
    log_report(cfg, summary, root)
    return summary


if __name__ == "__main__":
    main()
