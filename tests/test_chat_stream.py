"""Ray Data rendering for mid / SFT: the same batches and resume states as rendering in the training process."""
import functools
import itertools

import torch

from nanochat.chat_train import packed_conversations, padded_conversations
from ray_jobs.chat_stream import ray_rendered_conversations
from test_chat_train import CONVS

# tiny jobs, so a stream crosses several Ray Data jobs (and, for SFT, epochs)
RAY = functools.partial(ray_rendered_conversations, num_actors=1, block=4, job_size=16)


def same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya, sa), (xb, yb, sb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb


def test_packed_and_padded_batches_are_identical_to_the_plain_path(tiny_tokenizer, ray_local):
    rank = 1  # midtraining: one pass, packed, resumed from the state after the 2nd batch
    plain = list(packed_conversations(CONVS, tiny_tokenizer, 2, 24, rank, 2, "cpu", buffer_size=4))
    resume = [plain[1][2], {**plain[1][2], "rank": 0, "next": plain[1][2]["next"] - 1}]
    same(list(packed_conversations(CONVS, tiny_tokenizer, 2, 24, rank, 2, "cpu", resume, buffer_size=4)),
         list(packed_conversations(CONVS, tiny_tokenizer, 2, 24, rank, 2, "cpu", resume, buffer_size=4, render=RAY)))
    # SFT: padded rows, endless epochs (40 conversations, 20 per rank: 15 batches of 3 cross into epoch 3)
    plain = list(itertools.islice(padded_conversations(CONVS, tiny_tokenizer, 3, 64, rank, 2, "cpu"), 15))
    same(plain, list(itertools.islice(padded_conversations(CONVS, tiny_tokenizer, 3, 64, rank, 2, "cpu",
                                                           render=RAY), 15)))
    assert plain[-1][2]["next"] > 2 * len(CONVS)
