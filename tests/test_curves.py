"""Training curves for the report card: metrics.jsonl -> one PNG per stage, linked from report.md."""
import json
import struct

from nanochat.curves import plot_curves, read_metrics
from nanochat.report import Report


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_later_lines_win_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_bpb": 3.0}, {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
            {"step": 2, "loss": 7.5}, {"step": 3, "loss": 7.0}]  # step 2 redone after a resume
    write_metrics(path, rows)
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line
    series = read_metrics(str(path), ("loss", "val_bpb", "reward"))
    assert series == {"loss": ([1, 2, 3], [9.0, 7.5, 7.0]), "val_bpb": ([0], [3.0])}


def test_report_links_a_png_per_stage_with_metrics(tmp_path):
    write_metrics(tmp_path / "base_checkpoints" / "d4" / "metrics.jsonl",
                  [{"step": 0, "val_bpb": 3.0}] + [{"step": s, "loss": 9.0 - s} for s in range(1, 6)]
                  + [{"step": 5, "val_bpb": 2.5}])
    write_metrics(tmp_path / "chatrl_checkpoints" / "d4" / "metrics.jsonl",
                  [{"step": 0, "GSM8K": 0.0}, {"step": 1, "reward": 0.25}, {"step": 2, "reward": 0.5},
                   {"step": 2, "GSM8K": 0.1}])
    (tmp_path / "mid_checkpoints" / "d4").mkdir(parents=True)  # a stage without metrics: no plot, no link
    report = Report(str(tmp_path / "report"))
    report.reset()
    text = open(report.generate()).read()

    assert plot_curves(str(tmp_path), str(tmp_path / "report")) == [("base", "curves_base.png"),
                                                                      ("rl", "curves_rl.png")]
    assert "## Training curves" in text
    assert "![base](curves_base.png)" in text and "![rl](curves_rl.png)" in text and "curves_mid" not in text
    width, height = png_size(tmp_path / "report" / "curves_base.png")
    assert width > 400 and height > 200
    # a new run starts without the old run's pictures
    report.reset()
    assert not list((tmp_path / "report").glob("*.png"))
