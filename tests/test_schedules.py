"""The depth dial's derived quantities (checked against worked numbers) and the step schedules."""
import pytest

from nanochat.gpt import GPTConfig, build_model
from nanochat.schedules import (apply_schedule, derive_hyperparameters, grad_accum_steps, lr_multiplier,
                                muon_momentum, weight_decay_factor)


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
    assert weight_decay_factor(0, N) == 1.0 and weight_decay_factor(N, N) == pytest.approx(0.0)
    assert weight_decay_factor(N // 2, N) == pytest.approx(0.5)


def test_apply_schedule_rewrites_from_initial_values():
    model = build_model(GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    opt = model.setup_optimizer(weight_decay=0.2)
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)  # idempotent: not compounding
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5)
        if g["kind"] == "muon":
            assert g["momentum"] == 0.9 and g["weight_decay"] == 0.1


def test_weight_decay_capped_for_toy_runs():
    # regression: a 30-step toy run derived a Muon weight decay of ~300, wiping the weights every step
    h = derive_hyperparameters(GPTConfig.from_depth(2, sequence_len=128, vocab_size=2048), total_batch_size=1024,
                               num_iterations=30)
    assert h["weight_decay"] == 1.0
