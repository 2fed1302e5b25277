"""Deployment files, checked offline: cluster.yaml against the launcher's schema, the KubeRay RayJob manifest, the
SLURM script and the Dockerfile (required fields, image, resources, the dashboard bound to loopback, and that each
runs the README's speedrun command)."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def speedrun_argv(text):
    """The speedrun command of a file (`python -m ray_jobs.speedrun ...`), as argv, storage value left out."""
    line = next(line for line in text.splitlines() if "python -m ray_jobs.speedrun --preset d20" in line)
    argv = shlex.split(line[line.index("python -m ray_jobs.speedrun"):])
    i = argv.index("--storage")
    return argv[:i + 1] + argv[i + 2:]


README_COMMAND = speedrun_argv(README)


def worker_range(argv):
    """The command's --num-workers MIN-MAX."""
    lo, hi = argv[argv.index("--num-workers") + 1].split("-")
    return int(lo), int(hi)


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def ray_schema():
    import ray.autoscaler
    return json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))


def test_cluster_yaml_matches_rays_schema(config):
    from ray.autoscaler._private.util import prepare_config, validate_config
    errors = [e.message for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(config)]
    assert errors == []
    validate_config(prepare_config(config))  # provider defaults merged: head type, worker counts, node types


def test_cluster_shape_image_and_dashboard(config):
    from ray.autoscaler._private.aws.config import DEFAULT_AMI
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = nodes["gpu_8xh100"]
    assert gpu["resources"] == {"CPU": 192, "GPU": 8} and gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    # the GPU nodes the autoscaler may run are the elastic range of the speedrun's training workers
    assert (8 * gpu["min_workers"], 8 * gpu["max_workers"]) == worker_range(README_COMMAND)
    # a real image: Ray's launcher resolves latest_dlami to its Deep Learning AMI for the region, and the
    # container is Ray's own GPU image at the version we run
    assert all(n["node_config"]["ImageId"] == "latest_dlami" for n in nodes.values())
    assert config["provider"]["region"] in DEFAULT_AMI
    assert config["docker"]["image"] == RAY_IMAGE
    assert any("pip install" in c and "-e" in c and "[s3]" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert speedrun_argv((REPO / "cluster.yaml").read_text()) == README_COMMAND


def test_a_misspelled_key_is_caught(config):
    bad = {**config, "max_wrkers": 3}
    errors = [e.message for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(bad)]
    assert any("max_wrkers" in e for e in errors)


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert speedrun_argv(spec["entrypoint"]) == README_COMMAND
    # the submitter must reach a dashboard bound to loopback: only as a sidecar in the head pod
    assert spec["submissionMode"] == "SidecarMode" and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"} and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["restartPolicy"] == "Never"  # what SidecarMode requires
    images = {head["template"]["spec"]["containers"][0]["image"]}
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus == 8
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert (gpus * group["minReplicas"], gpus * group["maxReplicas"]) == worker_range(README_COMMAND)
    assert len(images) == 1  # head and workers run the same build of the project


def test_dockerfile_builds_on_rays_image_and_installs_the_project():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}$", text, re.M)
    assert "pip install" in text and '-e ".[s3]"' in text and "torch==" in text


def test_slurm_script():
    path = REPO / "deploy" / "slurm.sbatch"
    text = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)  # parses
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert int(directives["nodes"]) >= 2 and directives["gpus-per-node"] == "8" and "exclusive" in directives
    head = next(line for line in text.splitlines() if "ray start --head" in line)
    head += " " + text.split(head, 1)[1].splitlines()[1]
    assert "--dashboard-host=127.0.0.1" in head and "--block" in head
    assert 'ray start --address="$head_ip:$port"' in text
    assert "ray stop" not in text  # Ray nodes end with their srun steps, never by name
    assert "ray job submit --address http://127.0.0.1:8265" in text
    assert speedrun_argv(text) == README_COMMAND
