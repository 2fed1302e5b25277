"""nanochat/lm_loss.py: the fused lm_head + softcap + cross-entropy gives the plain path's loss and gradients, over
several chunks, a padded vocabulary and ignored targets; it stands in only where gradients of a mean loss are
wanted; and its peak memory is a chunk's logits, not all of them."""
import pytest
import torch
import torch.nn.functional as F

from nanochat import lm_loss
from nanochat.fake_cuda import MemoryMeter
from nanochat.lm_loss import fused_loss_applies, lm_head_loss

N, C, V, PADDED, CAP = 96, 32, 250, 256, 15.0


def plain_loss(x, weight, targets):
    logits = F.linear(x, weight.to(x.dtype))[:, :V].float()
    return F.cross_entropy(CAP * torch.tanh(logits / CAP), targets, ignore_index=-1)


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(PADDED, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -1
    return x, weight, targets


@pytest.mark.parametrize("chunk_rows", [N, 10])  # one chunk; ten chunks, the last one short
def test_loss_and_gradients_are_the_plain_paths(chunk_rows, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", chunk_rows * V)
    x, weight, targets = inputs()
    (2.5 * plain_loss(x, weight, targets)).backward()  # a scaled loss (as gradient accumulation scales it)
    expected = [t.grad.clone() for t in (x, weight)]
    x.grad = weight.grad = None
    loss = lm_head_loss(x, weight, targets, V, CAP)
    (2.5 * loss).backward()
    torch.testing.assert_close(loss, plain_loss(x, weight, targets))
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])
    assert weight.grad.dtype == torch.float32 and (weight.grad[V:] == 0).all()  # padded rows: no gradient


def test_bf16_activations_stay_close_to_the_plain_path():
    x, weight, targets = inputs(torch.bfloat16)
    plain_loss(x, weight, targets).backward()
    expected = [t.grad.clone() for t in (x, weight)]
    x.grad = weight.grad = None
    loss = lm_head_loss(x, weight, targets, V, CAP)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss(x, weight, targets), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x.grad.float(), expected[0].float(), rtol=0.05, atol=1e-4)
    torch.testing.assert_close(weight.grad, expected[1], rtol=0.05, atol=1e-4)


def test_only_a_mean_loss_with_gradients_is_fused():
    x, weight, _ = inputs()
    assert fused_loss_applies(x, weight, "mean")
    assert not fused_loss_applies(x, weight, "none")  # per-token losses (RL, bpb): the plain path
    with torch.no_grad():
        assert not fused_loss_applies(x, weight, "mean")  # evaluation: nothing to differentiate
    assert not fused_loss_applies(x.detach(), weight.detach(), "mean")


def test_peak_memory_is_a_chunk_of_logits(monkeypatch):
    """At 4096 tokens x 4096 vocabulary (64 MB of fp32 logits), the plain path's forward and backward hold several
    logit-sized tensors at once; the fused one, in chunks of 256 rows, a few chunk-sized ones."""
    big_n, big_v = 4096, 4096
    x = torch.randn(big_n, 64, requires_grad=True)
    weight = (torch.randn(big_v, 64) * 0.1).requires_grad_()
    targets = torch.randint(0, big_v, (big_n,))
    logits_bytes = big_n * big_v * 4
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 256 * big_v)
    peaks = {}
    for name, fn in (("plain", lambda: F.cross_entropy(CAP * torch.tanh(F.linear(x, weight).float() / CAP), targets)),
                     ("fused", lambda: lm_head_loss(x, weight, targets, big_v, CAP))):
        meter = MemoryMeter()
        with meter:
            fn().backward()
        peaks[name] = meter.peak
    assert peaks["plain"] > 2 * logits_bytes and peaks["fused"] < 0.5 * logits_bytes, peaks
