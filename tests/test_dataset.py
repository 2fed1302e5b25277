"""Pretraining data sources: shard download against a local HTTP server, local files, the offline fallback corpus."""
import gzip
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (DownloadError, Unit, download_or_fallback, download_shards, hub_source,
                              is_valid_parquet, parquets_iter_batched, resolve_source, shard_name)

FAST = dict(backoff=0.001, timeout=5, progress=False)  # keep retries instant in tests


def write_parquet(path, texts, row_group_size=4, **extra_columns):
    table = pa.table({"text": texts, **extra_columns}) if texts is not None else pa.table(extra_columns)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def shard_texts(i, n=10):
    return [f"Shard {i} document {j}: the quick brown fox jumps over the lazy dog." for j in range(n)]


# -----------------------------------------------------------------------------
# a tiny shard server: counts downloads (GETs) per file, can truncate a file's first response or return 404; a HEAD
# (the reachability probe) only says whether the file is there

class ShardServer:
    def __init__(self, root):
        self.root, self.hits, self.truncate_once, self.fail_first = root, Counter(), {}, {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, body):
                name = self.path.lstrip("/")
                path = os.path.join(server.root, name)
                if not body:
                    self.send_response(200 if os.path.isfile(path) else 404)
                    self.end_headers()
                    return
                server.hits[name] += 1
                if not os.path.isfile(path):
                    self.send_error(404, "File not found")
                    return
                if server.hits[name] <= server.fail_first.get(name, 0):  # a transient server error
                    self.send_error(500, "Internal Server Error")
                    return
                with open(path, "rb") as f:
                    data = f.read()
                mode = server.truncate_once.get(name) if server.hits[name] == 1 else None
                length = len(data)
                if mode == "consistent":   # a short file with a matching Content-Length: only the footer check sees it
                    data = data[: len(data) // 2]
                    length = len(data)
                elif mode == "short":      # connection drops mid-body: fewer bytes than Content-Length
                    data = data[: len(data) // 2]
                    self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self):
                self._serve(body=True)

            def do_HEAD(self):
                self._serve(body=False)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    """Serves climbmix-named shards 0..3 plus the val shard 6542, each with a few row groups."""
    root = tmp_path / "hub"
    root.mkdir()
    for i in [0, 1, 2, 3, 6542]:
        write_parquet(root / shard_name(i), shard_texts(i))
    s = ShardServer(str(root))
    yield s
    s.close()


def test_download_shards_and_val_shard(server, tmp_path):
    out = tmp_path / "data"
    paths = download_shards(3, source="climbmix", data_dir=str(out), base_url=server.url, workers=2, **FAST)
    assert [os.path.basename(p) for p in paths] == [shard_name(i) for i in (0, 1, 2, 6542)]
    assert all(is_valid_parquet(p) for p in paths)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)  # no temp files left
    assert server.hits == Counter({shard_name(i): 1 for i in (0, 1, 2, 6542)})
    # the downloaded dir is a hub source: train = shards 0..2 (row groups), val = the fixed val shard
    src = resolve_source("climbmix", data_dir=str(out))
    train, val = src.units("train"), src.units("val")
    assert len(train) == 3 * 3 and {os.path.basename(u.path) for u in train} == {shard_name(i) for i in range(3)}
    assert {os.path.basename(u.path) for u in val} == {shard_name(6542)}
    assert src.read_unit(train[0]) == shard_texts(0)[:4]
    assert src.read_unit(val[-1]) == shard_texts(6542)[8:]


@pytest.mark.parametrize("mode", ["consistent", "short"])
def test_truncated_transfer_is_detected_and_refetched(server, tmp_path, mode):
    server.truncate_once[shard_name(1)] = mode
    paths = download_shards(2, data_dir=str(tmp_path / "d"), base_url=server.url, workers=2, **FAST)
    assert server.hits[shard_name(1)] == 2 and server.hits[shard_name(0)] == 1
    assert all(is_valid_parquet(p) for p in paths)
    assert pq.read_table(paths[1]).column("text").to_pylist() == shard_texts(1)


def test_complete_shards_are_skipped_and_corrupt_ones_replaced(server, tmp_path):
    out = tmp_path / "d"
    download_shards(2, data_dir=str(out), base_url=server.url, **FAST)
    assert sum(server.hits.values()) == 3
    download_shards(2, data_dir=str(out), base_url=server.url, **FAST)
    assert sum(server.hits.values()) == 3  # resumable: nothing fetched again
    # a truncated leftover and a garbage file are detected, deleted and fetched again
    good = (out / shard_name(0)).read_bytes()
    (out / shard_name(0)).write_bytes(good[: len(good) - 50])
    (out / shard_name(1)).write_bytes(b"not a parquet file at all")
    assert not is_valid_parquet(out / shard_name(0))
    download_shards(3, data_dir=str(out), base_url=server.url, **FAST)
    assert server.hits[shard_name(0)] == 2 and server.hits[shard_name(1)] == 2 and server.hits[shard_name(2)] == 1
    assert server.hits[shard_name(6542)] == 1
    assert (out / shard_name(0)).read_bytes() == good


def test_missing_shard_fails_fast_and_transient_errors_are_retried(server, tmp_path):
    os.remove(os.path.join(server.root, shard_name(2)))
    server.fail_first[shard_name(1)] = 2  # 500, 500, then 200
    with pytest.raises(DownloadError) as e:
        download_shards(3, data_dir=str(tmp_path / "d"), base_url=server.url, max_attempts=3, **FAST)
    msg = str(e.value)
    assert "1 of 4 shards failed" in msg and f"{server.url}/{shard_name(2)}" in msg and "404" in msg
    assert server.hits[shard_name(2)] == 1  # a 4xx is final: no retries
    assert server.hits[shard_name(1)] == 3  # the 5xx were retried
    assert not os.path.exists(tmp_path / "d" / shard_name(2))
    assert is_valid_parquet(tmp_path / "d" / shard_name(1))  # the others still completed


def refusing_url():
    """http://127.0.0.1:PORT where nothing listens (the port was free a moment ago): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_server_fails_at_once_naming_it(tmp_path):
    """A mirror that refuses connections fails the download in seconds (3 quick probes), naming the URL and the
    error, instead of sitting through 5 attempts with backoff for every shard."""
    url = refusing_url()
    start = time.monotonic()
    with pytest.raises(DownloadError, match=rf"cannot reach the shard server for {url}/{shard_name(0)} "
                                            rf"\(3 tries\): .*(Connection refused|Max retries)"):
        download_shards(370, data_dir=str(tmp_path / "d"), base_url=url, progress=False)  # default retries
    assert time.monotonic() - start < 60
    assert not os.path.exists(tmp_path / "d")  # nothing was attempted


# -----------------------------------------------------------------------------
# local sources

def test_local_parquet_dir_and_glob(tmp_path):
    for i in range(3):
        write_parquet(tmp_path / f"part{i}.parquet", shard_texts(i, n=8), row_group_size=4)  # 2 row groups each
    (tmp_path / "notes.md").write_text("ignored: not a data file")
    src = resolve_source(str(tmp_path))
    units = src.units("train") + src.units("val")
    assert units == [Unit(str(tmp_path / f"part{i}.parquet"), rg) for i in range(3) for rg in range(2)]
    assert len(src.units("val")) == 1  # the last 5% of units, at least one
    assert src.read_unit(units[3]) == shard_texts(1, n=8)[4:]
    assert src.fingerprint("train") == resolve_source(str(tmp_path)).fingerprint("train")
    g = resolve_source(str(tmp_path / "part[01].parquet"))
    assert {os.path.basename(u.path) for u in g.units("train") + g.units("val")} == {"part0.parquet",
                                                                                       "part1.parquet"}
    # nanochat-style iteration: units start, start+step, ... of every file
    batches = list(parquets_iter_batched("train", start=1, step=2, source=str(tmp_path)))
    assert batches == [shard_texts(0, n=8)[4:], shard_texts(1, n=8)[4:]]
    # picklable (Ray ships sources to actors), and still works after a round trip
    assert pickle.loads(pickle.dumps(src)).read_unit(units[0]) == shard_texts(0, n=8)[:4]


def test_local_txt_and_jsonl(tmp_path):
    paragraphs = [f"Paragraph {i} of the story.\nIt spans two lines." for i in range(10)]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
    rows = [{"text": f"json doc {i}", "meta": i} for i in range(5)] + [{"text": "line\u2028separator, caf\u00e9"}]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps({"text": f"val {i}"}) for i in range(5)))
    src = resolve_source(tmp_path, val=str(tmp_path / "val.jsonl"), block_docs=4)
    train = src.units("train")
    assert [(os.path.basename(p), i) for p, i in train] == [("a.txt", 0), ("a.txt", 1), ("a.txt", 2),
                                                            ("b.jsonl.gz", 0), ("b.jsonl.gz", 1)]
    assert [d for u in train for d in src.read_unit(u)] == paragraphs + [r["text"] for r in rows]
    assert [d for u in src.units("val") for d in src.read_unit(u)] == [f"val {i}" for i in range(5)]
    only_txt = resolve_source(str(tmp_path / "*.txt"), block_docs=3)
    assert len(only_txt.units("train")) == 3 and len(only_txt.units("val")) == 1


def test_bad_local_sources_name_the_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_source(str(missing))
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        resolve_source(str(tmp_path / "*.parquet"))
    bad = write_parquet(tmp_path / "bad.parquet", None, content=["a", "b"])
    with pytest.raises(ValueError, match=r"bad\.parquet.*no 'text' column.*content"):
        resolve_source(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: contains no documents"):
        resolve_source(str(empty))
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: .*'text' field"):
        resolve_source(str(tmp_path / "x.jsonl"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a valid parquet file"):
        resolve_source(str(tmp_path / "junk.parquet"))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        resolve_source(str(tmp_path / "data.csv"))
    (tmp_path / "one").mkdir()
    one = write_parquet(tmp_path / "one" / "x.parquet", ["a"])
    with pytest.raises(ValueError, match="need at least 2"):
        resolve_source(str(one))  # a single unit cannot be split into train and val


# -----------------------------------------------------------------------------
# offline fallback corpus and source resolution

def test_fallback_corpus_is_real_prose():
    src = resolve_source("fallback")
    train = [d for u in src.units("train") for d in src.read_unit(u)]
    val = [d for u in src.units("val") for d in src.read_unit(u)]
    text = "\n".join(train)
    assert len(text) > 2_000_000 and sum(map(len, val)) > 200_000
    words = Counter(text.lower().split())
    for w in ["the", "and", "of", "to", "a", "in", "that", "was", "her", "he"]:
        assert words[w] > 1000, w
    assert "Emma Woodhouse" in text and "Call me Ishmael" in text
    assert len(src.units("val")) >= 8 and not set(train) & set(val)
    total = sum(os.path.getsize(os.path.join(dataset.FALLBACK_DIR, n)) for n in os.listdir(dataset.FALLBACK_DIR)
                if not n.startswith("__"))
    assert total < 1.5e6


def test_auto_uses_hub_shards_if_present_else_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="nanochat.dataset"):
        src = resolve_source("auto")
    assert src.name == "fallback"
    assert any("no downloaded hub shards" in r.message and "fallback corpus" in r.message and
               r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        resolve_source("hub")
    d = tmp_path / "base_data_climbmix"
    d.mkdir()
    write_parquet(d / shard_name(0), shard_texts(0))
    with pytest.raises(FileNotFoundError, match="validation shard shard_06542"):
        hub_source("climbmix")
    write_parquet(d / shard_name(6542), shard_texts(6542))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nanochat.dataset"):
        src = resolve_source("auto")
    assert src.name == "climbmix" and len(src.units("train")) == 3
    assert any("pretraining data: climbmix hub shards" in r.message for r in caplog.records)


def test_download_or_fallback(server, tmp_path, caplog):
    src = download_or_fallback(2, data_dir=str(tmp_path / "ok"), base_url=server.url, **FAST)
    assert src.name == "climbmix" and len(src.units("train")) == 6
    hits = sum(server.hits.values())
    src = download_or_fallback(2, data_dir=str(tmp_path / "ok"), base_url="http://127.0.0.1:9", **FAST)
    assert src.name == "climbmix" and sum(server.hits.values()) == hits  # present shards need no network
    with caplog.at_level(logging.WARNING, logger="nanochat.dataset"):
        src = download_or_fallback(2, data_dir=str(tmp_path / "off"), base_url="http://127.0.0.1:9", **FAST)
    assert src.name == "fallback"
    assert any("cannot download climbmix shards" in r.message and "fallback corpus" in r.message
               for r in caplog.records)


def test_python_m_nanochat_dataset_downloads_without_ray(server, tmp_path):
    """`python -m nanochat.dataset` parses its own flags and downloads in threads of its process: Ray is never
    imported (the core has no Ray imports; the Ray fan-out is ray_jobs.download, with the same flags)."""
    code = ("import runpy, sys\n"
            "try:\n"
            "    runpy.run_module('nanochat.dataset', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('exit', e.code, 'ray imported:', 'ray' in sys.modules)\n")
    argv = ["-n", "2", "--base-url", server.url, "--storage", str(tmp_path / "root"), "-w", "2"]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "elsewhere")})
    assert "exit 0 ray imported: False" in out.stdout, out.stderr[-2000:]
    got = sorted(os.listdir(tmp_path / "root" / "base_data_climbmix"))
    assert got == [shard_name(i) for i in (0, 1, 6542)]  # into --storage, not $NANOCHAT_BASE_DIR
    assert not (tmp_path / "elsewhere" / "base_data_climbmix").exists()
