"""The whole pipeline: the demo preset with tiny step counts, its artifacts, resume, and serving the result."""
import json
import os
import socket
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
    with pytest.raises(SystemExit, match="STAGE.FLAG=VALUE"):
        parse_overrides(["nonsense.flag=1"])
    assert set(PRESETS) == {"demo", "d20", "d24"} and STAGES[-1] == "report"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_pipeline_end_to_end_then_resume_then_serve(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    root = str(tmp_path / "run")
    argv = ["--preset", "demo", "--storage", root, "--num-actors", "1"]
    for item in TINY_RUN:
        argv += ["--set", item]
    report = speedrun(argv)

    # artifacts of every stage
    assert os.path.exists(os.path.join(root, "tokenizer", "tokenizer.pkl"))
    assert os.path.exists(os.path.join(root, "tokenizer", "token_bytes.pt"))
    for stage_dir, last in [("base_checkpoints", 6), ("mid_checkpoints", 4), ("chatsft_checkpoints", 4),
                            ("chatrl_checkpoints", 2)]:
        ckpt = os.path.join(root, stage_dir, "d4")
        assert os.path.exists(os.path.join(ckpt, f"meta_{last:06d}.json")), stage_dir
        assert os.path.exists(os.path.join(ckpt, f"model_{last:06d}.pt")), stage_dir
    stages = json.load(open(os.path.join(root, "speedrun", "stages.json")))
    assert all(stages[s]["done"] for s in STAGES)

    # the report card: every summary row has a number in each column that applies
    text = open(report).read()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert table["CORE"][0] not in ("", "-")
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        assert all(v not in ("", "-") for v in table[metric][1:3]), (metric, table[metric])
    assert table["GSM8K"][3] not in ("", "-")  # RL column

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
