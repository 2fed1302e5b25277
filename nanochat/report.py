"""
The report card: every stage writes its own markdown section into <base>/report/, and `generate`
stitches them into report.md with a summary table of the headline metrics.

- reset(): delete old sections and report.md, write header.md (git, hardware, software, code size, run start).
- get_report().log(section, data): write report/<slug>.md = "## section", a timestamp, then "- key: value" lines.
  Rank 0 only: other ranks get a DummyReport, so every rank can call it unconditionally.
- generate(): header + the sections in pipeline order (+ any others), the summary table (metrics x BASE/MID/SFT/RL),
  the total wall clock time (last non-RL section timestamp - run start), an estimated cost, and the training curves
  (report/curves_<stage>.png, see curves.py) linked from the markdown.
No Ray here: cluster facts (nodes, GPUs) are passed in by ray_jobs/report.py.
"""
import datetime
import os
import platform
import re
import subprocess
import sys

from nanochat import storage
from nanochat.common import get_base_dir, get_dist_info
from nanochat.curves import plot_curves

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the pipeline's sections, in order (file names are slugify(section) + ".md")
EXPECTED_SECTIONS = [
    "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss", "base-model-evaluation",
    "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl",
]
RL_SECTIONS = ("chat-rl", "chat-evaluation-rl")  # optional and late: not counted in the wall clock
CHAT_METRICS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")
STAGES = ("BASE", "MID", "SFT", "RL")
# which section feeds which column, and which keys it contributes
SUMMARY_SOURCES = {
    "base-model-evaluation": ("BASE", ("CORE",)),
    "chat-evaluation-mid": ("MID", CHAT_METRICS),
    "chat-evaluation-sft": ("SFT", CHAT_METRICS),
    "chat-rl": ("RL", ("GSM8K",)),  # the RL stage's own pass@1; a later chat eval of the RL model overrides it
    "chat-evaluation-rl": ("RL", ("GSM8K",)),
}
# on-demand $/GPU/hour (Lambda, as nanochat's report card used), by GPU name substring
GPU_HOURLY_RATES = (("h100", 3.00), ("a100", 1.79), ("v100", 0.55))
DEFAULT_GPU_HOURLY_RATE = 2.00


def slugify(text):
    return text.lower().replace(" ", "-")


def format_value(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


# -----------------------------------------------------------------------------
# System information for the header

def _run(cmd, cwd=REPO_ROOT):
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info():
    if not _run(["git", "rev-parse", "--is-inside-work-tree"]):
        return {"Branch": "unknown", "Commit": "unknown", "Dirty": "unknown", "Message": ""}
    return {"Branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
            "Commit": _run(["git", "rev-parse", "--short", "HEAD"]),
            "Dirty": bool(_run(["git", "status", "--porcelain"])),
            "Message": _run(["git", "log", "-1", "--pretty=%s"])}


def memory_gb():
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return kb / 1024**2
    except (OSError, StopIteration, ValueError):
        return None


def physical_cpus():
    """Physical cores from /proc/cpuinfo (distinct (physical id, core id) pairs), else None."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
        return len(cores) or None
    except OSError:
        return None


def gpu_info():
    import torch
    if not torch.cuda.is_available():
        return {"count": 0, "names": [], "memory_gb": 0.0, "cuda": None}
    n = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    return {"count": n, "names": [p.name for p in props], "memory_gb": sum(p.total_memory for p in props) / 1024**3,
            "cuda": torch.version.cuda}


def hourly_rate(gpu_name, gpu_count):
    """Estimated $/hour for gpu_count GPUs of that name (0 without GPUs)."""
    name = (gpu_name or "").lower()
    rate = next((r for key, r in GPU_HOURLY_RATES if key in name), DEFAULT_GPU_HOURLY_RATE)
    return rate * gpu_count


def bloat_info(root=REPO_ROOT):
    """Size of the code base: git-tracked py/md/rs/html/toml/sh files (chars, lines, files, ~tokens)."""
    files = [f for f in _run(["git", "ls-files"], cwd=root).splitlines()
             if f.endswith((".py", ".md", ".rs", ".html", ".toml", ".sh"))]
    chars = lines = 0
    for f in files:
        try:
            with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        chars += len(text)
        lines += text.count("\n")
    uv_lock = os.path.join(root, "uv.lock")
    uv_lines = sum(1 for _ in open(uv_lock, encoding="utf-8")) if os.path.exists(uv_lock) else 0
    return {"Characters": chars, "Lines": lines, "Files": len(files), "Tokens (approx)": chars // 4,
            "Dependencies (uv.lock lines)": uv_lines}


def _package_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def header_markdown(cluster=None):
    """The header: environment facts. cluster (optional, from Ray): {"nodes", "gpus", "gpu_names", "cpus",
    "memory_gb"}; when given, GPU count and hourly rate are the cluster's."""
    import torch
    git, gpu = git_info(), gpu_info()
    mem = memory_gb()
    lines = ["# nanochat training report", "", f"Generated: {now()}", "", "## Environment", "", "### Git Information"]
    lines += [f"- {k}: {v}" for k, v in git.items()]
    lines += ["", "### Hardware", f"- Platform: {platform.system()} {platform.machine()}",
              f"- CPUs: {physical_cpus() or '?'} cores ({os.cpu_count()} logical)",
              f"- Memory: {mem:.1f} GB" if mem is not None else "- Memory: unknown"]
    if gpu["count"]:
        lines += [f"- GPUs: {gpu['count']}x {gpu['names'][0]}", f"- GPU Memory: {gpu['memory_gb']:.1f} GB",
                  f"- CUDA Version: {gpu['cuda']}"]
    else:
        lines.append("- GPUs: none")
    gpu_count, gpu_name = gpu["count"], (gpu["names"][0] if gpu["names"] else "")
    if cluster:
        lines += ["", "### Cluster", f"- Nodes: {cluster.get('nodes', '?')}", f"- GPUs: {cluster.get('gpus', 0)}"
                  + (f" ({', '.join(cluster['gpu_names'])})" if cluster.get("gpu_names") else ""),
                  f"- CPUs: {cluster.get('cpus', '?')}"]
        if cluster.get("memory_gb") is not None:
            lines.append(f"- Memory: {cluster['memory_gb']:.1f} GB")
        gpu_count = int(cluster.get("gpus", 0))
        gpu_name = (cluster.get("gpu_names") or [gpu_name])[0]
    lines.append(f"- Hourly Rate: ${hourly_rate(gpu_name, gpu_count):.2f}/hour")
    lines += ["", "### Software", f"- Python: {sys.version.split()[0]}", f"- PyTorch: {torch.__version__}",
              f"- Ray: {_package_version('ray')}", "", "### Bloat"]
    lines += [f"- {k}: {format_value(v)}" for k, v in bloat_info().items()]
    lines += ["", f"Run started: {now()}", "", "---", ""]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Reading sections back

def parse_items(markdown):
    """{key: value string} of the '- key: value' lines of a section."""
    items, fenced = {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):  # free text (e.g. model samples) lives in fences: never parsed as items
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^- ([^:]+): (.*)$", line)
        if m:
            items[m.group(1).strip()] = m.group(2).strip()
    return items


def extract_timestamp(markdown, prefix):
    for line in markdown.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line[len(prefix):].strip(), TIME_FORMAT)
            except ValueError:
                return None
    return None


def summary_table(metrics):
    """metrics: {stage: {metric: value string}} -> markdown table (rows: metrics; columns: stages)."""
    names = sorted({m for stage in metrics.values() for m in stage})
    order = ["CORE"] + sorted(n for n in names if n not in ("CORE", "ChatCORE")) + ["ChatCORE"]
    rows = [n for n in order if n in names]
    out = ["| Metric | " + " | ".join(STAGES) + " |", "|" + "---|" * (len(STAGES) + 1)]
    for name in rows:
        out.append(f"| {name} | " + " | ".join(metrics.get(s, {}).get(name, "-") for s in STAGES) + " |")
    return "\n".join(out) + "\n"


def format_duration(seconds):
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60}m"


# -----------------------------------------------------------------------------
# The report

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
        storage.makedirs(report_dir)

    def path(self, name):
        return storage.join(self.report_dir, name)

    def log(self, section, data):
        """Write one section. data: a dict, or a list of dicts / strings (strings are written as they are)."""
        items = [data] if isinstance(data, dict) else list(data)
        lines = [f"## {section}", f"timestamp: {now()}", ""]
        for item in items:
            if not item:
                continue
            if isinstance(item, str):
                lines.append(item.rstrip("\n"))
            else:
                lines += [f"- {k}: {format_value(v)}" for k, v in item.items()]
        path = self.path(f"{slugify(section)}.md")
        storage.write_text(path, "\n".join(lines) + "\n\n")
        return path

    def reset(self, cluster=None):
        """Start a new run: remove every section and report.md, write a fresh header.md."""
        for name in storage.listdir(self.report_dir):
            if name.endswith((".md", ".png")):
                storage.remove(self.path(name))
        storage.write_text(self.path("header.md"), header_markdown(cluster))
        return self.path("header.md")

    def generate(self):
        """Assemble report.md; -> its path."""
        try:
            header = storage.read_text(self.path("header.md"))
        except FileNotFoundError:
            header = "# nanochat training report\n\n(no header: run `report reset` at the start of a run)\n\n"
        start = extract_timestamp(header, "Run started:")
        rate_match = re.search(r"Hourly Rate: \$([0-9.]+)/hour", header)
        rate = float(rate_match.group(1)) if rate_match else 0.0
        present = [n[:-3] for n in sorted(storage.listdir(self.report_dir))
                   if n.endswith(".md") and n not in ("header.md", "report.md")]
        order = [s for s in EXPECTED_SECTIONS if s in present] + [s for s in present if s not in EXPECTED_SECTIONS]
        metrics, end, body = {}, None, []
        for slug in order:
            text = storage.read_text(self.path(f"{slug}.md"))
            body.append(text.rstrip("\n") + "\n")
            items = parse_items(text)
            if slug in SUMMARY_SOURCES:
                stage, keys = SUMMARY_SOURCES[slug]
                found = {k: items[k] for k in keys if k in items}
                if found:
                    metrics.setdefault(stage, {}).update(found)
            ts = extract_timestamp(text, "timestamp:")
            if ts is not None and slug not in RL_SECTIONS:
                end = ts if end is None or ts > end else end
        out = [header.rstrip("\n") + "\n"]
        out += [b + "\n" for b in body]
        out.append("## Summary\n")
        if metrics:
            out.append(summary_table(metrics))
        else:
            out.append("(no metrics logged yet)\n")
        if start is not None and end is not None:
            seconds = max(0.0, (end - start).total_seconds())
            out.append(f"\nTotal wall clock time: {format_duration(seconds)}\n")
            if rate > 0:
                out.append(f"Estimated cost: ${rate * seconds / 3600:.2f} (at ${rate:.2f}/hour)\n")
        else:
            out.append("\nTotal wall clock time: unknown\n")
        curves = plot_curves(storage.dirname(self.report_dir), self.report_dir)
        if curves:
            out.append("## Training curves\n")
            out += [f"![{stage}]({name})\n" for stage, name in curves]
        path = self.path("report.md")
        storage.write_text(path, "\n".join(out))
        return path


class DummyReport:
    """What non-zero ranks get: every call is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report(base_dir=None):
    """The run's Report (<base>/report) on rank 0, a DummyReport elsewhere."""
    if get_dist_info()[1] != 0:
        return DummyReport()
    return Report(storage.join(base_dir or get_base_dir(), "report"))


if __name__ == "__main__":  # python -m nanochat.report reset|generate (nanochat's interface)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "generate"
    if cmd not in ("reset", "generate"):
        sys.exit("usage: python -m nanochat.report [reset|generate]")
    report = get_report()
    print(report.reset() if cmd == "reset" else report.generate())
