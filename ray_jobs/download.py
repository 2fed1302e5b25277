"""
The data stage: download pretraining shards as Ray tasks spread over the cluster, straight into the storage root.

    python -m ray_jobs.download -n N [-w 16] [--source climbmix|fineweb] [--base-url URL] [--data-dir DIR]
        [--storage ROOT]          (same as: python -m nanochat.dataset -n N ...)

Each task streams one shard from the mirror into ROOT/<source dir>/ (nanochat.dataset.download_shard: length and
parquet-footer checks, retries with backoff and jitter on transient errors, no retry on 4xx). Tasks are spread
over the nodes, at most --workers in flight; a re-run fetches only what is missing or invalid. A failed or partial
download fails the stage with an error naming every missing shard.
"""
import logging
import sys
from dataclasses import dataclass

from nanochat.dataset import (DATA_URL_ENV, DEFAULT_HUB, HUB_ALIASES, HUB_SOURCES, DownloadError,
                              download_shard, raise_for_failures, shard_plan, shards_to_fetch)
from nanochat.flags import ArgsMixin, flag, storage_flag
from ray_jobs.common import init_ray, storage_root

logger = logging.getLogger("nanochat")


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


@dataclass
class DownloadConfig(ArgsMixin):
    num_files: int = flag(-1, "train shards to download (-1 = all)", aliases=["-n"])
    num_workers: int = flag(16, "downloads in flight at once", aliases=["-w"])
    source: str = flag(DEFAULT_HUB, "which shuffle to download", aliases=["--dataset"],
                       choices=sorted(HUB_SOURCES) + sorted(HUB_ALIASES))
    base_url: str | None = flag(None, f"mirror base URL (default ${DATA_URL_ENV} or the Hub)")
    data_dir: str | None = flag(None, "target directory or URI (default: <storage root>/base_data_climbmix or "
                                      "base_data)", aliases=["--dir"])
    max_attempts: int = flag(5, "tries per shard on transient errors")
    backoff: float = flag(2.0, "first retry delay in seconds (doubles)")
    storage: str | None = storage_flag()


def main(argv=None):
    args = DownloadConfig.parse(argv, __doc__)
    from nanochat.common import setup_default_logging
    setup_default_logging()
    storage_root(args.storage)
    try:
        paths = download(args.num_files, source=args.source, data_dir=args.data_dir, base_url=args.base_url,
                         workers=args.num_workers, max_attempts=args.max_attempts, backoff=args.backoff)
    except DownloadError as e:
        logger.error("%s", e)
        return 1
    print(f"{len(paths)} shards ready in {paths[0].rsplit('/', 1)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
