"""
The data stage: download pretraining shards as Ray tasks spread over the cluster, straight into the storage root.

    python -m ray_jobs.download -n N [-w 16] [--source climbmix|fineweb] [--base-url URL] [--data-dir DIR]
        [--storage ROOT]          (python -m nanochat.dataset takes the same flags and downloads in threads)

Each task streams one shard from the mirror into ROOT/<source dir>/ (nanochat.dataset.download_shard: length and
parquet-footer checks, retries with backoff and jitter on transient errors, no retry on 4xx). Tasks are spread
over the nodes, at most --workers in flight; a re-run fetches only what is missing or invalid. A failed or partial
download fails the stage with an error naming every missing shard.
"""
import sys

from nanochat import dataset
from nanochat.dataset import DEFAULT_HUB, DownloadError, download_shard, raise_for_failures, shard_plan, shards_to_fetch
from ray_jobs.common import init_ray


def download(num_train_shards=-1, *, source=DEFAULT_HUB, data_dir=None, base_url=None, workers=16, max_attempts=5,
             backoff=2.0, timeout=30, progress=True):
    """Like nanochat.dataset.download_shards, but each shard is a Ray task (SPREAD over the nodes). -> paths."""
    from tqdm import tqdm
    ray = init_ray()
    fetch = ray.remote(num_cpus=0.25, max_retries=0)(download_shard)  # retries happen inside, with backoff
    plan = shard_plan(num_train_shards, source=source, data_dir=data_dir, base_url=base_url)
    queue, running, failures = shards_to_fetch(plan, timeout), {}, {}  # a dead server fails here, naming its URL
    with tqdm(total=len(queue), unit="shard", desc=f"{source} shards", disable=not progress) as bar:
        while queue or running:
            while queue and len(running) < max(1, workers):
                url, path = queue.pop(0)
                ref = fetch.options(scheduling_strategy="SPREAD").remote(
                    url, path, max_attempts=max_attempts, backoff=backoff, timeout=timeout)
                running[ref] = path
            done, _ = ray.wait(list(running), num_returns=1)
            path = running.pop(done[0])
            try:
                ray.get(done[0])
            except DownloadError as e:  # Ray re-raises the task's exception as a subclass of its type
                failures[path] = str(getattr(e, "cause", None) or e).strip().splitlines()[-1]
            bar.update(1)
    raise_for_failures(failures, len(plan))
    return [path for _, path in plan]


def main(argv=None):
    """The Ray-free command line of nanochat.dataset, downloading through the Ray fan-out."""
    return dataset.main(argv, download=download, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
