"""
What the single --depth dial derives, and the per-step schedules. Pure functions: easy to test,
identical under every launcher.
"""
import math

import torch

from nanochat.gpt import GPT, GPTConfig

B_REF = 2**19  # reference total batch (tokens) of the d12 tuning runs
REF_DEPTH = 12
MAX_WEIGHT_DECAY = 1.0


def scaling_params(config):
    """Kaplan-style parameter count (transformer matrices + lm_head) without allocating the model."""
    with torch.device("meta"):
        return GPT(config).num_scaling_params()["scaling"]


def auto_total_batch_size(target_tokens, ref_tokens):
    """Power-lines rule B_opt ∝ D^0.383 anchored at 2^19 tokens for the d12 reference, rounded to a power of 2."""
    return 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** 0.383))


def derive_hyperparameters(config, target_param_data_ratio=12.0, total_batch_size=-1, num_iterations=-1,
                           target_flops=-1.0, weight_decay=0.28, tokens_per_fwdbwd=None):
    """Horizon, batch size, lr scale and weight decay from the model and the horizon flags, in nanochat's order of
    precedence (explicit iterations > target FLOPs > data:param ratio). Returns a dict."""
    n_scaling = scaling_params(config)
    ref_config = GPTConfig.from_depth(REF_DEPTH, sequence_len=config.sequence_len, vocab_size=config.vocab_size)
    ref_tokens = target_param_data_ratio * scaling_params(ref_config)
    target_tokens = target_param_data_ratio * n_scaling
    if total_batch_size <= 0:
        total_batch_size = auto_total_batch_size(target_tokens, ref_tokens)
        if tokens_per_fwdbwd is not None:  # tiny models: never below one forward/backward of all workers
            total_batch_size = max(total_batch_size, tokens_per_fwdbwd)
    if num_iterations <= 0 and target_flops > 0:
        with torch.device("meta"):
            flops_per_token = GPT(config).estimate_flops()
        num_iterations = round(target_flops / (flops_per_token * total_batch_size))
    elif num_iterations <= 0:
        num_iterations = int(target_tokens // total_batch_size)
    num_iterations = max(num_iterations, 1)
    batch_ratio = total_batch_size / B_REF
    tokens = num_iterations * total_batch_size
    # weight decay follows the T_epoch rule: scale with sqrt(B) and inversely with the tokens seen. For toy runs
    # (thousands of times fewer tokens than the reference) that rule explodes, so it is capped at MAX_WEIGHT_DECAY.
    scaled_wd = min(weight_decay * batch_ratio ** 0.5 * (ref_tokens / tokens), MAX_WEIGHT_DECAY)
    return dict(
        num_scaling_params=n_scaling,
        total_batch_size=total_batch_size,
        num_iterations=num_iterations,
        total_tokens=tokens,
        batch_lr_scale=batch_ratio ** 0.5,
        weight_decay=scaled_wd,
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
    warmdown_start = num_iterations - round(warmdown_ratio * num_iterations)
    if step < ramp_steps and step < warmdown_start:
        return start + (peak - start) * step / ramp_steps
    if step <= warmdown_start:
        return peak
    frac = (step - warmdown_start) / max(num_iterations - warmdown_start, 1)
    return peak + (end - peak) * frac


def weight_decay_factor(step, num_iterations):
    """Cosine decay of Muon weight decay from 1x to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * step / max(num_iterations, 1)))


def apply_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """Rewrite every group's hyperparameters from its initial values (schedules are stateless)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
