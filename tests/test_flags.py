"""nanochat/flags.py, and the --help of every entry point: each flag says what it does."""
import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import REPO_ROOT
from nanochat.flags import ArgsMixin, flag, task_data_dir

ENTRY_POINTS = ["ray_jobs.base_train", "ray_jobs.mid_train", "ray_jobs.chat_sft", "ray_jobs.chat_rl",
                "ray_jobs.base_eval", "ray_jobs.chat_eval", "ray_jobs.tok_train", "ray_jobs.tok_eval",
                "ray_jobs.download", "ray_jobs.report", "ray_jobs.speedrun", "serve.app", "serve.chat_cli",
                "nanochat.base_train", "nanochat.chat_train", "nanochat.chat_rl", "nanochat.data.build_fallback_corpus",
                "nanochat.data.build_task_data", "nanochat.dryrun"]


@dataclass
class Example(ArgsMixin):
    depth: int = flag(20, "model depth")
    lr: float = flag(0.02, "learning rate")
    name: str | None = flag(None, "a name (default: none)", aliases=["-n"])
    resume: bool = flag(False, "continue")


def test_flags_from_a_dataclass():
    parser = Example.add_args(argparse.ArgumentParser())
    assert Example.from_args(parser.parse_args([])) == Example()
    cfg = Example.from_args(parser.parse_args(["--depth", "4", "--lr", "0.5", "-n", "x", "--resume"]))
    assert cfg == Example(depth=4, lr=0.5, name="x", resume=True)
    assert Example.from_args(parser.parse_args(["--no-resume"])).resume is False
    text = parser.format_help()
    assert "model depth (default: 20)" in text and "a name (default: none)" in text


@dataclass
class Job(ArgsMixin):
    command: str = flag("generate", "what to do", positional=True, choices=["generate", "reset"])
    source: str = flag(None, "which checkpoints", aliases=["-i", "--old-source"], required=True)
    skip: list[str] = flag([], "leave a stage out", action="append")


def test_positional_required_alias_and_repeatable_flags(capsys):
    assert Job.parse(["-i", "sft"]) == Job(command="generate", source="sft", skip=[])
    cfg = Job.parse(["reset", "--old-source", "rl", "--skip", "a", "--skip", "b"])
    assert cfg == Job(command="reset", source="rl", skip=["a", "b"])
    assert Job.parse(["-i", "x"]).skip == [] and Job().skip is not Job().skip  # no list shared between configs
    with pytest.raises(SystemExit):
        Job.parse([])  # --source is required
    assert "the following arguments are required: -i/--source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Job.parse(["explode", "-i", "x"])
    help_text = Job.add_args(argparse.ArgumentParser()).format_help()
    assert "-i SOURCE, --source SOURCE, --old-source SOURCE" in help_text


def test_a_field_without_help_is_refused():
    @dataclass
    class Bare(ArgsMixin):
        depth: int = 20
    with pytest.raises(TypeError, match="Bare.depth has no help text"):
        Bare.add_args(argparse.ArgumentParser())


def test_task_data_dir(monkeypatch, tmp_path):
    from nanochat.dataset import PACKAGE_TASK_DATA
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    assert task_data_dir() == "" and task_data_dir("/x") == "/x"
    assert task_data_dir(shipped_pack=True) == PACKAGE_TASK_DATA  # the demo's default
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "/env")  # the user's default beats the demo's
    assert task_data_dir() == "/env" and task_data_dir("/x") == "/x" and task_data_dir(shipped_pack=True) == "/env"
    assert task_data_dir("") == ""  # decided: the Hub, whatever the environment says (a resolved config keeps it)
    monkeypatch.chdir(tmp_path)  # workers run in other directories: a relative directory comes back absolute
    assert task_data_dir("tasks") == os.path.join(str(tmp_path), "tasks")


def test_a_resolved_config_keeps_its_task_data_wherever_it_is_resolved_again(monkeypatch):
    """A training worker resolves the config it was sent again: it must not pick the task files up from its own
    environment (the entry point decided them, possibly as "": the Hub)."""
    from nanochat.chat_rl import RLConfig
    from nanochat.chat_train import SFTConfig
    for config in (SFTConfig(), RLConfig()):
        monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
        at_entry = config.resolved()
        monkeypatch.setenv("NANOCHAT_TASK_DATA", "/the/worker/node's/own")
        assert at_entry.task_data == "" and at_entry.resolved().task_data == ""
        assert config.resolved().task_data == "/the/worker/node's/own"  # (unresolved: the user's default)


# `python -m MODULE --help` for every entry point, in one interpreter (each module's __main__ run by runpy, as -m
# runs it): importing torch and Ray once instead of 18 times saves about a minute of the suite.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out[module] = {"code": code, "stdout": buf.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_texts():
    out = subprocess.run([sys.executable, "-c", HELP_RUNNER] + ENTRY_POINTS, capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_flag_of_every_entry_point_has_help(module, help_texts):
    result = help_texts[module]
    assert result["code"] == 0, result
    options = result["stdout"].split("options:", 1)[1]
    # an option line is "  -x, --flag VALUE   help"; its help is on the same line or indented on the next one
    entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))[1:]
    bare = [e.split()[0] for e in entries if len(re.split(r"\s{2,}", e.strip(), maxsplit=1)) < 2]
    assert entries and not bare, f"{module}: flags without help: {bare}"
