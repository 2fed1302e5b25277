"""ray_jobs/common.py: the shared glue of the Ray entry points."""
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT
from ray_jobs.common import pick_loader

# What Ray itself prints on a user's console: its log records ("... WARNING file.py:85 -- ..."), C++ log lines
# (core_worker.cc:2465), tracebacks, and the Ray Train chatter the stages' own lines repeat
RAY_LINE = re.compile(r"\w+\.(py|cc):\d+|Traceback|PlacementGroupCleaner|State API|Reporting training result|"
                      r"Setting up process group|Checkpoint successfully created")


def test_loader_auto_takes_ray_data_only_with_cpus_to_spare(ray_local, capsys):
    assert pick_loader("plain", 1, 1) == "plain" and pick_loader("ray", 8, 1) == "ray"  # explicit choices stand
    assert pick_loader("auto", 2, 1) == "ray"  # 8 CPUs: 2 for the trainers, 6 spare >= 2 x 1.5
    assert pick_loader("auto", 4, 1) == "plain"  # 4 spare < 4 x 1.5: Ray Data would starve the trainers
    assert "--loader auto: plain (8 CPUs in the cluster, 4 x 1 reserved" in capsys.readouterr().out


def test_a_stage_on_a_local_ray_prints_its_own_lines_not_rays(tmp_path, tiny_tokenizer):
    """A user's run of a training stage, as a process of its own that starts a local Ray (no dashboard): the
    console has the stage's lines and at most a couple from Ray (its token notice, an actor's exit). The workers
    (and the evaluations beside them) use the --storage root they are handed, though the environment they inherit
    names another."""
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    elsewhere = tmp_path / "elsewhere"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["NANOCHAT_BASE_DIR"] = str(elsewhere)
    out = subprocess.run(
        [sys.executable, "-m", "ray_jobs.base_train", "--storage", str(tmp_path), "--depth", "2", "--aspect-ratio",
         "32", "--head-dim", "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
         "--num-iterations", "16", "--eval-every", "8", "--eval-tokens", "128", "--save-every", "8",
         "--core-metric-every", "-1", "--sample-every", "-1", "--data", "fallback", "--cpus-per-worker", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 0, "\n".join(lines[-40:])
    assert any("step 00016/00016" in line for line in lines) and any("base finished" in line for line in lines)
    from_ray = [line for line in lines if RAY_LINE.search(line)]
    assert len(from_ray) <= 3, "\n".join(from_ray)
    assert (tmp_path / "base_checkpoints" / "d2" / "model_000016.pt").is_file()
    assert (tmp_path / "report" / "base-model-training.md").is_file()
    assert not elsewhere.exists()
