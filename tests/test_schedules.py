"""The depth dial's derived quantities (checked against worked numbers and against nanochat's formulas, written out
here) and the step schedules."""
import math

import pytest

from nanochat.gpt import GPTConfig, build_model
from nanochat.schedules import (apply_schedule, derive_hyperparameters, grad_accum_steps, lr_multiplier,
                                muon_momentum, muon_weight_decay)


@pytest.mark.parametrize("depth,ratio,log2_batch,steps", [
    (12, 12, 19, 2520), (20, 12, 20, 4980), (24, 8, 20, 5568), (8, 12, 18, None), (32, 12, 21, None),
])
def test_auto_batch_and_horizon_match_spec(depth, ratio, log2_batch, steps):
    h = derive_hyperparameters(GPTConfig.from_depth(depth), target_param_data_ratio=ratio)
    assert h["total_batch_size"] == 2**log2_batch
    if steps is not None:
        assert h["num_iterations"] == steps
    assert h["batch_lr_scale"] == pytest.approx((2**log2_batch / 2**19) ** 0.5)


def test_d24_speedrun_weight_decay_and_tokens():
    h = derive_hyperparameters(GPTConfig.from_depth(24), target_param_data_ratio=8)
    assert h["weight_decay"] == pytest.approx(0.0597, abs=1e-4)
    assert h["total_tokens"] / 1e9 == pytest.approx(5.84, abs=0.01)


def test_horizon_precedence():
    cfg = GPTConfig.from_depth(4, sequence_len=256, vocab_size=4096)
    assert derive_hyperparameters(cfg, num_iterations=7, target_flops=1e30)["num_iterations"] == 7
    h = derive_hyperparameters(cfg, total_batch_size=4096, target_flops=1e15)
    flops_per_token = build_model(cfg).estimate_flops()
    assert h["num_iterations"] == round(1e15 / (flops_per_token * 4096)) and h["total_batch_size"] == 4096


def test_grad_accum_exact_division():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(2**20, 16, 2048, 8) == 4
    assert grad_accum_steps(4096, 4, 256, 1) == 4 and grad_accum_steps(4096, 4, 256, 2) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_steps(1000, 4, 256, 1)


def test_lr_schedule_shape():
    N = 1000
    assert lr_multiplier(0, N) == pytest.approx(1 / 40)
    assert lr_multiplier(39, N) == 1.0 and lr_multiplier(350, N) == 1.0
    assert lr_multiplier(N, N) == pytest.approx(0.05)
    mid = lr_multiplier(N - 325, N)
    assert mid == pytest.approx(0.5 + 0.5 * 0.05)
    values = [lr_multiplier(s, N) for s in range(40, N + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases after warmup


def test_momentum_and_weight_decay_schedules():
    N = 2000
    assert muon_momentum(0, N) == pytest.approx(0.85)
    assert muon_momentum(400, N) == pytest.approx(0.97)
    assert muon_momentum(N, N) == pytest.approx(0.90)
    assert muon_weight_decay(0, N, 0.2) == 0.2 and muon_weight_decay(N, N, 0.2) == pytest.approx(0.0)
    assert muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)


def nanochat_momentum(it, num_iterations, warmdown_ratio):
    """nanochat's get_muon_momentum (scripts/base_train.py), written out."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    elif it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


@pytest.mark.parametrize("num_iterations,warmdown_ratio", [(50, 0.65), (320, 0.65), (1000, 0.65), (1149, 0.65),
                                                          (2520, 0.65), (4980, 0.4), (600, 0.0), (300, 1.0)])
def test_muon_momentum_is_nanochats(num_iterations, warmdown_ratio):
    # regression: short runs (< ~1150 steps) stopped the ramp where the warmdown began and decayed from below 0.97
    for step in range(num_iterations):
        assert muon_momentum(step, num_iterations, warmdown_ratio) == nanochat_momentum(step, num_iterations,
                                                                                         warmdown_ratio), step


def nanochat_hyperparameters(depth, aspect_ratio, head_dim, seq_len, vocab, ratio, weight_decay=0.28,
                             num_iterations=-1):
    """nanochat's batch size, horizon and weight decay (scripts/base_train.py), written out: the d12 reference is built
    with the run's aspect ratio and head dim; weight decay scales by the ratio's token target."""
    def scaling(d):
        width = -(-d * aspect_ratio // head_dim) * head_dim
        padded = -(-vocab // 64) * 64
        ve_gates = (d + 1) // 2 * (width // head_dim) * 12  # on alternating layers, the last included
        return d * 12 * width * width + ve_gates + padded * width  # attention 4 C^2 + MLP 8 C^2 per layer; lm_head
    target_tokens = int(ratio * scaling(depth))
    d_ref = ratio * scaling(12)
    batch = 2 ** round(math.log2(2**19 * (target_tokens / d_ref) ** 0.383))
    steps = num_iterations if num_iterations > 0 else target_tokens // batch
    return batch, steps, weight_decay * math.sqrt(batch / 2**19) * (d_ref / target_tokens)


@pytest.mark.parametrize("depth,aspect_ratio,head_dim,seq_len,vocab,ratio,num_iterations", [
    (12, 64, 128, 2048, 32768, 12, -1), (20, 64, 128, 2048, 65536, 10.5, -1), (24, 64, 128, 2048, 32768, 8, -1),
    (4, 32, 64, 256, 4096, 12, -1), (4, 32, 64, 256, 4096, 12, 320), (6, 48, 64, 512, 8192, 20, 50),
    (2, 64, 128, 128, 2048, 12, 30),
])
def test_batch_horizon_and_weight_decay_are_nanochats(depth, aspect_ratio, head_dim, seq_len, vocab, ratio,
                                                      num_iterations):
    config = GPTConfig.from_depth(depth, aspect_ratio, head_dim, sequence_len=seq_len, vocab_size=vocab)
    h = derive_hyperparameters(config, ratio, num_iterations=num_iterations, aspect_ratio=aspect_ratio,
                               head_dim=head_dim)
    batch, steps, wd = nanochat_hyperparameters(depth, aspect_ratio, head_dim, seq_len, vocab, ratio,
                                                num_iterations=num_iterations)
    assert (h["total_batch_size"], h["num_iterations"]) == (batch, steps)
    assert h["weight_decay"] == pytest.approx(wd, rel=1e-12) and h["weight_decay_rule"] == h["weight_decay"]


def test_apply_schedule_rewrites_from_initial_values():
    model = build_model(GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    opt = model.setup_optimizer(weight_decay=0.2)
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)  # idempotent: not compounding
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5)
        if g["kind"] == "muon":
            assert g["momentum"] == 0.9 and g["weight_decay"] == 0.1


def test_weight_decay_cap_is_explicit():
    # a 30-step toy run takes the rule's decay for its ratio target, not for the 30 steps (that was ~300)
    config = GPTConfig.from_depth(2, sequence_len=128, vocab_size=2048)
    h = derive_hyperparameters(config, total_batch_size=1024, num_iterations=30)
    assert h["weight_decay"] == h["weight_decay_rule"] == derive_hyperparameters(config, total_batch_size=1024)[
        "weight_decay"]
    assert 1.0 < h["weight_decay"] < 3.0
    capped = derive_hyperparameters(config, total_batch_size=1024, num_iterations=30, weight_decay_cap=1.0)
    assert capped["weight_decay"] == 1.0 and capped["weight_decay_rule"] == h["weight_decay"]
