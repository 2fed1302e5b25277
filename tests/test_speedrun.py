"""The whole pipeline: the demo preset with tiny step counts, its artifacts, resume, and serving the result."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from ray_jobs.speedrun import PRESETS, STAGES, main as speedrun, parse_overrides

TINY_RUN = [  # the demo preset, cut down to a few steps and problems per stage
    "base_train.num-iterations=6", "base_train.eval-every=3", "base_train.save-every=3",
    "base_train.sample-every=-1", "base_train.cpus-per-worker=1",
    "base_eval.max-per-task=3", "base_eval.split-tokens=2048", "base_eval.num-unconditioned=1",
    "mid_train.num-iterations=4", "mid_train.eval-every=2", "mid_train.save-every=2", "mid_train.cpus-per-worker=1",
    "chat_sft.num-iterations=4", "chat_sft.eval-every=2", "chat_sft.save-every=2", "chat_sft.eval-steps=2",
    "chat_sft.eval-metrics-max-problems=8", "chat_sft.cpus-per-worker=1",
    "chat_rl.num-iterations=2", "chat_rl.eval-every=2", "chat_rl.save-every=2", "chat_rl.max-new-tokens=16",
    "chat_rl.eval-examples=4", "chat_rl.cpus-per-worker=1",
    "chat_eval_mid.max-problems=3", "chat_eval_sft.max-problems=3", "chat_eval_rl.max-problems=3",
    "chat_eval_mid.max-new-tokens=16", "chat_eval_sft.max-new-tokens=16", "chat_eval_rl.max-new-tokens=16",
]


def test_overrides_parse_and_reject_unknown_stages():
    assert parse_overrides(["base_train.num-iterations=5", "chat_sft.resume=true"]) == \
        {"base_train": {"num-iterations": "5"}, "chat_sft": {"resume": True}}
    assert parse_overrides(["serve.port=8001"]) == {"serve": {"port": "8001"}}  # flags for serve/app.py
    with pytest.raises(SystemExit, match="STAGE.FLAG=VALUE"):
        parse_overrides(["nonsense.flag=1"])
    assert set(PRESETS) == {"demo", "d20", "d24"} and STAGES[-1] == "report"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run(root, report):
    """Every stage's artifacts exist and the report card has a number in each column that applies."""
    assert os.path.exists(os.path.join(root, "tokenizer", "tokenizer.pkl"))
    assert os.path.exists(os.path.join(root, "tokenizer", "token_bytes.pt"))
    for stage_dir, last in [("base_checkpoints", 6), ("mid_checkpoints", 4), ("chatsft_checkpoints", 4),
                            ("chatrl_checkpoints", 2)]:
        ckpt = os.path.join(root, stage_dir, "d4")
        assert os.path.exists(os.path.join(ckpt, f"meta_{last:06d}.json")), stage_dir
        assert os.path.exists(os.path.join(ckpt, f"model_{last:06d}.pt")), stage_dir
    stages = json.load(open(os.path.join(root, "speedrun", "stages.json")))
    assert all(stages[s]["done"] for s in STAGES)
    text = open(report).read()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert table["CORE"][0] not in ("", "-")
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        assert all(v not in ("", "-") for v in table[metric][1:3]), (metric, table[metric])
    assert table["GSM8K"][3] not in ("", "-")  # RL column


def test_demo_pipeline_end_to_end_then_resume_then_serve(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    root = str(tmp_path / "run")
    argv = ["--preset", "demo", "--storage", root, "--num-actors", "1"]
    for item in TINY_RUN:
        argv += ["--set", item]
    report = speedrun(argv)
    check_run(root, report)

    # re-running the same command skips every finished stage
    t0 = time.time()
    assert speedrun(argv) == report
    assert time.time() - t0 < 60

    # the serving app answers a chat request from the final (RL) checkpoint, over real HTTP
    import uvicorn

    from serve.app import ChatService, ServeConfig, make_api
    service = ChatService(ServeConfig(storage=root, source="rl"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_api(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.1)
        r = requests.post(f"http://127.0.0.1:{port}/chat", json={"message": "What is 2+2?", "max_tokens": 8},
                          timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["response"], str) and body["usage"]["completion_tokens"] > 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()


# -- the same pipeline as a Ray job on a `ray start --head` cluster --------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture
def ray_head():
    """A head we own: `ray start --head --block` on loopback with private ports, temp dir and auth token, ended by
    its process id (never `ray stop`, which would end every Ray of this user on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "RAY_ADDRESS"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],  # the job's `python` (RAY.md P7)
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))  # clients need it too (RAY.md P6)
    dashboard_port = free_port()
    ports = {"port": free_port(), "dashboard-port": dashboard_port, "ray-client-server-port": free_port(),
             "node-manager-port": free_port(), "object-manager-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
    cmd = [RAY_BIN, "start", "--head", "--block", "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
           "--disable-usage-stats"] + [a for k, v in ports.items() for a in (f"--{k}", str(v))]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:  # the job server is up once it answers at all (401: it wants the token)
            assert head.poll() is None, open(log.name).read()[-3000:]
            assert time.time() < deadline, "ray head did not come up in 120 s"
            try:
                requests.get(address + "/api/version", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` takes its raylet, GCS and workers down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_demo_speedrun_as_ray_job_then_serve(ray_head, tmp_path):
    address, env = ray_head
    root = str(tmp_path / "run")
    serve_port = free_port()
    job_id = f"speedrun-{secrets.token_hex(4)}"
    entrypoint = ["python", "ray_jobs/speedrun.py", "--preset", "demo", "--storage", root, "--num-actors", "1",
                  "--serve", "--set", f"serve.port={serve_port}"]
    for item in TINY_RUN:
        entrypoint += ["--set", item]
    # what a user types from the repo root; without --no-wait it tails the job's logs until it ends
    submit = subprocess.run([RAY_BIN, "job", "submit", "--address", address, "--submission-id", job_id,
                             "--working-dir", ".", "--"] + entrypoint,
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert submit.returncode == 0, (submit.stdout[-6000:], submit.stderr[-3000:])
    status = subprocess.run([RAY_BIN, "job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout
    logs = subprocess.run([RAY_BIN, "job", "logs", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    report = logs.strip().splitlines()[-1]  # the contract: the report's path is the last line
    assert report == os.path.join(root, "report", "report.md"), logs[-2000:]
    check_run(root, report)

    # the job deployed Serve on the cluster and returned; the app outlives it and answers from the RL checkpoint
    url = f"http://127.0.0.1:{serve_port}"
    health = requests.get(url + "/health", timeout=30).json()
    assert health["model"] == "nanochat-rl" and health["step"] == 2, health
    r = requests.post(url + "/chat", json={"message": "What is 2+2?", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["response"], str) and r.json()["usage"]["completion_tokens"] > 0
