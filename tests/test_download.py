"""The data stage as Ray tasks: shards stream from a local HTTP server straight into an S3 bucket (moto)."""
import pytest

from nanochat import storage
from nanochat.dataset import DownloadError, is_valid_parquet, resolve_source, shard_name
from ray_jobs.download import download, main
from test_dataset import ShardServer, refusing_url, shard_texts, write_parquet

FAST = dict(backoff=0.001, timeout=5, progress=False)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    for i in [0, 1, 3, 6542]:  # shard 2 is missing: 404
        write_parquet(root / shard_name(i), shard_texts(i))
    s = ShardServer(str(root))
    yield s
    s.close()


def test_download_to_bucket_retries_fails_naming_the_404_and_rerun_fetches_only_it(server, s3_root, ray_local,
                                                                                    monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", s3_root)
    data_dir = storage.join(s3_root, "base_data_climbmix")
    server.fail_first[shard_name(1)] = 2  # 500, 500, then 200
    with pytest.raises(DownloadError) as e:
        download(3, base_url=server.url, max_attempts=4, **FAST)
    msg = str(e.value)
    assert "1 of 4 shards failed" in msg and shard_name(2) in msg and "404" in msg
    assert server.hits[shard_name(2)] == 1 and server.hits[shard_name(1)] == 3
    assert sorted(storage.listdir(data_dir)) == [shard_name(i) for i in (0, 1, 6542)]  # no temp objects left
    assert all(is_valid_parquet(storage.join(data_dir, shard_name(i))) for i in (0, 1, 6542))

    write_parquet(tmp_path / "hub" / shard_name(2), shard_texts(2))  # the mirror catches up
    before = dict(server.hits)
    assert main(["-n", "3", "--base-url", server.url, "--backoff", "0.001", "--storage", s3_root]) == 0
    fetched = {name for name, n in server.hits.items() if n > before.get(name, 0)}
    assert fetched == {shard_name(2)}  # the re-run fetched only what was missing
    src = resolve_source("climbmix")  # the bucket's shards are the hub source now
    assert len(src.units("train")) == 3 * 3 and src.read_unit(src.units("val")[0]) == shard_texts(6542)[:4]


def test_an_unreachable_server_fails_the_stage_before_any_task(ray_local, tmp_path):
    """The Ray fan-out probes the server before it submits a task (the data stage of d20 / d24 goes this way)."""
    url = refusing_url()
    with pytest.raises(DownloadError, match=rf"cannot reach the shard server for {url}/"):
        download(370, base_url=url, data_dir=str(tmp_path), progress=False)
    assert not list(tmp_path.rglob("*.parquet*"))
