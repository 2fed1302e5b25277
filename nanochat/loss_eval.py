"""
Bits per byte: a tokenizer-independent validation loss.

Mean cross-entropy per token changes with the vocabulary, so instead the summed loss (nats) is divided by the number
of UTF-8 bytes the target tokens stand for, then converted to bits. Targets with 0 bytes (special tokens such as
<|bos|>) and ignored targets (-1) count in neither the numerator nor the denominator.
"""
import math

import torch
import torch.distributed as dist

from nanochat.common import is_distributed


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """bpb over up to `steps` (x, y) batches from the iterator `batches`, summed over all ranks when distributed.
    A validation split smaller than steps batches is used whole (ranks may differ in count: only the sums are
    reduced); no batch at all on every rank gives inf. token_bytes: int tensor [V], bytes per token id (0 for
    specials), on the model's device."""
    device = model.get_device()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").view(-1)  # nats per target, 0 where y == -1
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        total_nats += torch.where(nbytes > 0, loss, 0.0).sum(dtype=acc_dtype)
        total_bytes += nbytes.sum()
    if is_distributed():  # global sums first, then one division: ranks with more bytes weigh more
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()  # host sync: the result, once per eval
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)  # host sync: the result
