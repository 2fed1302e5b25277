"""
The report card: `python -m ray_jobs.report [--storage ROOT] [reset|generate]` -> ROOT/report/report.md.

reset (at the start of a run) writes the header; when a Ray cluster is reachable (RAY_ADDRESS set, or --ray) its
nodes, GPUs and CPUs go into the header too, and the hourly rate counts the cluster's GPUs. generate (default, at the
end) stitches the sections every stage logged into report.md. The work is done by nanochat/report.py.
"""
import os
from dataclasses import dataclass

from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag
from nanochat.report import Report


def cluster_info():
    """Nodes, GPUs (with accelerator types), CPUs and memory of the connected Ray cluster."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    gpu_names = sorted({k.split(":", 1)[1] for n in nodes for k in n.get("Resources", {})
                        if k.startswith("accelerator_type:")})
    return {"nodes": len(nodes), "gpus": int(res.get("GPU", 0)), "gpu_names": gpu_names,
            "cpus": int(res.get("CPU", 0)), "memory_gb": res.get("memory", 0) / 1024**3}


@dataclass
class ReportConfig(ArgsMixin):
    command: str = flag("generate", "reset: write the header (start of a run); generate: stitch report.md",
                        positional=True, choices=["generate", "reset"])
    storage: str | None = storage_flag()
    ray: bool = flag(False, "reset: include the Ray cluster's facts (connects to it)")


def main(argv=None):
    args = ReportConfig.parse(argv, __doc__)
    report = Report(os.path.join(get_base_dir(args.storage), "report"))
    if args.command == "reset":
        cluster = None
        if args.ray or os.environ.get("RAY_ADDRESS"):
            from ray_jobs.common import init_ray
            init_ray()
            cluster = cluster_info()
        else:
            import ray
            cluster = cluster_info() if ray.is_initialized() else None
        path = report.reset(cluster)
    else:
        path = report.generate()
    print(path)
    return path


if __name__ == "__main__":
    main()
