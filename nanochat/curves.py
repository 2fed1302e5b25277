"""
Training curves for the report card: one PNG per stage from the metrics.jsonl its rank 0 wrote next to its
checkpoints (<base>/<stage>_checkpoints/<tag>/metrics.jsonl). Left: the training signal per step (loss; reward for
RL). Right: the stage's evals (val bpb for base/mid, val loss for SFT, GSM8K pass@1 for RL).
"""
import io
import json

from nanochat import storage

# (stage, checkpoints dir, training signal, evals to plot)
STAGES = [
    ("base", "base_checkpoints", "loss", ("val_bpb",)),
    ("mid", "mid_checkpoints", "loss", ("val_bpb",)),
    ("sft", "chatsft_checkpoints", "loss", ("val_loss",)),
    ("rl", "chatrl_checkpoints", "reward", ("GSM8K",)),
]


def read_metrics(path, keys):
    """{key: ([steps], [values])} from a metrics.jsonl. A resumed run appends steps it had already logged before the
    interruption (they were redone after the last checkpoint); the later line wins."""
    series = {k: {} for k in keys}
    for line in storage.read_text(path).split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash (or the empty last line)
            continue
        for k in keys:
            if isinstance(row.get(k), (int, float)):
                series[k][row["step"]] = row[k]
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items() if v}


def newest_metrics(checkpoints_dir):
    """The most recently written <tag>/metrics.jsonl under a stage's checkpoints dir, or None."""
    paths = [storage.join(checkpoints_dir, tag, "metrics.jsonl") for tag, is_dir, _ in storage.entries(checkpoints_dir)
             if is_dir]
    paths = [p for p in paths if storage.isfile(p)]
    return max(paths, key=storage.modified) if paths else None


def plot_stage(stage, metrics_path, train_key, eval_keys, out_path):
    """Write the stage's PNG; -> False when the file holds nothing to plot."""
    series = read_metrics(metrics_path, (train_key,) + eval_keys)
    if not series:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train_key in series:
        left.plot(*series[train_key], linewidth=1)
    left.set(title=f"{stage}: train {train_key}", xlabel="step", ylabel=train_key)
    for k in eval_keys:
        if k in series:
            right.plot(*series[k], marker="o", markersize=3, label=k)
    right.set(title=f"{stage}: evals", xlabel="step")
    if any(k in series for k in eval_keys):
        right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes(out_path, png.getvalue())
    return True


def plot_curves(base_dir, out_dir):
    """One PNG per stage that has metrics, into out_dir; -> [(stage, file name)] in pipeline order."""
    made = []
    for stage, ckpt_dir, train_key, eval_keys in STAGES:
        path = newest_metrics(storage.join(base_dir, ckpt_dir))
        name = f"curves_{stage}.png"
        if path and plot_stage(stage, path, train_key, eval_keys, storage.join(out_dir, name)):
            made.append((stage, name))
    return made
