"""Report card: section format, reset/header, generate (summary table, wall clock, cost), rank-0 only, the CLI."""
import datetime
import os

import pytest

from nanochat import report as rp


def write_section(report_dir, slug, when, body):
    (report_dir / f"{slug}.md").write_text(f"## {slug}\ntimestamp: {when}\n\n{body}\n\n")


def test_log_writes_a_slugged_section(tmp_path):
    r = rp.Report(str(tmp_path / "report"))
    path = r.log("Chat evaluation sft", [{"source": "sft", "ARC-Easy": 0.38761, "tokens": 1234567, "small": 42,
                                          "flag": True}, "free text\n", None,
                                         {"ChatCORE": 0.0884}])
    assert path == str(tmp_path / "report" / "chat-evaluation-sft.md")
    lines = open(path).read().splitlines()
    assert lines[0] == "## Chat evaluation sft"
    datetime.datetime.strptime(lines[1], "timestamp: %Y-%m-%d %H:%M:%S")
    assert lines[3:10] == ["- source: sft", "- ARC-Easy: 0.3876", "- tokens: 1,234,567", "- small: 42",
                           "- flag: True", "free text", "- ChatCORE: 0.0884"]
    r.log("Chat RL", {"GSM8K": 0.5})  # a bare dict works too
    assert rp.parse_items(open(tmp_path / "report" / "chat-rl.md").read()) == {"GSM8K": "0.5000"}


def test_parse_items_ignores_fenced_text():
    text = "## x\n- CORE: 0.2000\n```\n- CORE: 9.9\n```\n- val bpb: 0.81\n"
    assert rp.parse_items(text) == {"CORE": "0.2000", "val bpb": "0.81"}


def test_reset_writes_the_header_and_clears_sections(tmp_path):
    r = rp.Report(str(tmp_path))
    r.log("Base model evaluation", {"CORE": 0.2})
    (tmp_path / "report.md").write_text("old")
    path = r.reset(cluster={"nodes": 2, "gpus": 16, "gpu_names": ["H100"], "cpus": 384, "memory_gb": 3600.0})
    assert sorted(os.listdir(tmp_path)) == ["header.md"]
    header = open(path).read()
    for needle in ("# nanochat training report", "### Git Information", "- Commit: ", "- Platform: ", "- CPUs: ",
                   "- Memory: ", "### Cluster", "- Nodes: 2", "- GPUs: 16 (H100)", "- Hourly Rate: $48.00/hour",
                   "- Python: ", "- PyTorch: ", "- Ray: ", "### Bloat", "- Characters: ", "- Files: ",
                   "Run started: "):
        assert needle in header, needle
    assert rp.extract_timestamp(header, "Run started:") is not None


def test_hourly_rates():
    assert rp.hourly_rate("NVIDIA H100 80GB HBM3", 8) == 24.0
    assert rp.hourly_rate("A100-SXM4-40GB", 1) == 1.79
    assert rp.hourly_rate("Some GPU", 2) == 4.0 and rp.hourly_rate("", 0) == 0.0


def test_generate_summary_table_wall_clock_and_cost(tmp_path):
    d = tmp_path / "report"
    d.mkdir()
    (d / "header.md").write_text("# nanochat training report\n\n- Hourly Rate: $24.00/hour\n\n"
                                 "Run started: 2026-01-01 10:00:00\n\n---\n")
    write_section(d, "base-model-training", "2026-01-01 12:00:00", "- val bpb: 0.81")
    write_section(d, "base-model-evaluation", "2026-01-01 12:10:00", "- CORE: 0.2219\n```\n- CORE: 1.0\n```")
    write_section(d, "chat-evaluation-mid", "2026-01-01 13:00:00",
                  "- ARC-Easy: 0.3561\n- ARC-Challenge: 0.2875\n- MMLU: 0.3111\n- GSM8K: 0.0250\n"
                  "- HumanEval: 0.0671\n- SpellingBee: 0.9\n- ChatCORE: 0.0730")
    write_section(d, "chat-evaluation-sft", "2026-01-01 13:51:00", "- ARC-Easy: 0.3876\n- GSM8K: 0.0455")
    write_section(d, "chat-evaluation-rl", "2026-01-01 20:00:00", "- GSM8K: 0.0758\n- MMLU: 0.9")
    write_section(d, "my-extra-stage", "2026-01-01 11:00:00", "- thing: 1")
    path = rp.Report(str(d)).generate()
    text = open(path).read()
    # sections in pipeline order, unknown ones after
    order = [text.index(f"## {s}") for s in ("base-model-training", "base-model-evaluation", "chat-evaluation-mid",
                                             "chat-evaluation-sft", "chat-evaluation-rl", "my-extra-stage")]
    assert order == sorted(order)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| Metric | BASE | MID | SFT | RL |"
    assert table[2:] == [
        "| CORE | 0.2219 | - | - | - |",
        "| ARC-Challenge | - | 0.2875 | - | - |",
        "| ARC-Easy | - | 0.3561 | 0.3876 | - |",
        "| GSM8K | - | 0.0250 | 0.0455 | 0.0758 |",
        "| HumanEval | - | 0.0671 | - | - |",
        "| MMLU | - | 0.3111 | - | - |",  # RL contributes GSM8K only
        "| ChatCORE | - | 0.0730 | - | - |",
    ]
    assert "Total wall clock time: 3h51m" in text  # last non-RL section (13:51) - run start (10:00)
    assert "Estimated cost: $92.40" in text


def test_generate_without_header_or_metrics(tmp_path):
    text = open(rp.Report(str(tmp_path)).generate()).read()
    assert "no header" in text and "(no metrics logged yet)" in text and "Total wall clock time: unknown" in text


def test_rank_zero_only(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dummy = rp.get_report(str(tmp_path))
    assert isinstance(dummy, rp.DummyReport)
    dummy.log("x", {"a": 1})
    dummy.reset()
    dummy.generate()
    assert not (tmp_path / "report").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    real = rp.get_report(str(tmp_path))
    assert isinstance(real, rp.Report) and real.report_dir == str(tmp_path / "report")


def test_cli_reset_and_generate(monkeypatch, tmp_path):
    from ray_jobs import report as cli
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))  # --storage wins
    root = tmp_path / "storage"
    assert cli.main(["reset", "--storage", str(root)]) == str(root / "report" / "header.md")
    rp.Report(str(root / "report")).log("Base model evaluation", {"CORE": 0.25})
    path = cli.main(["--storage", str(root)])
    assert path == str(root / "report" / "report.md")
    assert "| CORE | 0.2500 | - | - | - |" in open(path).read()
    with pytest.raises(SystemExit):
        cli.main(["bogus"])
