"""The whole pipeline as a Ray job: the demo preset with tiny step counts, its artifacts, resume, and serving the\nresult from a `ray start --head` cluster the test owns."""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import yaml

from nanochat import storage
from ray_jobs.speedrun import PRESETS, STAGES, parse_overrides, to_argv
from test_jobs_common import RAY_LINE

TINY_RUN = [  # the demo preset, cut down to a few steps and problems per stage
    "base_train.num-iterations=6", "base_train.eval-every=3", "base_train.save-every=3",
    "base_train.sample-every=-1", "base_train.cpus-per-worker=1",
    "base_eval.max-per-task=3", "base_eval.split-tokens=2048", "base_eval.num-unconditioned=1",
    "mid_train.num-iterations=4", "mid_train.eval-every=2", "mid_train.save-every=2", "mid_train.cpus-per-worker=1",
    "chat_sft.num-iterations=4", "chat_sft.eval-every=2", "chat_sft.save-every=2", "chat_sft.eval-steps=2",
    "chat_sft.eval-metrics-max-problems=8", "chat_sft.cpus-per-worker=1",
    # Ray Data's start-up costs ~30 s a stage on this box: SFT takes it (the default here, auto), the others the
    # plain loader (base training on Ray Data is tested in test_base_train, from a bucket)
    "base_train.loader=plain", "mid_train.loader=plain", "chat_rl.loader=plain",
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


def test_stage_flags_become_a_command_line_a_stage_parses():
    from nanochat.chat_train import SFTConfig
    argv = to_argv({"num-iterations": 5, "resume": True, "use-ray-data": None, "save-every": 0})
    assert argv == ["--num-iterations", "5", "--resume", "--save-every", "0"]
    # false turns a flag off (a preset's True can be overridden with --set stage.flag=false)
    assert to_argv({"resume": False}) == ["--no-resume"]
    assert SFTConfig.parse(to_argv({"resume": False, "num-iterations": 5})).resume is False
    assert SFTConfig.parse(to_argv({"resume": True})).resume is True


def test_every_stage_flag_is_checked_before_anything_runs(tmp_path, capsys):
    """A misspelt --set, a bad value or a flag a stage does not have fails at start-up, naming the stage and the
    flag (and the closest valid one), before Ray starts or any stage runs. Every preset's own flags parse."""
    from argparse import Namespace

    from ray_jobs.speedrun import check_stage_flags, main
    args = Namespace(storage=str(tmp_path), num_workers=None, use_gpu=False, num_actors=None, skip=[])
    for preset in PRESETS:
        check_stage_flags(STAGES + ["serve"], lambda stage: PRESETS[preset].get(stage, {}), args, "/tasks")
    argv = ["--preset", "demo", "--storage", str(tmp_path)]
    for bad, message in [("chat_eval_rl.max-problemz=3", "stage chat_eval_rl has no flag --max-problemz (did you mean "
                                                          "--max-problems?)"),
                         ("base_train.depth=four", "stage base_train: argument --depth: invalid int value: 'four'"),
                         ("chat_sft.loader=fast", "stage chat_sft: argument --loader: invalid choice: 'fast'"),
                         ("serve.prot=8001", "stage serve has no flag --prot (did you mean --port?)"),
                         ("data.num-shard=3", "stage data has no flag 'num-shard'"),
                         ("report.x=1", "stage report has no flag 'x'")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(argv + ["--set", bad, "--serve"])
    assert not os.listdir(tmp_path)  # nothing ran: the report's reset and the stage log would be there
    # a flag of a skipped stage is not checked (the stage does not run)
    check_stage_flags(["tok_train"], lambda stage: {"bogus": 1} if stage == "base_train" else {}, args, None)


def test_data_stage_falls_back_only_for_the_demo(tmp_path, monkeypatch, ray_local):
    """d20/d24 download their shards (Ray tasks) and fail naming every missing one; the demo falls back to the
    shipped corpus when the mirror cannot serve them. The shards go under the run's root, not $NANOCHAT_BASE_DIR."""
    from argparse import Namespace

    from nanochat.dataset import DownloadError, shard_name
    from ray_jobs.speedrun import run_stage
    from test_dataset import ShardServer, shard_texts, write_parquet
    hub = tmp_path / "hub"
    hub.mkdir()
    for i in (0, 6542):  # shard 1 is missing on the mirror
        write_parquet(hub / shard_name(i), shard_texts(i))
    server = ShardServer(str(hub))
    try:
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        args = Namespace(storage=str(tmp_path / "root"))
        with pytest.raises(DownloadError, match=shard_name(1)):
            run_stage("data", {**PRESETS["d20"]["data"], "num-shards": 2}, args, None)
        assert server.hits[shard_name(1)] == 1  # a 404 is final
        demo = run_stage("data", {**PRESETS["demo"]["data"], "num-shards": 2}, args, None)
        assert demo["source"].startswith("offline fallback corpus")
        assert run_stage("data", {**PRESETS["d20"]["data"], "num-shards": 1}, args, None)["source"].startswith(
            "climbmix hub shards (1 train")  # what is there is enough for a smaller run
        assert {shard_name(0), shard_name(6542)} <= set(os.listdir(tmp_path / "root" / "base_data_climbmix"))
        assert not (tmp_path / "elsewhere").exists()
    finally:
        server.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run(root, report):
    """Every stage's artifacts exist and the report card has a number in each column that applies."""
    assert storage.exists(storage.join(root, "tokenizer", "tokenizer.pkl"))
    assert storage.exists(storage.join(root, "tokenizer", "token_bytes.pt"))
    for stage_dir, last in [("base_checkpoints", 6), ("mid_checkpoints", 4), ("chatsft_checkpoints", 4),
                            ("chatrl_checkpoints", 2)]:
        ckpt = storage.join(root, stage_dir, "d4")
        assert storage.exists(storage.join(ckpt, f"meta_{last:06d}.json")), stage_dir
        assert storage.exists(storage.join(ckpt, f"model_{last:06d}.pt")), stage_dir
        assert storage.exists(storage.join(ckpt, "metrics.jsonl")), stage_dir
    assert storage.exists(storage.join(root, "base_eval", "d4.csv"))
    assert storage.exists(storage.join(root, "report", "curves_base.png"))
    stages = storage.read_json(storage.join(root, "speedrun", "stages.json"))
    assert all(stages[s]["done"] for s in STAGES)
    text = storage.read_text(report)
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert table["CORE"][0] not in ("", "-")
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        assert all(v not in ("", "-") for v in table[metric][1:3]), (metric, table[metric])
    assert table["GSM8K"][3] not in ("", "-")  # RL column


# -- the same pipeline as a Ray job on a `ray start --head` cluster --------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture
def ray_head():
    """A head we own: `ray start --head --block` on loopback with private ports, temp dir and auth token, ended by
    its process id (never `ray stop`, which would end every Ray of this user on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix sockets live under it
    # the second node has a temp dir of its own, as a real node has its own disk: sharing the head's, its runtime-env
    # agent would delete the unpacked working dir (the job driver's cwd) once its own last reference went away
    worker_temp = tempfile.mkdtemp(prefix="raywork", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "RAY_ADDRESS"))}
    home = tempfile.mkdtemp(prefix="rayhome")  # so a stray default root (~/.cache/nanochat) would show
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],  # the job's `python`
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),  # clients need it too
               # on SIGTERM a node would first drain for up to 30 s (for Serve replicas still taking traffic)
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               HOME=home)
    dashboard_port = free_port()
    ports = {"port": free_port(), "dashboard-port": dashboard_port, "ray-client-server-port": free_port(),
             "node-manager-port": free_port(), "object-manager-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
    cmd = [RAY_BIN, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
           "--disable-usage-stats"] + [a for k, v in ports.items() for a in (f"--{k}", str(v))]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    # its own process group: if it hangs on the way down, the group (all it started) goes with it
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    nodes = [head]
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
        # a second node joins the head: stages and actors may land on either
        worker_ports = {k: free_port() for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "runtime-env-agent-port")}
        worker = subprocess.Popen(
            [RAY_BIN, "start", "--address", f"127.0.0.1:{ports['port']}", "--block", "--num-cpus", "2",
             "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--temp-dir", worker_temp]
            + [a for k, v in worker_ports.items() for a in (f"--{k}", str(v))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(worker)
        while len(alive_nodes(address, env)) < 2:
            assert worker.poll() is None, open(log.name).read()[-3000:]
            assert time.time() < deadline, "the second node did not join in time"
            time.sleep(1)
        yield address, env, temp_dir
    finally:
        for node in nodes:  # `ray start --block` takes its raylet (and, on the head, GCS) down with it
            node.send_signal(signal.SIGTERM)
        for node in nodes:  # both shut down at once, not one after the other
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        log.close()
        for path in (temp_dir, worker_temp, home):
            shutil.rmtree(path, ignore_errors=True)


def alive_nodes(address, env):
    r = requests.get(address + "/nodes?view=summary", timeout=10,
                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    return [n for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"] if r.ok else []


def submit_job(address, env, argv, cwd=REPO_ROOT):
    """`ray job submit --working-dir . -- python -m ray_jobs.speedrun ARGV` from a checkout, as a user types it;
    without --no-wait it tails the job's logs until it ends. -> the job's logs, once it succeeded."""
    job_id = f"speedrun-{secrets.token_hex(4)}"
    submit = subprocess.run([RAY_BIN, "job", "submit", "--address", address, "--submission-id", job_id,
                             "--working-dir", ".", "--", "python", "-m", "ray_jobs.speedrun"] + argv,
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert submit.returncode == 0, (submit.stdout[-6000:], submit.stderr[-3000:])
    status = subprocess.run([RAY_BIN, "job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout
    return subprocess.run([RAY_BIN, "job", "logs", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=60).stdout


def wait_for_health(url, up=True, timeout=180):
    """GET /health until the app answers 200 (its JSON) or, with up=False, until nothing listens (None). A request
    that times out or is refused counts as not up yet: a proxy may accept a connection and hold it while the
    replica loads, or while it shuts down."""
    deadline = time.time() + timeout
    while True:
        try:
            r = requests.get(url + "/health", timeout=10)
            if up and r.status_code == 200:
                return r.json()
        except requests.ConnectionError:
            if not up:
                return None
        except requests.Timeout:
            pass
        assert time.time() < deadline, f"{url} did not {'come up' if up else 'go down'} in {timeout} s"
        time.sleep(1)


def local_leaks(*dirs):
    """Paths under `dirs` that a URI root must never produce: directories named after the URI scheme ("s3:") or a
    default local root."""
    leaks = []
    for d in dirs:
        for parent, subdirs, _ in os.walk(d):
            leaks += [os.path.join(parent, s) for s in subdirs if s == "s3:" or s.startswith("s3:")]
            subdirs[:] = [s for s in subdirs if s not in (".git", ".venv", "node_modules")]
    return leaks


def checkout_copy(dest):
    """The repo's sources in another directory: a second `ray job submit` from a fresh checkout."""
    shutil.copytree(REPO_ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache",
                                                                 "*.egg-info"))
    return dest


def test_demo_speedrun_as_ray_job_on_two_nodes_with_an_s3_root(ray_head, s3_root, tmp_path, ray_local):
    """The README's `ray job submit ... --storage s3://...` on a 2-node cluster whose nodes share only a bucket.
    Another Ray instance runs on the machine meanwhile (ray_local), as a user's second cluster might: nothing of the
    job may address that one."""
    address, env, ray_temp = ray_head
    root = s3_root
    argv = ["--preset", "demo", "--storage", root, "--num-actors", "1"]
    for item in TINY_RUN:
        argv += ["--set", item]
    logs = submit_job(address, env, argv)
    # the console shows the pipeline's lines, not Ray's: at most a handful from Ray per stage
    from_ray = [line for line in logs.splitlines() if RAY_LINE.search(line)]
    assert len(from_ray) <= 30 and not any("PlacementGroupCleaner" in line for line in from_ray), "\n".join(from_ray)
    # 4 CPUs in the cluster, 1 per training worker: the stage left on auto took Ray Data, its default path
    assert sum("--loader auto: ray" in line for line in logs.splitlines()) == 1, logs[-3000:]
    report = logs.strip().splitlines()[-1]  # the contract: the report's path is the last line
    assert report == storage.join(root, "report", "report.md"), logs[-2000:]
    check_run(root, report)

    # Re-running resumes, from another checkout (a new working directory, as a new `ray job submit` gets). Say RL
    # died after its step-2 checkpoint on its way to step 4: the re-run skips every finished stage and continues RL
    # from step 2 (redoing steps 1-2 would re-save step 2 under a new run id).
    from nanochat.checkpoint_manager import read_meta
    stages_path = storage.join(root, "speedrun", "stages.json")
    stages = storage.read_json(stages_path)
    stages["chat_rl"]["done"] = False
    storage.write_json(stages_path, stages)
    rl_dir = storage.join(root, "chatrl_checkpoints", "d4")
    step2 = read_meta(rl_dir, 2)
    serve_port = free_port()
    other = checkout_copy(str(tmp_path / "checkout"))
    logs = submit_job(address, env, argv + ["--set", "chat_rl.num-iterations=4",
                                            "--serve", "--set", f"serve.port={serve_port}"], cwd=other)
    skipped = {line.split()[1].rstrip(":") for line in logs.splitlines() if "done already, skipping" in line}
    assert skipped == set(STAGES) - {"chat_rl", "report"}, logs[-3000:]
    assert read_meta(rl_dir, 2) == step2
    assert read_meta(rl_dir, 4)["loop_state"]["step"] == 4
    assert storage.read_json(stages_path)["chat_rl"]["done"]
    assert report in logs.splitlines()  # last but for Serve's replica logs, which may trail

    # the job deployed Serve on the cluster and returned; the app outlives it and answers from the bucket's checkpoint
    url = f"http://127.0.0.1:{serve_port}"
    health = wait_for_health(url)
    assert health["model"] == "nanochat-rl" and health["step"] == 4, health
    r = requests.post(url + "/chat", json={"message": "What is 2+2?", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    # a demo model may end its turn at once (a sampled end-of-turn token is a legitimate "stop" with no text), so
    # this checks that the reply was generated, not what it says
    reply = r.json()
    assert reply["finish_reason"] in ("stop", "length") and reply["usage"]["prompt_tokens"] > 0, reply
    assert reply["usage"]["completion_tokens"] == 8 or reply["finish_reason"] == "stop", reply

    # and `serve shutdown` (as the README says) takes it down
    serve_bin = os.path.join(os.path.dirname(RAY_BIN), "serve")
    stop = subprocess.run([serve_bin, "shutdown", "--address", address, "-y"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert wait_for_health(url, up=False) is None

    # the declarative way: `serve deploy` of the shipped serve/config.yaml, pointed at this run's bucket
    config = yaml.safe_load(open(os.path.join(REPO_ROOT, "serve", "config.yaml")))
    config["http_options"]["port"] = deploy_port = free_port()
    config["applications"][0]["args"].update(storage=root, source="rl")
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run([serve_bin, "deploy", str(config_path), "--address", address],
                            env=env, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr[-2000:]
    health = wait_for_health(f"http://127.0.0.1:{deploy_port}")  # deploy returns at once; the replica loads
    assert health["model"] == "nanochat-rl" and health["step"] == 4, health

    # every artifact is in the bucket: nothing under the working directories, the cluster's dirs or a default root
    assert local_leaks(REPO_ROOT, other, ray_temp) == []
    assert not os.path.exists(os.path.join(env["HOME"], ".cache", "nanochat"))
