"""A stand-in for the Hugging Face Hub on 127.0.0.1, and writers of what a model repo holds (a Hugging Face export,
nanochat's layout), for test_hub.py and whatever else downloads a model in the tests.

FakeHub serves the routes huggingface_hub 2.4 uses to download a model repo, with the headers it reads:
    GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   model_info: sha, siblings (size, blobId, lfs when blobs)
    GET  /api/models/{repo}/tree/{rev}?recursive=True        list_repo_tree (snapshot_download's file listing)
    HEAD /{repo}/resolve/{rev}/{path}                        ETag, X-Repo-Commit, X-Linked-Etag/-Size (LFS files)
    GET  /{repo}/resolve/{rev}/{path}                        the bytes; Range: bytes=N- -> 206 with Content-Range
Errors as the Hub sends them: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound. The Hub's
redirect of LFS files to a CDN is left out (huggingface_hub takes the same headers from a 200).

Faults, for the download's failure paths: cut(path, after, reset, times) ends the next `times` GETs of a file after
`after` bytes, closing the connection (a FIN: the client sees a short body) or resetting it (an RST); corrupt(path)
serves the file with one byte flipped (its size and the metadata unchanged) until repair(path). `requests` records
every request as (method, path, Range header).
"""
import hashlib
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import torch

from nanochat.checkpoint_manager import meta_name, model_name
from nanochat.hf_format import export_hf

LFS_SUFFIXES = (".safetensors", ".pt", ".pkl", ".bin")  # what a repo's .gitattributes puts in LFS


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos = {}  # repo id -> {"commit": str, "files": {path: bytes}}
        self.cuts, self.corrupted, self.requests = {}, set(), []
        self.connections = set()  # open client connections (keep-alive), closed with the server
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        """Stop serving, kept-alive connections included, as when the Hub cannot be reached (again: a no-op)."""
        if self.server.fileno() != -1:
            self.server.shutdown()
            self.server.server_close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass

    def add_repo(self, repo_id, directory):
        """Publish every file under `directory` as repo_id's main branch; returns its commit hash."""
        files = {}
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, directory).replace(os.sep, "/")] = f.read()
        commit = hashlib.sha1(repo_id.encode() + b"".join(k.encode() + v for k, v in sorted(files.items())))
        self.repos[repo_id] = {"commit": commit.hexdigest(), "files": files}
        return commit.hexdigest()

    def cut(self, path, after, reset=False, times=1):
        self.cuts[path] = [after, reset, times]

    def corrupt(self, path):
        self.corrupted.add(path)

    def repair(self, path):
        self.corrupted.discard(path)

    def gets(self, path):
        """The Range headers of the GETs of repo file `path` so far (None: the whole file)."""
        return [rng for method, url, rng in self.requests
                if method == "GET" and "/resolve/" in url and url.split("/", 5)[5] == path]


def _is_lfs(path):
    return path.endswith(LFS_SUFFIXES)


def _lfs_pointer(data):
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Content-Length framing, as the Hub (a short body is detectable)

    def log_message(self, *args):
        pass

    @property
    def hub(self):
        return self.server.hub

    def setup(self):
        super().setup()
        self.hub.connections.add(self.connection)

    def do_HEAD(self):
        self.route(head=True)

    def do_GET(self):
        self.route(head=False)

    def route(self, head):
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            repo = self.repo(repo_id)
            if repo is None:
                return
            if rest[:1] == ["tree"]:
                if self.revision(repo, "/".join(rest[1:])):
                    self.json([_tree_entry(p, d) for p, d in sorted(repo["files"].items())])
                return
            if rest and (rest[0] != "revision" or not self.revision(repo, "/".join(rest[1:]))):
                return
            blobs = "blobs=True" in (url.query or "") or "blobs=true" in (url.query or "")
            self.json({"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "private": False,
                       "siblings": [_sibling(p, d, blobs) for p, d in sorted(repo["files"].items())]})
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repo("/".join(parts[:2]))
            if repo is not None and self.revision(repo, parts[3]):
                self.file(repo, "/".join(parts[4:]), head)
        else:
            self.error(404, "Entry not found", "EntryNotFound")

    def repo(self, repo_id):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self.error(404, "Repository not found", "RepoNotFound")
        return repo

    def revision(self, repo, rev):
        if rev in ("main", repo["commit"]):
            return True
        self.error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return False

    def file(self, repo, path, head):
        data = repo["files"].get(path)
        if data is None:
            self.error(404, "Entry not found", "EntryNotFound")
            return
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(path) else git_blob_sha1(data)
        start = 0
        ranged = self.headers.get("Range")
        if ranged and not head:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", repo["commit"])
        if _is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        if path in self.hub.corrupted:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        cut = self.hub.cuts.get(path)
        if cut is None:
            self.wfile.write(data[start:])
            return
        after, reset, _ = cut
        cut[2] -= 1
        if not cut[2]:
            del self.hub.cuts[path]
        self.wfile.write(data[start:start + after])
        self.wfile.flush()
        self.close_connection = True
        if reset:  # an RST instead of a FIN, once the peer has read what came: its next read fails "connection reset"
            time.sleep(0.2)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def finish(self):
        if self.connection.fileno() != -1:  # (a reset connection is closed already)
            super().finish()

    def json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, message, code):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _sibling(path, data, blobs):
    if not blobs:
        return {"rfilename": path}
    entry = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(_lfs_pointer(data) if _is_lfs(path)
                                                                           else data)}
    if _is_lfs(path):
        entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "pointerSize": len(_lfs_pointer(data))}
    return entry


def _tree_entry(path, data):
    entry = {"type": "file", "path": path, "size": len(data),
             "oid": git_blob_sha1(_lfs_pointer(data) if _is_lfs(path) else data)}
    if _is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "pointerSize": len(_lfs_pointer(data))}
    return entry


# -----------------------------------------------------------------------------
# What a model repo holds

def write_hf_export(model, tokenizer, directory, step=7, shards=1):
    """A Hugging Face export by nanochat's exporter, in one safetensors file or split into about `shards`."""
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    export_hf(model, tokenizer, directory, meta={"source": "sft", "model_tag": "d2", "step": step},
              max_shard_bytes=-(-total // shards), force=True)
    return directory


NANOCHAT_META_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def write_nanochat_layout(models, tokenizer, directory, tokenizer_subdir=False):
    """nanochat's published layout: model_<step>.pt and meta_<step>.json per {step: model} (meta as nanochat writes
    it: no checksums, only the classic config keys), tokenizer.pkl and token_bytes.pt at the root or in tokenizer/."""
    os.makedirs(directory, exist_ok=True)
    for step, model in models.items():
        torch.save(model.state_dict(), os.path.join(directory, model_name(step)))
        meta = {"step": step, "model_config": {k: getattr(model.config, k) for k in NANOCHAT_META_KEYS}}
        with open(os.path.join(directory, meta_name(step)), "w") as f:
            json.dump(meta, f, indent=2)
    tokenizer.save(os.path.join(directory, "tokenizer") if tokenizer_subdir else directory)
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write("a model card\n")
    return directory
