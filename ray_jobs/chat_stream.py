"""
Ray Data feeding midtraining, SFT and RL: conversations (RL: prompts) rendered and tokenized in a CPU actor pool,
in the worker's order.

`ray_rendered_conversations` has the signature and output of nanochat.chat_train.rendered_conversations (one
worker's conversations start, start+W, ... as (next_index, ids, mask)), so the batchers (packing for mid, padding
for SFT), their resume states and the batches themselves are identical to the plain path. Per Ray Data job:

    from_numpy(indices)              a block per `block` conversations
    -> map_batches(_Render)          CPU actor pool: dataset and tokenizer loaded once per actor
    -> iter_batches, preserve_order  on the worker, in index order

A job covers `job_size` conversations; the next starts when it is drained (a few seconds of start-up).
"""
import functools

import numpy as np
import pyarrow as pa

from nanochat.chat_train import render
from ray_jobs.common import pick_loader


class _Render:
    """Actor stage: renders conversations dataset[i % len] with the chat template (nanochat.chat_train.render:
    ids and supervision mask, or RL's prompt to complete)."""

    def __init__(self, dataset, tokenizer, max_tokens, completion):
        self.dataset, self.tokenizer, self.max_tokens, self.completion = dataset, tokenizer, max_tokens, completion

    def __call__(self, batch):
        n = len(self.dataset)
        rendered = [render(self.tokenizer, self.dataset[i % n], self.max_tokens, self.completion)
                    for i in batch["data"].tolist()]
        masks = None if self.completion else [mask for _, mask in rendered]
        return pa.table({"index": pa.array(batch["data"], pa.int64()),
                         "ids": pa.array([ids for ids, _ in rendered], pa.list_(pa.int32())),
                         "mask": pa.array(masks or [None] * len(rendered), pa.list_(pa.int8()))})


def ray_rendered_conversations(dataset, tokenizer, max_tokens, start, step, stop=None, completion=False, *,
                               num_actors=2, actor_cpus=0.5, block=64, job_size=4096):
    """Same as nanochat.chat_train.rendered_conversations, rendered in a Ray Data actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy
    index = start
    while stop is None or index < stop:
        end = index + step * job_size if stop is None else min(index + step * job_size, stop)
        indices = np.arange(index, end, step, dtype=np.int64)
        ds = ray.data.from_numpy(np.array_split(indices, max(1, -(-len(indices) // block))))  # a block each
        ds = ds.map_batches(_Render, batch_size=None, batch_format="numpy", num_cpus=actor_cpus,
                            compute=ActorPoolStrategy(size=num_actors),
                            fn_constructor_args=(dataset, tokenizer, max_tokens, completion))
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4))
        try:
            for table in batches:
                for i, ids, mask in zip(*(table.column(c).to_pylist() for c in ("index", "ids", "mask"))):
                    yield i + step, ids, mask
        finally:
            if hasattr(batches, "close"):
                batches.close()  # a consumer that stops early shuts the job (and its actors) down now
        index = int(indices[-1]) + step


def render_kwargs(run, cfg, root, num_workers):
    """The worker kwargs that make a chat stage (mid, SFT, RL) render in Ray Data when --loader picks it."""
    if pick_loader(run.loader, num_workers, run.cpus_per_worker) != "ray":
        return {}
    return {"render": functools.partial(ray_rendered_conversations, num_actors=run.data_actors)}
