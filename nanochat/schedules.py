"""
What the single --depth dial derives, and the per-step schedules. Pure functions: easy to test,
identical under every launcher.
"""
import math

import torch

from nanochat.gpt import GPT, GPTConfig

B_REF = 2**19  # reference total batch (tokens) of the d12 tuning runs
REF_DEPTH = 12


def scaling_params(config):
    """Kaplan-style parameter count (transformer matrices + lm_head) without allocating the model."""
    with torch.device("meta"):
        return GPT(config).num_scaling_params()["scaling"]


def auto_total_batch_size(target_tokens, ref_tokens):
    """Power-lines rule B_opt ∝ D^0.383 anchored at 2^19 tokens for the d12 reference, rounded to a power of 2."""
    return 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** 0.383))


def derive_hyperparameters(config, target_param_data_ratio=12.0, total_batch_size=-1, num_iterations=-1,
                           target_flops=-1.0, weight_decay=0.28, tokens_per_fwdbwd=None, aspect_ratio=64,
                           head_dim=128, weight_decay_cap=0.0):
    """Horizon, batch size, lr scale and weight decay from the model and the horizon flags, in nanochat's order of
    precedence (explicit iterations > target FLOPs > data:param ratio). The d12 reference model is built with the
    run's aspect_ratio and head_dim. Returns a dict."""
    n_scaling = scaling_params(config)
    ref_config = GPTConfig.from_depth(REF_DEPTH, aspect_ratio, head_dim, sequence_len=config.sequence_len,
                                      vocab_size=config.vocab_size, window_pattern=config.window_pattern)
    ref_tokens = target_param_data_ratio * scaling_params(ref_config)
    target_tokens = int(target_param_data_ratio * n_scaling)
    if total_batch_size <= 0:
        total_batch_size = auto_total_batch_size(target_tokens, ref_tokens)
        if tokens_per_fwdbwd is not None:  # tiny models: never below one forward/backward of all workers
            total_batch_size = max(total_batch_size, tokens_per_fwdbwd)
    if num_iterations <= 0 and target_flops > 0:
        with torch.device("meta"):
            flops_per_token = GPT(config).estimate_flops()
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
    elif num_iterations <= 0:
        num_iterations = target_tokens // total_batch_size
    num_iterations = max(num_iterations, 1)
    batch_ratio = total_batch_size / B_REF
    # weight decay follows the T_epoch rule: scale with sqrt(B) and inversely with the data:param ratio's token target
    # (not the tokens an explicit --num-iterations trains). Small models get a large decay; weight_decay_cap > 0
    # bounds it (off by default, as in nanochat).
    rule_wd = weight_decay * math.sqrt(total_batch_size / B_REF) * (ref_tokens / target_tokens)
    return dict(
        num_scaling_params=n_scaling,
        total_batch_size=total_batch_size,
        num_iterations=num_iterations,
        total_tokens=num_iterations * total_batch_size,
        batch_lr_scale=batch_ratio ** 0.5,
        weight_decay=min(rule_wd, weight_decay_cap) if weight_decay_cap > 0 else rule_wd,
        weight_decay_rule=rule_wd,
    )


def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    per_step = device_batch_size * seq_len * world_size
    if total_batch_size % per_step != 0:
        raise ValueError(f"total batch {total_batch_size} tokens is not a multiple of device_batch_size*seq_len*"
                         f"world_size = {device_batch_size}*{seq_len}*{world_size} = {per_step}")
    return total_batch_size // per_step


# -----------------------------------------------------------------------------
# Base training schedules (NEW): warmup, flat, linear warmdown to final_lr_frac; Muon momentum ramp and decay;
# cosine weight decay.

def lr_multiplier(step, num_iterations, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05):
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / max(warmdown_iters, 1)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, num_iterations, warmdown_ratio=0.65, ramp_steps=400, start=0.85, peak=0.97, end=0.90):
    """Ramp start -> peak over the first ramp_steps (whatever the warmdown), hold peak, and from the warmdown's start
    decay peak -> end (linear in each part)."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < ramp_steps:
        frac = step / ramp_steps
        return (1 - frac) * start + frac * peak
    if step >= warmdown_start:
        progress = (step - warmdown_start) / max(warmdown_iters, 1)
        return peak * (1 - progress) + end * progress
    return peak


def muon_weight_decay(step, num_iterations, weight_decay):
    """Cosine decay of Muon's weight decay from weight_decay to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / max(num_iterations, 1)))


def apply_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """Rewrite every group's hyperparameters from its initial values (schedules are stateless)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
