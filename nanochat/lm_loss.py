"""
The training loss of the language-model head, fused: lm_head, logit softcap and mean cross-entropy over chunks of
rows, with the gradients computed on the way forward (as Liger's fused linear cross-entropy does). The full
(tokens x vocab) logits never exist at once: at nanochat's d20 batch (64k tokens x 64k vocabulary) they alone are
17 GB in fp32, held several times over by the plain path (softcap, log-softmax, their gradients). The plain path
stays for everything else: logits, per-token losses, evaluation without gradients.
"""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 27  # logits per chunk (512 MB fp32): on a CPU large chunks are fastest; on a GPU it bounds memory


def fused_loss_applies(x, weight, loss_reduction):
    """Whether the fused loss can stand in: a mean loss whose gradients are wanted (its backward only scales what
    the forward computed)."""
    return loss_reduction == "mean" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def lm_head_loss(x, weight, targets, vocab_size, softcap):
    """mean over targets != -1 of cross_entropy(softcap * tanh(x @ weight[:vocab_size].T / softcap), targets);
    x: (N, C) in the compute dtype, weight: (V_padded, C) master weight (cast to x's dtype as Linear does)."""
    return _LMHeadLoss.apply(x, weight, targets, vocab_size, softcap)


class _LMHeadLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap):
        w = weight[:vocab_size].to(x.dtype)
        valid = targets != -1
        count = valid.sum().clamp_min(1)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(vocab_size, x.size(1), dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_ELEMENTS // vocab_size)
        for start in range(0, x.size(0), rows):
            xc, tc, vc = x[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            capped = torch.tanh(F.linear(xc, w).float().div_(softcap))  # tanh(z / cap); the logits are cap * it
            logits = capped * softcap
            target = tc.clamp_min(0)[:, None]
            target_logit = logits.gather(1, target)[:, 0]
            # softmax in place, in ops a memory meter sees (logsumexp would hide a temporary as large as the logits)
            row_max = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(row_max).exp_()
            sum_exp = grad.sum(dim=-1, keepdim=True)
            total += ((row_max + sum_exp.log())[:, 0] - target_logit).mul_(vc).sum()
            # d loss / d z = (softmax - onehot) * (1 - tanh^2) / count, on valid rows
            grad.div_(sum_exp).scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad.mul_(capped.square_().neg_().add_(1)).mul_((vc / count)[:, None])
            grad = grad.to(x.dtype)
            grad_x[start:start + rows] = grad @ w
            if grad.dtype == grad_w.dtype:
                grad_w.addmm_(grad.t(), xc)
            else:  # a bf16 matmul, as the plain path's, summed over the chunks in fp32
                grad_w += grad.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.padded_rows = weight.size(0) - vocab_size
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        grad_w = F.pad(grad_w, (0, 0, 0, ctx.padded_rows)) if ctx.padded_rows else grad_w
        return grad_x * grad_out.to(grad_x.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None, None
